"""A real API process whose pub/sub connection Redis drops for its output-buffer limit."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from mora_graphql.events.bus import Published
from mora_graphql.events.redis_bus import RedisEventBus
from mora_graphql.events.types import EventKind
from tests.distributed.cluster import (
    SRT,
    Mora,
    RedisServer,
    create_session,
    dumped_on_failure,
    follow,
    mora_env,
    register,
    video_url,
)
from tests.distributed.databases import fresh_database
from tests.rows import bus_event
from tests.wsclient import LEGACY_WS, TRANSPORT_WS

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

BURST = 1_000
SIZE = 8_000


def delta(seq: int) -> str:
    return f"{seq:06d}".ljust(SIZE, "x") + "\n"


async def test_websocket_subscribers_lose_nothing_when_redis_drops_the_pubsub(
    tmp_path: Path,
) -> None:
    """The API process is stopped (SIGSTOP) while 8 MB of events are published; Redis drops
    its pub/sub connection (`pubsub 64kb 32kb 1`). Once it runs again, every WebSocket
    subscriber, on both protocols, gets every event in order on its own connection."""
    database = fresh_database("pubsub_buffer")
    redis = RedisServer(tmp_path).start()
    admin = Redis.from_url(redis.url())
    await admin.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
    mora = Mora(mora_env(database, redis.url(), "http://127.0.0.1:9/v1"), tmp_path)
    try:
        with dumped_on_failure(mora):
            await mora.start(apis=1, workers=0)
            async with httpx.AsyncClient(base_url=mora.apis[0], timeout=60) as http:
                token = await register(http)
                sid = await create_session(http, token, video_url=video_url(1), subtitles=SRT)
            followers = [
                asyncio.create_task(follow(mora.ws(0), protocol, token, sid))
                for protocol in (TRANSPORT_WS, LEGACY_WS, TRANSPORT_WS)
            ]
            bus = RedisEventBus(admin)
            channel = f"{bus.prefix}{sid}"
            for _ in range(500):
                [(_, count)] = await admin.pubsub_numsub(channel)
                if count:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)  # every follower has its snapshot and joined the feed

            api = mora.pids()["api0"]
            os.kill(api, signal.SIGSTOP)
            try:
                session_id = uuid.UUID(sid)
                for seq in range(1, BURST + 1):
                    published = await bus.publish(bus_event(session_id, seq, delta(seq)), attempt=1)
                    assert published is Published.OK
                ended = bus_event(session_id, BURST + 1, "", EventKind.COMPLETED)
                assert await bus.publish(ended, attempt=1) is Published.OK
                await asyncio.sleep(1.5)
            finally:
                os.kill(api, signal.SIGCONT)

            results = await asyncio.wait_for(asyncio.gather(*followers), 90)
            log = redis.log.read_text(errors="replace")
            assert "overcoming of output buffer limits" in log
            expected = "".join(delta(seq) for seq in range(1, BURST + 1))
            for followed in results:
                assert followed.problems() == []
                assert followed.drops == []  # recovered inside the process, no resume needed
                assert followed.code() == expected
                assert followed.events[-1]["seq"] == BURST + 1
    finally:
        mora.stop()
        await admin.aclose()
        redis.stop()
