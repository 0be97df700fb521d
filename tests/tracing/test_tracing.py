"""OpenTelemetry: one trace from createSession through the job, in-process and across the
procrastinate queue to a `mora worker` process; nothing installed when OTEL_* is unset."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mora_graphql import tracing
from tests.conftest import (
    SECRET,
    LiveServer,
    make_settings,
    start_server,
)
from tests.distributed.databases import fresh_database
from tests.fakes.bibigpt_server import API_KEY as BIBI_KEY
from tests.fakes.bibigpt_server import FakeBibiGPT, Subtitles
from tests.fakes.fixtures import (  # noqa: F401
    OPENAI_TEST_KEY,
    bibigpt_server_fixture,
    openai_server_fixture,
)
from tests.fakes.openai_server import JSON, FakeOpenAI, Stream
from tests.wsclient import TRANSPORT_WS, collect

ROOT = Path(__file__).resolve().parents[2]
VIDEO = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
LINES = [
    (0.0, 10.0, "we define a function that adds two numbers"),
    (10.0, 20.0, "then we print the result"),
]
SRT = "1\n00:00:00,000 --> 00:00:10,000\nwe define add\n\n2\n00:00:10,000 --> 00:00:20,000\nthen print\n"
CODE = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"
TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 10, "description": "add", "startLine": 1, "endLine": 2},
        {"startTime": 10, "endTime": 20, "description": "print", "startLine": 5, "endLine": 5},
    ]
}
CREATE = """
mutation CreateSession($input: CreateSessionInput!) { createSession(input: $input) { id } }"""
GET = "query($id: ID!) { session(id: $id) { status error { code message } } }"
PROGRESS = """
subscription($id: ID!) { sessionProgress(sessionId: $id) { __typename seq status } }"""
STAGES = ("mora.fetch_subtitles", "mora.generate_code", "mora.build_timeline")

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider(resource=Resource.create({"service.name": "mora-test"}))
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test (as OTEL_* would turn it on), into memory."""
    assert tracing.setup("mora-test", provider=PROVIDER)
    EXPORTER.clear()
    yield EXPORTER
    tracing.disable()
    EXPORTER.clear()


@pytest.fixture
def settings_overrides(
    spans: InMemorySpanExporter, openai_server: FakeOpenAI, bibigpt_server: FakeBibiGPT
) -> dict[str, Any]:
    """Depends on `spans`, so tracing is on before the live server's app is created."""
    return {
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "bibigpt_api_url": bibigpt_server.api_url,
        "bibigpt_api_key": BIBI_KEY,
        "subtitle_providers": ["bibigpt"],
    }


