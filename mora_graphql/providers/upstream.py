"""The one translation of a network failure talking to an upstream service."""

from __future__ import annotations

from typing import TypeVar

from mora_graphql.errors import ErrorCode, PipelineError

E = TypeVar("E", bound=PipelineError)


def unreachable(message: str, error: type[E] = PipelineError) -> E:  # type: ignore[assignment]
    """The upstream did not answer (connection, DNS, TLS, timeout): worth a retry."""
    return error(ErrorCode.BIBIGPT_API_ERROR, message, retryable=True)


def could_not_reach(name: str, exc: BaseException, error: type[E] = PipelineError) -> E:  # type: ignore[assignment]
    return unreachable(f"Could not reach {name} ({type(exc).__name__}).", error)
