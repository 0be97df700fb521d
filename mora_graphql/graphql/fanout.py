"""GraphQL objects of session events, built once per event and shared by every subscriber.

Execution once per distinct document, and the bytes sent, are the session feed's (`feed.py`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from mora_graphql.events.types import SessionEvent as DomainEvent
from mora_graphql.graphql.events import SessionEvent, to_graphql


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
            self._items[key] = shared
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return shared


SHARED_EVENTS = SharedEvents()
