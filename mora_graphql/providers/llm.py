"""A thin wrapper around the OpenAI SDK for DeepSeek's OpenAI-compatible chat API.

The SDK's own retries are off (`max_retries=0`): callers retry with `with_retries`,
which only retries errors whose `retryable` is True.

Streamed answers go through the SDK's client (base URL, auth, timeouts, status errors) but
their server-sent events are decoded here, with orjson into plain dicts: building the SDK's
pydantic chunk models was most of the client's CPU per streamed token (`bench/llm_chunks.py`).
Model text is handed on as `storable_text` (no NUL, which a prompt can ask for and PostgreSQL
cannot store), so what the run streams is what it stores.
Transport failures and `error` objects inside the stream are raised as the SDK's own
exception types, so `_translate` maps every failure in one place.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, cast
from urllib.parse import urlsplit

import httpx
import httpx2
import openai
import orjson
from openai.types.chat import ChatCompletionMessageParam

from mora_graphql.config import Settings
from mora_graphql.db import storable_text
from mora_graphql.errors import ErrorCode
from mora_graphql.providers.sse import sse_data
from mora_graphql.providers.transport import LeanTransport
from mora_graphql.tracing import enabled as tracing_enabled
from mora_graphql.tracing import llm_call, llm_stream

_STATUS_MESSAGES: dict[int, tuple[str, bool]] = {
    400: ("the LLM API rejected the request as invalid (400)", False),
    401: ("the LLM API rejected the API key", False),
    402: ("the LLM account has insufficient balance", False),
    403: ("the LLM API denied access to this model or endpoint (403)", False),
    404: ("the LLM model or endpoint was not found (404); check the model name and URL", False),
    422: ("the LLM API rejected the request parameters (422)", False),
    429: ("the LLM API rate limit was reached (429)", True),
}
_SECRETISH = re.compile(r"\b(?:sk|pk|key)-[A-Za-z0-9_\-*]{6,}", re.IGNORECASE)
_MAX_DETAIL = 300


@dataclass(frozen=True)
class LLMChunk:
    kind: Literal["content", "reasoning"]
    text: str


@dataclass
class Usage:
    """Token accounting; `calls` counts calls that completed successfully."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    calls: int = 0

    def add(
        self,
        other: Usage | None = None,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_tokens: int = 0,
        calls: int = 0,
    ) -> None:
        if other is not None:
            prompt_tokens += other.prompt_tokens
            completion_tokens += other.completion_tokens
            cached_tokens += other.cached_tokens
            calls += other.calls
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cached_tokens += cached_tokens
        self.calls += calls

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class LLMError(Exception):
    """A failed LLM call. The message never contains the API key."""

    code: ErrorCode = ErrorCode.DEEPSEEK_API_ERROR

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return (
            f"LLMError({self.message!r}, retryable={self.retryable}, status={self.status}, "
            f"retry_after={self.retry_after})"
        )


