from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry

from mora_graphql.errors import BadUserInput, NotFound
from mora_graphql.events.stream import follow_session
from mora_graphql.events.types import SessionEvent as DomainEvent
from mora_graphql.graphql.context import Info
from mora_graphql.graphql.events import SessionEvent, to_graphql
from mora_graphql.graphql.fanout import SHARED_EVENTS
from mora_graphql.graphql.feed import Handoff, Replay
from mora_graphql.sessions.service import parse_id


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
        if isinstance(root, Replay):
            # A session feed executing one event for every subscriber of this document.
            item = root.item
            yield SHARED_EVENTS.get(item) if isinstance(item, DomainEvent) else to_graphql(item)
            return
        principal = info.context.require_user()
        if after_seq is not None and after_seq < 0:
            raise BadUserInput("afterSeq must not be negative.", extensions={"field": "afterSeq"})
        ident = parse_id(session_id)
        if ident is None:
            raise NotFound("Session not found.")
        services = info.context.services
        owner_id = None if principal.is_admin else principal.user_id
        if isinstance(root, Handoff):
            # The start runs here, per subscriber; the live events come from the session feed.
            start = root.follow(
                services.db,
                services.bus,
                services.limiter,
                ident,
                owner_id=owner_id,
                user_id=principal.user_id,
                after_seq=after_seq,
            )
            async for item in start:
                yield SHARED_EVENTS.get(item) if isinstance(item, DomainEvent) else to_graphql(item)
            return
        stream = follow_session(
            services.db, services.bus, ident, owner_id=owner_id, after_seq=after_seq
        )
        async with services.limiter.subscription_slot(principal.user_id):
            async for item in stream:
                yield SHARED_EVENTS.get(item) if isinstance(item, DomainEvent) else to_graphql(item)