@dataclass
class Node:
    """One finished span, from the SDK (in memory) or decoded from an OTLP export."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int | None
    kind: str
    attributes: dict[str, Any]
    service: str


def from_sdk(span: ReadableSpan) -> Node:
    assert span.context is not None
    return Node(
        name=span.name,
        trace_id=span.context.trace_id,
        span_id=span.context.span_id,
        parent_id=span.parent.span_id if span.parent is not None else None,
        kind=span.kind.name,
        attributes=dict(span.attributes or {}),
        service=str(span.resource.attributes.get("service.name")),
    )


class Trace:
    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.by_id = {node.span_id: node for node in nodes}

    def named(self, name: str) -> list[Node]:
        return [node for node in self.nodes if node.name == name]

    def one(self, name: str) -> Node:
        found = self.named(name)
        assert len(found) == 1, (name, [n.name for n in self.nodes])
        return found[0]

    def ancestors(self, node: Node) -> list[Node]:
        chain = []
        while node.parent_id is not None and node.parent_id in self.by_id:
            node = self.by_id[node.parent_id]
            chain.append(node)
        return chain

    def under(self, ancestor: Node) -> list[Node]:
        return [node for node in self.nodes if ancestor in self.ancestors(node)]


def is_sql(node: Node) -> bool:
    return any(key in node.attributes for key in ("db.system", "db.system.name"))


def http_url(node: Node) -> str:
    return str(node.attributes.get("url.full") or node.attributes.get("http.url") or "")


async def create_and_finish(live: LiveServer, *, follow: bool = False, **fields: Any) -> str:
    """createSession, then wait for the end (`follow`: also over a WebSocket subscription)."""
    token = await live.register()
    created = await live.gql(CREATE, {"input": {"videoUrl": VIDEO, **fields}}, token)
    assert "errors" not in created, created
    session_id = str(created["data"]["createSession"]["id"])
    if follow:
        events = await asyncio.wait_for(
            collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id}), 30
        )
        assert events[-1]["__typename"] == "SessionCompleted", events[-1]
        assert any(event["__typename"] == "CodeDelta" for event in events)
    session = await live.wait_terminal(GET, token, session_id, limit=60)
    assert session["status"] == "COMPLETED", session
    return session_id


async def wait_for(predicate: Any, limit: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "spans never arrived"
        await asyncio.sleep(0.05)


def graphql_operation(spans: Trace, operation: str) -> Node:
    return spans.one(f"GraphQL Query: {operation}")


def assert_job_tree(spans: Trace, job: Node, openai_url: str) -> None:
    """Stages under the job; the LLM spans under their stages; HTTP and SQL spans below."""
    stages = {name: spans.one(name) for name in STAGES}
    for stage in stages.values():
        assert stage.parent_id == job.span_id, stage
        assert stage.trace_id == job.trace_id
    chats = [n for n in spans.nodes if n.name.startswith("chat ")]
    streamed = [n for n in chats if n.attributes["mora.llm.streaming"]]
    completed = [n for n in chats if not n.attributes["mora.llm.streaming"]]
    assert len(streamed) == 1 and len(completed) == 1, [n.name for n in chats]
    assert streamed[0].parent_id == stages["mora.generate_code"].span_id
    assert completed[0].parent_id == stages["mora.build_timeline"].span_id
    for chat in chats:
        assert chat.kind == "CLIENT"
        assert chat.attributes["gen_ai.request.model"] == "deepseek-v4-flash"
        assert chat.attributes["gen_ai.usage.output_tokens"] > 0
        assert chat.attributes["gen_ai.usage.input_tokens"] > 0
        requests = [n for n in spans.nodes if n.parent_id == chat.span_id and n.kind == "CLIENT"]
        assert len(requests) == 1, chat
        assert http_url(requests[0]).startswith(openai_url), requests[0].attributes
    assert streamed[0].attributes["mora.llm.chunks"] > 0
    assert any(is_sql(node) for node in spans.under(job)), "no SQL span under the job"


async def test_embedded_trace_runs_from_create_session_to_the_timeline(
    spans: InMemorySpanExporter,
    live: LiveServer,
    openai_server: FakeOpenAI,
    bibigpt_server: FakeBibiGPT,
) -> None:
    bibigpt_server.respond(VIDEO, Subtitles(lines=list(LINES), duration=20.0, title="Add"))
    openai_server.enqueue(
        Stream(content_chunks=[CODE[:20], CODE[20:]], chunk_delay=0.3), JSON(json.dumps(TIMELINE))
    )
    session_id = await create_and_finish(live, follow=True)

    await wait_for(lambda: any(s.name == tracing.JOB_SPAN for s in spans.get_finished_spans()))
    tree = Trace([from_sdk(span) for span in spans.get_finished_spans()])
    job = tree.one(tracing.JOB_SPAN)
    assert job.attributes["mora.session_id"] == session_id
    assert job.kind == "CONSUMER"

    # The job is a descendant of the createSession operation, inside the HTTP request span.
    operation = graphql_operation(tree, "CreateSession")
    assert operation.attributes["graphql.operation.type"] == "mutation"
    assert "query" not in operation.attributes  # documents may hold literal passwords
    assert job.trace_id == operation.trace_id
    assert operation in tree.ancestors(job)
    server = next(n for n in tree.ancestors(operation) if n.kind == SpanKind.SERVER.name)
    assert server.attributes.get("http.method", server.attributes.get("http.request.method")) == (
        "POST"
    )
    assert any(is_sql(node) for node in tree.under(operation)), "no SQL span for the INSERT"

    assert_job_tree(tree, job, openai_server.url)
    subtitles = tree.one("mora.fetch_subtitles")
    assert any(
        http_url(node).startswith(bibigpt_server.api_url) for node in tree.under(subtitles)
    ), "no HTTP span for the subtitle request"

    # Registration went through the same extension; its password argument was not recorded.
    for node in tree.nodes:
        assert "correct horse" not in json.dumps(node.attributes, default=str)


async def test_a_job_the_embedded_reconciler_queued_starts_its_own_trace(
    spans: InMemorySpanExporter,
    clean_db: str,
    openai_server: FakeOpenAI,
    settings_overrides: dict[str, Any],
) -> None:
    """The session was created while the in-process queue refused jobs: the reconciler's
    checks start no traces, and the job it queues is the root of a trace of its own."""
    openai_server.enqueue(Stream(content_chunks=[CODE]), JSON(json.dumps(TIMELINE)))
    settings = make_settings(clean_db, **settings_overrides, reconcile_interval=0.3)
    async for live in start_server(settings):
        spans.clear()
        token = await live.register()
        queue = live.services.queue
        await queue.stop()
        try:
            created = await live.gql(
                CREATE, {"input": {"videoUrl": VIDEO, "subtitles": SRT}}, token
            )
        finally:
            await queue.start()
        assert "errors" not in created, created
        session_id = str(created["data"]["createSession"]["id"])
        session = await live.wait_terminal(GET, token, session_id, limit=30)
        assert session["status"] == "COMPLETED", session
        await asyncio.sleep(1.0)  # more rounds of the reconciler

    tree = Trace([from_sdk(span) for span in spans.get_finished_spans()])
    job = tree.one(tracing.JOB_SPAN)
    assert job.attributes["mora.session_id"] == session_id
    assert job.parent_id is None
    assert job.trace_id != graphql_operation(tree, "CreateSession").trace_id
    # The reconciler's queries would be SQL spans at the root of traces of their own.
    assert not [
        (node.name, node.attributes.get("db.statement"))
        for node in tree.nodes
        if node.parent_id is None and is_sql(node)
    ]


async def test_tracing_off_without_otel_env(tmp_path: Path) -> None:
    """A fresh process with no OTEL_* variables: the app and its runtime start, serve a
    request, and no tracer provider, instrumentation, extension or middleware is installed."""
    script = f"""
