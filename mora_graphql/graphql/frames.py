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

    __slots__ = ("complete", "prefix")

    def __init__(self, protocol: str, operation_id: str) -> None:
        quoted = orjson.dumps(operation_id).decode()
        if protocol == TRANSPORT_WS:
            self.prefix = f'{{"id":{quoted},"type":"next","payload":'
            self.complete = f'{{"id":{quoted},"type":"complete"}}'
        else:
            self.prefix = f'{{"type":"data","id":{quoted},"payload":'
            self.complete = f'{{"type":"complete","id":{quoted}}}'

    def data(self, payload: str) -> str:
        return f"{self.prefix}{payload}}}"