class LLMClient:
    def __init__(
        self,
        settings: Settings,
        http_client: httpx2.AsyncClient | httpx.AsyncClient | None = None,
    ) -> None:
        self._settings = settings
        key = settings.deepseek_api_key.get_secret_value() if settings.deepseek_api_key else ""
        self._api_key = key
        self._owns_http_client = http_client is None
        self._server = urlsplit(settings.deepseek_api_url).hostname  # for trace spans
        self._client: openai.AsyncOpenAI | None = None
        if key and http_client is None and not tracing_enabled():
            # (With tracing on, httpx's own transport records each request's client span.)
            http_client = httpx2.AsyncClient(
                transport=LeanTransport(),
                timeout=settings.deepseek_timeout,
                follow_redirects=True,
            )
        if key:
            self._client = openai.AsyncOpenAI(
                api_key=key,
                base_url=settings.deepseek_api_url,
                timeout=settings.deepseek_timeout,
                max_retries=0,
                # The SDK accepts legacy httpx clients at runtime; its annotation is httpx2's.
                http_client=cast(httpx2.AsyncClient | None, http_client),
            )

    @property
    def model(self) -> str:
        return self._settings.deepseek_model

    def _openai(self) -> openai.AsyncOpenAI:
        if self._client is None:
            raise LLMError(
                "the LLM API key is not configured (set DEEPSEEK_API_KEY)", retryable=False
            )
        return self._client

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        usage: Usage | None = None,
    ) -> AsyncIterator[LLMChunk]:
        """Yield reasoning and content deltas; raises LLMError, also for truncated streams."""
        stream = self._stream_chat(messages, max_tokens=max_tokens, usage=usage)
        if not tracing_enabled():
            return stream
        return llm_stream(stream, self.model, server=self._server, usage=usage)

    async def _stream_chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None,
        usage: Usage | None,
    ) -> AsyncIterator[LLMChunk]:
        client = self._openai()
        finish_reason: str | None = None
        try:
            # The raw response: the SDK still sends the request and raises status errors.
            request = client.chat.completions.with_streaming_response.create(
                model=self.model,
                messages=cast(list[ChatCompletionMessageParam], messages),
                stream=True,
                stream_options={"include_usage": True},
                temperature=self._settings.deepseek_temperature,
                max_tokens=max_tokens or self._settings.llm_max_output_tokens,
            )
            async with (
                request as response,
                aclosing(sse_data(response.http_response)) as events,
            ):
                async for payloads in events:
                    chunks, reason, failure = _read_events(
                        payloads, response.http_response.request, usage
                    )
                    if reason is not None:
                        finish_reason = reason
                    for text_chunk in chunks:
                        yield text_chunk
                    if failure is not None:
                        raise failure
        except openai.APIConnectionError as exc:
            # Losing only the trailer (usage chunk / [DONE]) after the finish chunk
            # still leaves a complete answer.
            if finish_reason is None:
                raise self._translate(exc) from None
        except openai.OpenAIError as exc:
            raise self._translate(exc) from None
        except ValueError as exc:  # malformed SSE data (orjson.JSONDecodeError)
            raise LLMError("the LLM API sent malformed stream data", retryable=True) from exc
        if finish_reason is None:
            raise LLMError(
                "the LLM stream ended before the answer was complete (connection cut)",
                retryable=True,
            )
        if usage is not None:
            usage.add(calls=1)

    async def complete_json(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        usage: Usage | None = None,
    ) -> str:
        """One non-streamed JSON-mode completion; returns the message content string."""
        with llm_call(self.model, server=self._server, usage=usage):
            return await self._complete_json(messages, max_tokens=max_tokens, usage=usage)

    async def _complete_json(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None,
        usage: Usage | None,
    ) -> str:
        client = self._openai()
        body = {
            "model": self.model,
            "messages": messages,
            "response_format": {"type": "json_object"},
            "temperature": self._settings.deepseek_temperature,
            "max_tokens": max_tokens or self._settings.llm_max_output_tokens,
        }
        try:
            # The SDK's client sends it and raises status errors; the body goes as it is and
            # the answer is read with orjson: the SDK's request transform and response models
            # were most of the CPU of a timeline call.
            raw = await client.post("/chat/completions", body=body, cast_to=bytes)
            response = orjson.loads(raw)
        except openai.OpenAIError as exc:
            raise self._translate(exc) from None
        except ValueError as exc:  # the HTTP body was not JSON
            raise LLMError("the LLM API returned an invalid JSON body", retryable=True) from exc
        if not isinstance(response, dict):
            raise LLMError("the LLM API returned a non-JSON response", retryable=True)
        choices = response.get("choices")
        if not isinstance(choices, list) or not choices:
            raise LLMError("the LLM API returned no choices", retryable=True)
        first = choices[0]
        message = first.get("message") if isinstance(first, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content:
            content = storable_text(content)
        if not isinstance(content, str) or not content.strip():
            raise LLMError("the LLM returned an empty answer", retryable=True)
        if usage is not None:
            reported = response.get("usage")
            if isinstance(reported, dict):
                _record_usage(usage, reported)
            usage.add(calls=1)
        return content

    async def aclose(self) -> None:
        """Close the SDK client; a caller-supplied http_client is left open."""
        if self._client is not None and self._owns_http_client:
            await self._client.close()

    def _translate(self, exc: openai.OpenAIError) -> LLMError:
        if isinstance(exc, openai.APITimeoutError):
            return LLMError(
                f"the LLM API did not answer within {self._settings.deepseek_timeout:g}s",
                retryable=True,
            )
        if isinstance(exc, openai.APIConnectionError):
            cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
            return LLMError(
                f"the connection to the LLM API failed or was cut ({cause})", retryable=True
            )
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            detail = self._detail(exc)
            retry_after = _retry_after(exc.response.headers)
            known = _STATUS_MESSAGES.get(status)
            if known is not None:
                message, retryable = known
            elif status >= 500:
                message, retryable = f"the LLM API had a server error ({status})", True
            else:
                message, retryable = f"the LLM API request failed ({status})", False
            if detail and status not in (401, 402):
                message = f"{message}: {detail}"
            return LLMError(message, retryable=retryable, status=status, retry_after=retry_after)
        if isinstance(exc, openai.APIResponseValidationError):
            return LLMError("the LLM API returned an unexpected response", retryable=True)
        if isinstance(exc, openai.APIError):
            # An error event inside an otherwise successful stream.
            detail = self._detail(exc)
            message = "the LLM API reported an error mid-stream"
            return LLMError(f"{message}: {detail}" if detail else message, retryable=True)
        return LLMError(f"the LLM call failed ({type(exc).__name__})", retryable=False)

    def _detail(self, exc: openai.APIError) -> str:
        body = exc.body
        text: object = None
        if isinstance(body, dict):
            text = body.get("message")
        elif isinstance(body, str):
            text = body
        if not isinstance(text, str) or not text.strip():
            return ""
        return self._redact(" ".join(text.split()))[:_MAX_DETAIL]

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _SECRETISH.sub("***", text)


def _stream_error(error: object, request: httpx2.Request) -> openai.APIError:
    """An `{"error": {...}}` event inside a successful stream, as the SDK reports it."""
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        message = "An error occurred during streaming"
    return openai.APIError(message, request, body=error)


def _read_events(
    payloads: list[bytes], request: httpx2.Request, usage: Usage | None
) -> tuple[list[LLMChunk], str | None, Exception | None]:
    """The text of the events one read of the stream completed, one chunk per run of the same
    kind (a run then handles a read's tokens at once); the last finish reason; and the failure
    that ended the stream among them (raised after the text before it)."""
    chunks: list[LLMChunk] = []
    texts: list[str] = []
    kind: Literal["reasoning", "content"] | None = None
    finish_reason: str | None = None
    failure: Exception | None = None
    for payload in payloads:
        try:
            chunk = orjson.loads(payload)
            if not isinstance(chunk, dict):
                raise ValueError("a stream event is not a JSON object")
        except ValueError as exc:  # malformed SSE data (orjson.JSONDecodeError)
            failure = exc
            break
        error = chunk.get("error")
        if error:
            failure = _stream_error(error, request)
            break
        reported = chunk.get("usage")
        if usage is not None and isinstance(reported, dict):
            _record_usage(usage, reported)
        for part_kind, text, reason in _chunk_parts(chunk):
            if reason is not None:
                finish_reason = reason
            if part_kind is None:
                continue
            if part_kind != kind and texts:
                chunks.append(LLMChunk(kind or part_kind, "".join(texts)))
                texts.clear()
            kind = part_kind
            texts.append(text)
    if texts and kind is not None:
        chunks.append(LLMChunk(kind, "".join(texts)))
    return chunks, finish_reason, failure


_Part = tuple[Literal["reasoning", "content"] | None, str, str | None]


def _chunk_parts(chunk: dict[str, Any]) -> list[_Part]:
    """The text of a chunk's first choice, by kind, and its finish reason (kind None)."""
    parts: list[_Part] = []
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return parts
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and (reasoning := storable_text(reasoning)):
                parts.append(("reasoning", reasoning, None))
            content = delta.get("content")
            if isinstance(content, str) and (content := storable_text(content)):
                parts.append(("content", content, None))
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            parts.append((None, "", reason))
    return parts


def _record_usage(usage: Usage, reported: Mapping[str, Any]) -> None:
    """Add one reported `usage` object (of a streamed chunk or of a completion)."""
    prompt = reported.get("prompt_tokens")
    completion = reported.get("completion_tokens")
    cached = reported.get("prompt_cache_hit_tokens")  # DeepSeek
    details = reported.get("prompt_tokens_details")
    if not _is_count(cached) and isinstance(details, Mapping):
        cached = details.get("cached_tokens")
    usage.add(
        prompt_tokens=prompt if _is_count(prompt) else 0,
        completion_tokens=completion if _is_count(completion) else 0,
        cached_tokens=cached if _is_count(cached) else 0,
    )


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _retry_after(headers: httpx2.Headers | httpx.Headers) -> float | None:
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if seconds >= 0 and seconds == seconds and seconds != float("inf"):
            return seconds
    return None
