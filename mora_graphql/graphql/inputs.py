"""Request text that cannot be served: lone UTF-16 surrogates and subscriptions over plain HTTP.

JSON may carry a lone surrogate (`"\\ud800"`), which Python decodes into a `str` that cannot be
encoded as UTF-8: hashing, the database driver and the response encoder would all fail on it.
It is never valid text, so a request carrying one in its variables or operation name is
refused before anything runs. (The GraphQL lexer already refuses one inside the document.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mora_graphql.errors import BadRequest, BadUserInput, MoraError

_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_NESTING = 64

SUBSCRIPTION_TRANSPORTS = (
    "Subscriptions are not served over a plain HTTP request: use a WebSocket with the "
    "graphql-transport-ws or graphql-ws subprotocol (multipart HTTP and SSE subscriptions "
    "are coming)."
)


def has_lone_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _bad_value(value: object, depth: int = 0) -> bool:
    if isinstance(value, str):
        return has_lone_surrogate(value)
    if depth > MAX_NESTING:
        return False
    if isinstance(value, Mapping):
        return any(
            (isinstance(key, str) and has_lone_surrogate(key)) or _bad_value(item, depth + 1)
            for key, item in value.items()
        )
    if isinstance(value, list | tuple):
        return any(_bad_value(item, depth + 1) for item in value)
    return False


def unusable_text(
    operation_name: object, variables: object, extensions: object = None
) -> MoraError | None:
    """The error for a request whose operation name, variables or extensions are not valid
    Unicode."""
    for field, value in (("operationName", operation_name), ("extensions", extensions)):
        if _bad_value(value):
            return BadRequest(
                f"{field} is not valid Unicode text (it contains a lone UTF-16 surrogate).",
                extensions={"field": field},
            )
    if isinstance(variables, Mapping):
        for name, value in variables.items():
            if _bad_value(value) or (isinstance(name, str) and has_lone_surrogate(name)):
                shown = name if isinstance(name, str) and not has_lone_surrogate(name) else "?"
                return BadUserInput(
                    f"Variable '${shown[:64]}' is not valid Unicode text "
                    "(it contains a lone UTF-16 surrogate).",
                    extensions={"variable": shown[:64]},
                )
    return None
