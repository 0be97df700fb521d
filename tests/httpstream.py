"""Minimal clients of the two HTTP subscription wire formats, written from their specs.

- multipart: Apollo Client's protocol. POST with `Accept: multipart/mixed;subscriptionSpec=1.0`;
  the response boundary comes from its Content-Type; parts are JSON bodies, `{}` heartbeats,
  `{"payload": {...}}` results and `{"payload": null, "errors": [...]}` transport errors; the
  body ends with the closing delimiter `--<boundary>--`.
- graphql-sse, distinct-connections mode: POST with `Accept: text/event-stream`; `next` events
  carry an execution result, `complete` ends the stream, `:` lines are comments.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

MULTIPART = "multipart"
SSE = "sse"
HTTP_PROTOCOLS = (MULTIPART, SSE)
ACCEPT = {
    MULTIPART: 'multipart/mixed;boundary="graphql";subscriptionSpec=1.0,application/json',
    SSE: "text/event-stream",
}


class TransportError(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _boundary(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip('"')
    return "-"


async def _multipart(response: httpx.Response, raw: list[str]) -> AsyncIterator[dict[str, Any]]:
    delimiter = "\r\n--" + _boundary(response.headers["content-type"])
    buffer = "\r\n"
    async for chunk in response.aiter_text():
        raw.append(chunk)
        buffer += chunk
        while True:
            start = buffer.find(delimiter)
            end = buffer.find(delimiter, start + len(delimiter)) if start >= 0 else -1
            if end < 0:
                break
            part = buffer[start + len(delimiter) : end]
            buffer = buffer[end:]
            headers, _, body = part.partition("\r\n\r\n")
            assert "content-type: application/json" in headers.lower(), part
            message = json.loads(body)
            if message == {}:
                raw.append("<heartbeat>")
                continue
            if message.get("payload") is None:
                raise TransportError(message["errors"])
            yield message["payload"]
        if buffer.startswith(delimiter + "--"):
            return
    raise AssertionError(f"the multipart body ended without its closing delimiter: {buffer!r}")


async def _sse(response: httpx.Response, raw: list[str]) -> AsyncIterator[dict[str, Any]]:
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        raw.append(line)
        if line.startswith(":"):
            raw.append("<heartbeat>")
            continue
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            continue
        if event == "next":
            yield json.loads("\n".join(data))
        elif event == "complete":
            return
        event, data = None, []
    raise AssertionError("the event stream ended without a complete event")


async def stream(
    http: httpx.AsyncClient,
    protocol: str,
    query: str,
    variables: dict[str, Any] | None = None,
    token: str | None = None,
    raw: list[str] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield each execution result (`{"data": ..., "errors": ...}`) of a subscription."""
    headers = {"Accept": ACCEPT[protocol]}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = {"query": query, "variables": variables or {}}
    raw = raw if raw is not None else []
    async with http.stream("POST", "/graphql", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["x-accel-buffering"] == "no"
        reader = _multipart if protocol == MULTIPART else _sse
        if protocol == MULTIPART:
            assert response.headers["content-type"].startswith("multipart/mixed")
        else:
            assert response.headers["content-type"].startswith("text/event-stream")
        async for result in reader(response, raw):
            yield result


async def collect(
    http: httpx.AsyncClient,
    protocol: str,
    query: str,
    variables: dict[str, Any] | None = None,
    token: str | None = None,
) -> list[dict[str, Any]]:
    events = []
    async for result in stream(http, protocol, query, variables, token):
        assert not result.get("errors"), result
        events.append(result["data"]["sessionProgress"])
    return events
