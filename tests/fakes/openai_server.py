"""A scriptable OpenAI-compatible `/chat/completions` server (DeepSeek flavoured).

Scripts are consumed FIFO, one per request:

    server.enqueue(Stream(content_chunks=["a", "b"]), Fail(429, retry_after=0))

When the FIFO is empty, `default` (a function of the parsed request body) answers;
without one the server answers 500 so a missing script is obvious.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.server import AbruptDisconnect, FakeService

MODEL = "deepseek-v4-flash"


@dataclass
class Stream:
    """A streamed reply: reasoning deltas first, then content deltas.

    `disconnect_after=n` drops the TCP connection after n deltas (incomplete chunked body);
    `truncate_after=n` ends the HTTP body cleanly after n deltas, with no finish chunk
    and no `[DONE]`. `error_after=n` sends an in-stream `{"error": {...}}` event after
    n deltas and ends the body. `drop_trailer=True` drops the connection right after
    the finish chunk (no usage chunk, no `[DONE]`). `done=False` omits `[DONE]` only.
    """

    content_chunks: list[str] = field(default_factory=list)
    reasoning_chunks: list[str] = field(default_factory=list)
    chunk_delay: float = 0.0
    disconnect_after: int | None = None
    truncate_after: int | None = None
    finish_reason: str = "stop"
    usage: dict[str, Any] | None = None
    done: bool = True
    error_after: int | None = None
    error_message: str = "Internal error while generating"
    drop_trailer: bool = False


@dataclass
class JSON:
    """A non-streamed completion whose message content is `text` (any text, even garbage).

    `raw_body=True` sends `text` itself as the HTTP body instead of a completion object.
    """

    text: str
    reasoning: str | None = None
    finish_reason: str = "stop"
    usage: dict[str, Any] | None = None
    raw_body: bool = False


@dataclass
class Fail:
    """An OpenAI-style error reply: `{"error": {"message", "type", "code"}}`."""

    status: int
    message: str | None = None
    type: str | None = None
    code: str | None = None
    retry_after: float | None = None
    body: Any = None


@dataclass
class Hang:
    """Send nothing for `seconds` (or until the client goes away), then answer `then`."""

    seconds: float
    then: Script | None = None


Script = Stream | JSON | Fail | Hang
DefaultResponder = Callable[[dict[str, Any]], "Script | str"]

_DEFAULT_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("Invalid request", "invalid_request_error", "invalid_request"),
    401: (
        "Authentication Fails, Your api key: ****abcd is invalid",
        "authentication_error",
        "invalid_api_key",
    ),
    402: ("Insufficient Balance", "unknown_error", "invalid_request_error"),
    403: ("Permission denied", "permission_error", "forbidden"),
    404: ("Model not found", "invalid_request_error", "model_not_found"),
    422: ("Invalid parameters", "invalid_request_error", "invalid_parameters"),
    429: ("Rate Limit Reached", "rate_limit_error", "rate_limit_exceeded"),
    500: ("Internal server error", "server_error", "internal_error"),
    502: ("Bad gateway", "server_error", "bad_gateway"),
    503: ("Server overloaded, please retry shortly", "server_error", "overloaded"),
}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    json: Any

    @property
    def messages(self) -> list[dict[str, Any]]:
        body = self.json if isinstance(self.json, dict) else {}
        messages = body.get("messages", [])
        return messages if isinstance(messages, list) else []


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages") or []
    chars = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    return max(1, chars // 4)


def default_usage(body: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
    prompt = estimate_prompt_tokens(body)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": prompt,
    }


def reply_with(body: dict[str, Any], text: str, *, chunk_size: int = 16) -> Script:
    """The natural reply carrying `text`: a Stream when the request streams, else JSON."""
    if body.get("stream"):
        chunks = [text[i : i + chunk_size] for i in range(0, len(text), chunk_size)]
        return Stream(content_chunks=chunks)
    return JSON(text)


class FakeOpenAI(FakeService):
    """Owns the script FIFO and the request log; `app` is the ASGI app to serve."""

    def __init__(self, *, api_key: str | None = None, model: str = MODEL) -> None:
        self.api_key = api_key
        self.model = model
        self.default: DefaultResponder | None = None
        self._lock = threading.Lock()
        self._scripts: deque[Script] = deque()
        self._requests: list[RecordedRequest] = []
        route = Route("/chat/completions", self._chat, methods=["POST"])
        route_v1 = Route("/v1/chat/completions", self._chat, methods=["POST"])
        self.app = Starlette(routes=[route, route_v1])

    # -- scripting (any thread) -------------------------------------------------------

    def enqueue(self, *scripts: Script) -> None:
        with self._lock:
            self._scripts.extend(scripts)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._requests.clear()
            self.default = None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._scripts)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    # -- lifecycle --------------------------------------------------------------------

    # -- HTTP -------------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            self._requests.append(RecordedRequest(request.method, request.url.path, headers, body))
            script: Script | str | None = self._scripts.popleft() if self._scripts else None
            default = self.default
        if not isinstance(body, dict):
            return _error(400, "request body is not a JSON object", "invalid_request_error")
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, *_DEFAULT_ERRORS[401][:2], code="invalid_api_key")
        if script is None and default is not None:
            script = default(body)
        if script is None:
            return _error(500, "fake OpenAI server: no scripted response left", "server_error")
        if isinstance(script, str):
            script = reply_with(body, script)
        return await self._answer(request, body, script)

    async def _answer(self, request: Request, body: dict[str, Any], script: Script) -> Response:
        if isinstance(script, Hang):
            deadline = time.monotonic() + script.seconds
            while time.monotonic() < deadline:
                if await request.is_disconnected():
                    return Response(status_code=499)
                await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
            if script.then is None:
                return _error(504, "fake OpenAI server: hang finished", "server_error")
            return await self._answer(request, body, script.then)
        if isinstance(script, Fail):
            return self._fail(script)
        if isinstance(script, JSON):
            return self._json(body, script)
        if body.get("stream"):
            return StreamingResponse(
                self._sse(body, script),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        # A Stream script answering a non-streaming request: join it.
        return self._json(
            body,
            JSON(
                "".join(script.content_chunks),
                reasoning="".join(script.reasoning_chunks) or None,
                finish_reason=script.finish_reason,
                usage=script.usage,
            ),
        )

    def _fail(self, script: Fail) -> Response:
        headers: dict[str, str] = {}
        if script.retry_after is not None:
            headers["retry-after"] = f"{script.retry_after:g}"
        if script.body is not None:
            return JSONResponse(script.body, status_code=script.status, headers=headers)
        message, type_, code = _DEFAULT_ERRORS.get(
            script.status, ("Unexpected error", "server_error", "unknown")
        )
        return _error(
            script.status,
            script.message or message,
            script.type or type_,
            code=script.code or code,
            headers=headers,
        )

    def _json(self, body: dict[str, Any], script: JSON) -> Response:
        if script.raw_body:
            return Response(script.text, media_type="application/json")
        message: dict[str, Any] = {"role": "assistant", "content": script.text}
        if script.reasoning is not None:
            message["reasoning_content"] = script.reasoning
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": script.finish_reason,
                }
            ],
            "usage": script.usage or default_usage(body, max(1, len(script.text) // 4)),
        }
        return JSONResponse(payload)

    async def _sse(self, body: dict[str, Any], script: Stream) -> AsyncIterator[bytes]:
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = body.get("model") or self.model

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if usage is not None:
                payload["choices"] = []
                payload["usage"] = usage
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for sent, delta in enumerate(self._deltas(script)):
            if script.disconnect_after is not None and sent >= script.disconnect_after:
                raise AbruptDisconnect
            if script.truncate_after is not None and sent >= script.truncate_after:
                return
            if script.error_after is not None and sent >= script.error_after:
                yield _error_event(script.error_message)
                return
            if script.chunk_delay:
                await asyncio.sleep(script.chunk_delay)
            yield chunk(delta)
        if script.disconnect_after is not None:
            raise AbruptDisconnect
        if script.truncate_after is not None:
            return
        if script.error_after is not None:
            yield _error_event(script.error_message)
            return
        yield chunk({}, finish=script.finish_reason)
        if script.drop_trailer:
            raise AbruptDisconnect
        options = body.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            completion_tokens = len(script.content_chunks) + len(script.reasoning_chunks)
            yield chunk({}, usage=script.usage or default_usage(body, completion_tokens))
        if script.done:
            yield b"data: [DONE]\n\n"

    @staticmethod
    def _deltas(script: Stream) -> Iterator[dict[str, Any]]:
        for text in script.reasoning_chunks:
            yield {"content": None, "reasoning_content": text}
        for text in script.content_chunks:
            yield {"content": text}


def _error_event(message: str) -> bytes:
    error = {"message": message, "type": "server_error", "param": None, "code": "internal_error"}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


def _error(
    status: int,
    message: str,
    type_: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": None, "code": code}},
        status_code=status,
        headers=headers,
    )


@contextmanager
def running_openai_server(*, api_key: str | None = None) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=api_key) as server:
        yield server
