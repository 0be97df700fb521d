"""Execute each session event once per distinct subscription document, not once per subscriber.

Every subscriber of a session receives the same immutable domain event from the bus. Its
GraphQL object is built once (`SharedEvents`), and `SharedEventExecutionContext` memoises the
execution result of that object per (document, operation, variables): a thousand clients using
the same `sessionProgress` document cost one execution per event. Results with errors are never
shared, and snapshots (per-subscriber state) are not cached.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections import OrderedDict
from typing import Any

from graphql import ExecutionResult
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

from mora_graphql.events.types import SessionEvent as DomainEvent
from mora_graphql.graphql.events import SessionEvent, to_graphql
from mora_graphql.metrics import EVENT_EXECUTIONS

MEMO_ATTRIBUTE = "_mora_shared_results"


class SharedEvents:
    """GraphQL objects for domain events, built once and shared by every subscriber."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Any, int], SessionEvent] = OrderedDict()

    def get(self, event: DomainEvent) -> SessionEvent:
        key = (event.session_id, event.seq)
        shared = self._items.get(key)
        if shared is None:
            shared = to_graphql(event)
            object.__setattr__(shared, MEMO_ATTRIBUTE, {})
            self._items[key] = shared
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return shared


SHARED_EVENTS = SharedEvents()


def _variables_key(values: Any) -> str:
    return json.dumps(values, sort_keys=True, default=str, separators=(",", ":"))


class SharedEventExecutionContext(StrawberryGraphQLCoreExecutionContext):
    def build_per_event_executor(self, payload: Any) -> Any:
        executor = super().build_per_event_executor(payload)
        memo: dict[tuple[str, str | None, str], Any] | None = getattr(payload, MEMO_ATTRIBUTE, None)
        if memo is None or self.operation.loc is None:
            return executor
        key = (
            self.operation.loc.source.body,
            self.operation.name.value if self.operation.name else None,
            _variables_key(self.variable_values.coerced),
        )
        execute = executor.execute_operation

        def execute_once(*args: Any, **kwargs: Any) -> Any:
            shared = memo.get(key)
            if shared is not None:
                EVENT_EXECUTIONS.labels("true").inc()
                # A subscriber that goes away must not cancel the others' shared execution.
                return asyncio.shield(shared) if isinstance(shared, asyncio.Future) else shared
            EVENT_EXECUTIONS.labels("false").inc()
            result = execute(*args, **kwargs)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                memo[key] = task
                task.add_done_callback(lambda done: _forget_failures(memo, key, done))
                return asyncio.shield(task)
            if isinstance(result, ExecutionResult) and not result.errors:
                memo[key] = result
            return result

        executor.execute_operation = execute_once  # type: ignore[method-assign]
        return executor


def _forget_failures(memo: dict[Any, Any], key: Any, task: asyncio.Future[Any]) -> None:
    if task.cancelled() or task.exception() is not None or task.result().errors:
        memo.pop(key, None)
