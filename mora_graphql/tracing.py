"""OpenTelemetry tracing, opt-in: off unless `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_TRACES_EXPORTER` is set in the environment.

Off, every hook here is one `None` check (`span()` returns a shared no-op context manager)
and nothing from OpenTelemetry is imported: no tracer provider, no instrumentation, no
GraphQL extension. On (`setup()`, called by the entry points), the standard `OTEL_*`
variables configure the SDK (service name, resource, sampler, batch processor, OTLP/HTTP
exporter), and the maintained instrumentations cover HTTP requests (ASGI), SQLAlchemy, Redis
and both HTTP clients (httpx for subtitle providers, httpx2 under the OpenAI SDK).

The job's trace context travels as a W3C `traceparent` carrier (`carrier()`, stored in the
procrastinate job's kwargs); `job_span()` starts the job's root span as a child of it, or of
the current context for in-process jobs (asyncio tasks inherit it).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mora_graphql.config import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, Tracer
    from sqlalchemy.ext.asyncio import AsyncEngine
    from starlette.types import ASGIApp

T = TypeVar("T")

SWITCHES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
)
TRACER_NAME = "mora_graphql"
JOB_SPAN = "mora.run_session"
_NOOP: AbstractContextManager[None] = contextlib.nullcontext()

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_instrumentors: list[Any] = []


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces (`OTEL_SDK_DISABLED=true` or
    `OTEL_TRACES_EXPORTER=none` say no)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in SWITCHES)


def enabled() -> bool:
    return _tracer is not None


def setup(service_name: str, *, provider: TracerProvider | None = None) -> bool:
    """Configure tracing for this process when the environment asks for it (or a `provider`
    is given, as tests do); True when tracing is on. Idempotent."""
    global _tracer, _provider
    if _tracer is not None:
        return True
    if provider is None and not requested():
        return False
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise SettingsError(
            "OpenTelemetry is configured (OTEL_*) but not installed: "
            "pip install 'mora-graphql[otel]'"
        ) from exc
    if provider is None:
        provider = _provider or _provider_from_env(service_name)
    if _provider is None:
        trace.set_tracer_provider(provider)
    _provider = provider
    _instrument_clients(provider)
    _tracer = provider.get_tracer(TRACER_NAME)
    return True


def disable() -> None:
    """Undo the instrumentation (tests); the tracer provider stays for a later `setup()`."""
    global _tracer
    for instrumentor in reversed(_instrumentors):
        instrumentor.uninstrument()
    _instrumentors.clear()
    _tracer = None


def _provider_from_env(service_name: str) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes: dict[str, str] = {}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes[SERVICE_NAME] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    names = [
        name.strip().lower()
        for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
        if name.strip()
    ]
    processor: SpanProcessor
    for name in names:
        if name == "otlp":
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            )
            if protocol.strip().lower() != "http/protobuf":
                raise SettingsError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: Mora exports "
                    "OTLP over HTTP/protobuf (use a collector's port 4318)"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processor = BatchSpanProcessor(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            processor = SimpleSpanProcessor(ConsoleSpanExporter())
        else:
            raise SettingsError(
                f"OTEL_TRACES_EXPORTER={name} is not supported; use otlp, console or none"
            )
        provider.add_span_processor(processor)
    return provider


def _instrument_clients(provider: TracerProvider) -> None:
    """The process-wide instrumentations: Redis and both HTTP clients."""
    from opentelemetry.instrumentation.httpx import (
        HTTPX2ClientInstrumentor,
        HTTPXClientInstrumentor,
    )
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    instrumentors = (HTTPXClientInstrumentor(), HTTPX2ClientInstrumentor(), RedisInstrumentor())
    for instrumentor in instrumentors:
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
            _instrumentors.append(instrumentor)


def instrument_engine(engine: AsyncEngine) -> None:
    """SQL statement spans for the process's engine (no-op when tracing is off)."""
    if _tracer is None:
        return
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    instrumentor = SQLAlchemyInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        # One engine per process; the instrumentor is a singleton. Its declared range stops
        # below SQLAlchemy 2.1, whose engine events it uses unchanged (tests cover it).
        instrumentor.instrument(
            engine=engine.sync_engine, tracer_provider=_provider, skip_dep_check=True
        )
        _instrumentors.append(instrumentor)


def asgi_middleware(app: ASGIApp) -> ASGIApp:
    """The server span of every HTTP request and WebSocket connection (not one per message)."""
    if _tracer is None:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(
        app, tracer_provider=_provider, exclude_spans=["receive", "send"]
    )


GRAPHQL_TRACED_ARGUMENTS = frozenset({"id", "sessionId", "afterSeq", "first", "after", "status"})
"""Resolver arguments recorded on spans; others (passwords, tokens, uploaded subtitles) never."""


