from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry

from mora_graphql.events.types import SessionEvent as DomainEvent
from mora_graphql.graphql.context import Info
from mora_graphql.graphql.events import SessionEvent, to_graphql
from mora_graphql.graphql.fanout import SHARED_EVENTS
from mora_graphql.graphql.feed import Handoff, Pump, Replay


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description=(
            "A snapshot (or, with afterSeq, the events after it), then every later event in "
            "order; completes after the terminal event."
        )
    )
    async def session_progress(
        self, info: Info, session_id: strawberry.ID, after_seq: int | None = None
    ) -> AsyncGenerator[SessionEvent, None]:
        root = info.root_value
        if isinstance(root, Pump):
            # A session feed's standing execution for every subscriber of this document.
            while True:
                item = root.take()
                yield SHARED_EVENTS.get(item) if isinstance(item, DomainEvent) else to_graphql(item)
        if isinstance(root, Replay):
            # A session feed executing one event for every subscriber of this document.
            item = root.item
            yield SHARED_EVENTS.get(item) if isinstance(item, DomainEvent) else to_graphql(item)
            return
        service = info.context.session_service()
        limiter = info.context.deps.limiter
        if isinstance(root, Handoff):
            # The start runs here, per subscriber; the live events come from the session feed.
            async for item in root.follow(service, limiter, session_id, after_seq):
                yield SHARED_EVENTS.get(item) if isinstance(item, DomainEvent) else to_graphql(item)
            return
        stream = service.follow(session_id, after_seq)
        async with limiter.subscription_slot(service.principal.user_id):
            async for item in stream:
                yield SHARED_EVENTS.get(item) if isinstance(item, DomainEvent) else to_graphql(item)
