"""Structured logs (JSON in production) with a request id, and secret redaction.

Every log line passes through `redact()`: structlog events through a processor, standard
`logging` records (uvicorn, strawberry, SQLAlchemy, httpx...) through a record factory that
redacts the message and the formatted traceback, so secrets inside exception messages from
upstream libraries are removed too.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import quote, quote_plus

import structlog

from mora_graphql.config import Settings

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 6

_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(basic\s+)[A-Za-z0-9+/=]{8,}"),
    re.compile(
        r"(?i)((?:api[_-]?key|token|password|passwd|secret|authorization|credential)s?"
        r"[\"']?\s*[:=]\s*[\"']?)(?![\d.]+(?:[\s\"',&}]|$))(?!(?:bearer|basic)\s)(?!<[\w-]+>(?:[\s\"',&}.]|$))"
        r"[^\s\"',&}]+"
    ),
    re.compile(r"(://[^:/\s@]*:)[^@/\s]+(@)"),
    re.compile(r"\b(sk-)[A-Za-z0-9_-]{8,}"),
    re.compile(r"()\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    re.compile(r"\b(mrt_)[A-Za-z0-9_-]{16,}"),
]
_secret_values: set[str] = set()


def register_secrets(values: Iterable[str | None]) -> None:
    """Redact these exact values (and their URL-encoded forms) wherever they appear."""
    for value in values:
        if value and len(value) >= MIN_SECRET_LENGTH:
            _secret_values.update({value, quote(value, safe=""), quote_plus(value)})


def settings_secrets(settings: Settings) -> list[str | None]:
    from sqlalchemy.engine import make_url

    values: list[str | None] = [
        secret.get_secret_value() if secret is not None else None
        for secret in (settings.secret_key, settings.deepseek_api_key, settings.bibigpt_api_key)
    ]
    for url in (settings.database_url, settings.redis_url, settings.rate_limit_storage_url):
        if url:
            try:
                values.append(make_url(url).password)
            except Exception:
                values.append(None)
    return values


def _mask(match: re.Match[str]) -> str:
    tail = match.group(2) if match.lastindex and match.lastindex >= 2 else ""
    return match.group(1) + REDACTED + tail


def redact(text: str) -> str:
    for value in sorted(_secret_values, key=len, reverse=True):
        if value in text:
            text = text.replace(value, REDACTED)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(_mask, text)
    return text


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


def _redact_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        event[key] = redact_value(value)
    return event


_original_factory: Callable[..., logging.LogRecord] | None = None


def _redacting_record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    assert _original_factory is not None
    record = _original_factory(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:
        message = str(record.msg)
    if redact(message) != message:
        if isinstance(record.args, tuple) and record.name == "uvicorn.access":
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        else:
            record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[1] is not None:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


def install_stdlib_redaction() -> None:
    """Redact every standard-library log record at creation, whatever its handler."""
    global _original_factory
    if _original_factory is None:
        _original_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_redacting_record_factory)


def configure_logging(level: str = "INFO", *, json: bool = False) -> None:
    install_stdlib_redaction()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