import sys
from starlette.testclient import TestClient
from mora_graphql import tracing
from mora_graphql.app import create_app
from mora_graphql.config import Settings

assert not tracing.requested()
settings = Settings(
    _env_file=None, environment="test", secret_key={SECRET!r},
    database_url="sqlite+aiosqlite:///{tmp_path / "off.db"}",
)
app = create_app(settings)
with TestClient(app) as client:
    response = client.post("/graphql", json={{"query": "{{ __typename }}"}})
    assert response.json() == {{"data": {{"__typename": "Query"}}}}, response.text
assert not tracing.enabled()
# (redis imports the OpenTelemetry API itself when it is installed; the SDK's tracing, the
# exporters, the instrumentations and Strawberry's extension are never loaded.)
ours = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.instrumentation",
        "strawberry.extensions.tracing")
loaded = sorted(name for name in sys.modules if name.startswith(ours))
assert not loaded, loaded
from opentelemetry import trace
assert trace._TRACER_PROVIDER is None
import httpx, httpx2
for transport in (httpx.AsyncHTTPTransport, httpx2.AsyncHTTPTransport):
    assert not hasattr(transport.handle_async_request, "__wrapped__")
route = next(r for r in app.routes if getattr(r, "path", None) == "/graphql")
schema = route.app.schema
names = [getattr(e, "__name__", type(e).__name__) for e in schema.extensions]
assert not any("Telemetry" in n or "Tracing" in n for n in names), names
assert not any("OpenTelemetry" in type(m.cls).__name__ + str(m.cls) for m in app.user_middleware)
print("off")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("off")


