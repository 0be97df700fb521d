"""Wire frames of both GraphQL-over-WebSocket protocols, built by splicing pre-encoded JSON.

A live event's `payload` is encoded once per distinct document; each subscriber's frame is that
text between its own prefix (which carries its operation id) and a closing brace.
"""

from __future__ import annotations

from typing import Any

import orjson
from strawberry.types.execution import ExecutionResult

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"


def encode_payload(result: ExecutionResult) -> str:
    """The `payload` of a `next` (graphql-transport-ws) or `data` (graphql-ws) message."""
    payload: dict[str, Any] = {"data": result.data}
    if result.errors:
        payload["errors"] = [error.formatted for error in result.errors]
    if result.extensions:
        payload["extensions"] = result.extensions
    return orjson.dumps(payload).decode()


class Frames:
    """The frames of one operation: `data(payload)` and `complete`."""

    __slots__ = ("complete", "prefix", "suffix")

    def __init__(self, protocol: str, operation_id: str) -> None:
        quoted = orjson.dumps(operation_id).decode()
        self.suffix = "}"
        if protocol == TRANSPORT_WS:
            self.prefix = f'{{"id":{quoted},"type":"next","payload":'
            self.complete = f'{{"id":{quoted},"type":"complete"}}'
        else:
            self.prefix = f'{{"type":"data","id":{quoted},"payload":'
            self.complete = f'{{"type":"complete","id":{quoted}}}'

    def data(self, payload: str) -> str:
        return f"{self.prefix}{payload}{self.suffix}"


MULTIPART_BOUNDARY = "-"
_PART = "\r\nContent-Type: application/json\r\n\r\n"


class StreamFrames(Frames):
    """The chunks of one HTTP streaming response: multipart (Apollo's subscription protocol,
    boundary `-`) or graphql-sse's distinct-connections mode. `opening` starts the body,
    `heartbeat` keeps proxies from closing a quiet stream, `error(errors)` is a transport-level
    error (the token expired), `complete` ends the body."""

    __slots__ = ("heartbeat", "opening", "protocol")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        if protocol == MULTIPART:
            end = f"\r\n--{MULTIPART_BOUNDARY}"
            self.opening = f"--{MULTIPART_BOUNDARY}"
            self.prefix = _PART + '{"payload":'
            self.suffix = "}" + end
            self.heartbeat = _PART + "{}" + end
            self.complete = "--\r\n"
        else:
            self.opening = ""
            self.prefix = "event: next\ndata: "
            self.suffix = "\n\n"
            self.heartbeat = ":\n\n"
            self.complete = "event: complete\ndata:\n\n"

    def error(self, errors: list[Any]) -> str:
        if self.protocol == MULTIPART:
            body = orjson.dumps({"payload": None, "errors": errors}).decode()
            return f"{_PART}{body}\r\n--{MULTIPART_BOUNDARY}"
        return self.data(orjson.dumps({"errors": errors}).decode())


MULTIPART = "multipart-subscription"
SSE = "graphql-sse"