def graphql_extensions() -> list[Callable[[], Any]]:
    """Strawberry's OpenTelemetry extension when tracing is on; nothing otherwise.

    Spans carry the operation name and type but not the document (it may hold literal
    passwords), and only the resolver arguments in `GRAPHQL_TRACED_ARGUMENTS`."""
    if _tracer is None:
        return []
    from graphql import GraphQLResolveInfo
    from opentelemetry.trace import SpanKind
    from strawberry.extensions import LifecycleStep
    from strawberry.extensions.tracing import OpenTelemetryExtension

    provider = _provider

    def safe_arguments(args: dict[str, Any], _info: GraphQLResolveInfo[Any]) -> dict[str, Any]:
        return {name: value for name, value in args.items() if name in GRAPHQL_TRACED_ARGUMENTS}

    class GraphQLTracing(OpenTelemetryExtension):
        def on_operation(self) -> Generator[None, None, None]:
            name = self.execution_context.operation_name
            self._operation_name = name
            operation = self._tracer.start_span(
                f"GraphQL Query: {name}" if name else "GraphQL Query", kind=SpanKind.SERVER
            )
            operation.set_attribute("component", "graphql")
            self._span_holder[LifecycleStep.OPERATION] = operation
            yield
            resolved = self.execution_context.operation_name
            if resolved:
                operation.set_attribute("graphql.operation.name", resolved)
                if not name:
                    operation.update_name(f"GraphQL Query: {resolved}")
            try:
                kind = self.execution_context.operation_type.value
            except Exception:  # no document, or no operation to run
                kind = None
            if kind:
                operation.set_attribute("graphql.operation.type", kind)
            operation.end()

    def extension() -> OpenTelemetryExtension:
        return GraphQLTracing(arg_filter=safe_arguments, tracer_provider=provider)

    return [extension]


def span(name: str, **attributes: str | int | float | bool) -> AbstractContextManager[Any]:
    """A span around a block, current inside it; a shared no-op when tracing is off."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=attributes)


def untraced() -> AbstractContextManager[Any]:
    """No instrumentation spans inside (and in tasks created inside): for background loops
    that would otherwise start a root trace every few seconds."""
    if _tracer is None:
        return _NOOP
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    return suppress_instrumentation()


def mark_failed(code: str, message: str) -> None:
    """Mark the current span as failed (an outcome the code handles, not an exception)."""
    if _tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    current = trace.get_current_span()
    current.set_attribute("error.type", code)
    current.set_status(Status(StatusCode.ERROR, message))


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers (`traceparent`, `tracestate`), to store with
    a deferred job; None when tracing is off or nothing is being traced."""
    if _tracer is None:
        return None
    from opentelemetry.propagate import inject

    headers: dict[str, str] = {}
    inject(headers)
    return headers or None


@contextmanager
def job_span(
    session_id: uuid.UUID, trace: Mapping[str, str] | None = None, **attributes: str | int
) -> Iterator[None]:
    """The job's root span: a child of `trace` (the context stored when the job was deferred),
    else of the current context."""
    if _tracer is None:
        yield
        return
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    parent = extract(dict(trace)) if trace else None
    with _tracer.start_as_current_span(
        JOB_SPAN,
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={"mora.session_id": str(session_id), **attributes},
    ):
        yield


class _TokenCounts(Protocol):
    prompt_tokens: int
    completion_tokens: int


def _llm_attributes(
    operation: str, model: str, server: str | None, streaming: bool
) -> dict[str, str | bool]:
    attributes: dict[str, str | bool] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": model,
        "mora.llm.streaming": streaming,
    }
    if server:
        attributes["server.address"] = server
    return attributes


def _record_tokens(span: Span, usage: _TokenCounts | None, before: tuple[int, int]) -> None:
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens - before[0])
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens - before[1])


def _counts(usage: _TokenCounts | None) -> tuple[int, int]:
    return (usage.prompt_tokens, usage.completion_tokens) if usage is not None else (0, 0)


@contextmanager
def llm_call(
    model: str, *, server: str | None = None, usage: _TokenCounts | None = None
) -> Iterator[None]:
    """A client span around one non-streamed chat completion; token counts are read from
    `usage` (the caller's accumulator) before and after."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace import SpanKind

    before = _counts(usage)
    with _tracer.start_as_current_span(
        f"chat {model}",
        kind=SpanKind.CLIENT,
        attributes=_llm_attributes("chat", model, server, False),
    ) as current:
        try:
            yield
        finally:
            _record_tokens(current, usage, before)


async def llm_stream(
    stream: AsyncIterator[T],
    model: str,
    *,
    server: str | None = None,
    usage: _TokenCounts | None = None,
) -> AsyncIterator[T]:
    """`stream` inside a client span. The span is current only while the stream itself runs
    (each step), never across a `yield` into the consumer, so the HTTP request is its child
    and an abandoned stream cannot leave it current."""
    assert _tracer is not None
    from opentelemetry.trace import SpanKind, Status, StatusCode, use_span

    before = _counts(usage)
    llm_span = _tracer.start_span(
        f"chat {model}",
        kind=SpanKind.CLIENT,
        attributes=_llm_attributes("chat", model, server, True),
    )
    chunks = 0
    try:
        while True:
            with use_span(
                llm_span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    break
            chunks += 1
            yield item
    except Exception as exc:
        llm_span.record_exception(exc)
        llm_span.set_status(Status(StatusCode.ERROR, str(exc)))
        llm_span.set_attribute("error.type", type(exc).__qualname__)
        raise
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
        llm_span.set_attribute("mora.llm.chunks", chunks)
        _record_tokens(llm_span, usage, before)
        llm_span.end()
