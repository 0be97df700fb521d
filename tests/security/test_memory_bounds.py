"""In-process maps keyed by clients are bounded: a deleted session frees its retained events,
and rate-limit windows stay within `RATE_LIMIT_MAX_KEYS` however many clients arrive."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from mora_graphql.errors import RateLimited
from mora_graphql.events.bus import MemoryEventBus
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.models import SessionStatus
from mora_graphql.ratelimit import BoundedMemoryStorage, RateLimiter
from tests.conftest import LiveServer, make_settings
from tests.security.conftest import Accounts, insert_session


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


async def test_deleting_a_running_session_frees_its_events(
    live: LiveServer, accounts: Accounts
) -> None:
    bus = live.services.bus
    assert isinstance(bus, MemoryEventBus)
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    sid = uuid.UUID(session_id)
    for seq in range(1, 101):
        await bus.publish(
            SessionEvent(
                session_id=sid,
                seq=seq,
                kind=EventKind.CODE_DELTA,
                at=dt.datetime.now(dt.UTC),
                status=SessionStatus.PROCESSING,
                stage=None,
                progress=0.5,
                text="print()\n",
            ),
            attempt=1,
        )
    assert await bus.last_seq(sid) == 100
    result = await live.gql(
        "mutation($id: ID!) { deleteSession(id: $id) }", {"id": session_id}, accounts.alice.token
    )
    assert result == {"data": {"deleteSession": True}}
    assert await bus.last_seq(sid) == 0
    assert await bus.replay(sid, 0) == []


async def test_rate_limit_windows_are_bounded(sqlite_url: str) -> None:
    limiter = RateLimiter(make_settings(sqlite_url, rate_limit_max_keys=100))
    storage = limiter._storage
    assert isinstance(storage, BoundedMemoryStorage)
    await limiter.hit("1/minute", "ip", "steady")
    for number in range(1_000):
        await limiter.hit("5/minute", "ip", f"2001:db8::{number:x}")
        assert storage.size <= 100
        if number % 20 == 0:  # a client that keeps coming is never the least recently used
            with pytest.raises(RateLimited):
                await limiter.hit("1/minute", "ip", "steady")
    assert storage.size == 100
    await limiter.aclose()