def test_tracing_stays_off_after_an_earlier_setup_was_undone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An app created after a traced one in the same process is traced only if asked."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    assert tracing.setup("mora-test", provider=PROVIDER)
    tracing.disable()
    assert tracing.setup("mora-graphql") is False
    assert not tracing.enabled()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert tracing.setup("mora-graphql")
    tracing.disable()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
    ],
)
def test_requested_by_the_standard_variables(environ: dict[str, str], expected: bool) -> None:
    assert tracing.requested(environ) is expected


# -- across the procrastinate queue ------------------------------------------------------


class Collector:
    """A local OTLP/HTTP receiver: decodes protobuf `ExportTraceServiceRequest`s."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.receive(self.path, body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def receive(self, path: str, body: bytes) -> None:
        assert path == "/v1/traces", path
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        nodes = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    nodes.append(
                        Node(
                            name=span.name,
                            trace_id=int.from_bytes(span.trace_id, "big"),
                            span_id=int.from_bytes(span.span_id, "big"),
                            parent_id=(
                                int.from_bytes(span.parent_span_id, "big")
                                if span.parent_span_id
                                else None
                            ),
                            kind=ProtoSpan.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                            attributes=attributes,
                            service=resource.get("service.name", ""),
                        )
                    )
        with self.lock:
            self.nodes.extend(nodes)

    def snapshot(self) -> list[Node]:
        with self.lock:
            return list(self.nodes)

    def __enter__(self) -> Collector:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def queue_database() -> str:
    return fresh_database("tracing")


@pytest.fixture
async def worker(
    queue_database: str, redis_url: str, openai_server: FakeOpenAI, tmp_path: Path
) -> AsyncIterator[Collector]:
    """`mora migrate`, then a real `mora worker` exporting OTLP/HTTP to a local collector."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        {
            "ENVIRONMENT": "test",
            "SECRET_KEY": SECRET,
            "DATABASE_URL": queue_database,
            "REDIS_URL": redis_url,
            "DEEPSEEK_API_URL": openai_server.url,
            "DEEPSEEK_API_KEY": OPENAI_TEST_KEY,
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    migrate = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mora_graphql.cli", "migrate"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stderr.decode()[-3000:]
    with Collector() as collector:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.url
        env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "mora_graphql.cli", "worker"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            yield collector
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            print(log.read_text()[-3000:])


@pytest.mark.postgres
@pytest.mark.redis
async def test_trace_context_crosses_the_queue_to_a_worker_process(
    spans: InMemorySpanExporter,
    worker: Collector,
    queue_database: str,
    redis_url: str,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(Stream(content_chunks=[CODE]), JSON(json.dumps(TIMELINE)))
    settings = make_settings(queue_database, redis_url=redis_url, job_backend="procrastinate")
    async for live in start_server(settings):
        session_id = await create_and_finish(live, subtitles=SRT)

    api = Trace([from_sdk(span) for span in spans.get_finished_spans()])
    operation = graphql_operation(api, "CreateSession")
    assert not api.named(tracing.JOB_SPAN), "the API process ran the job itself"

    def arrived() -> bool:
        names = {node.name for node in worker.snapshot()}
        return tracing.JOB_SPAN in names and set(STAGES) <= names

    await wait_for(arrived)
    await asyncio.sleep(0.5)  # the last batch (SQL after the terminal write)
    remote = Trace(worker.snapshot())
    job = remote.one(tracing.JOB_SPAN)
    assert job.service == "mora-worker"
    assert job.attributes["mora.session_id"] == session_id
    assert job.attributes["mora.job.attempt"] == 0
    # The parent is a span of the API process, inside the createSession operation.
    assert job.trace_id == operation.trace_id
    assert job.parent_id in api.by_id, "the job's parent is not an API span"
    assert operation in [api.by_id[job.parent_id], *api.ancestors(api.by_id[job.parent_id])]
    assert_job_tree(remote, job, openai_server.url)
    # The worker's housekeeping (orphan checks, the event reader) starts no traces of its own.
    assert {node.trace_id for node in remote.nodes} == {job.trace_id}, [
        (node.name, node.parent_id) for node in remote.nodes if node.trace_id != job.trace_id
    ]
