"""The pipeline's cache entries on the real memory and Redis caches."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from mora_graphql.cache import Cache, CacheUnavailable, RedisCache
from mora_graphql.models import Platform
from mora_graphql.pipeline.caching import PREFIX, CachedResult, PipelineCache, result_key
from mora_graphql.pipeline.transcript import estimate_tokens, fit_lines
from mora_graphql.providers.subtitles.base import SubtitleLine, Transcript, VideoMeta
from mora_graphql.subtitle_formats import parse_track
from mora_graphql.video_urls import VideoRef
from tests.conftest import make_settings

TRANSCRIPT = Transcript(
    VideoMeta(title="CSV", duration=50.0),
    (SubtitleLine(0, 8, "we load the csv"), SubtitleLine(8, 20, "then average")),
    "youtube",
)


def pipeline_cache(cache: Cache, **overrides: object) -> PipelineCache:
    return PipelineCache(cache, make_settings("sqlite+aiosqlite:///:memory:", **overrides))


async def test_round_trips(cache: Cache) -> None:
    store = pipeline_cache(cache)
    assert await store.transcript("youtube:x") is None
    await store.store_transcript("youtube:x", TRANSCRIPT)
    assert await store.transcript("youtube:x") == TRANSCRIPT
    await store.store_no_subtitles("youtube:y", "no subtitles")
    assert await store.no_subtitles("youtube:y") == "no subtitles"
    ref = VideoRef(
        Platform.BILIBILI, "bilibili:BV1GJ411x7h7", "https://www.bilibili.com/video/BV1GJ411x7h7"
    )
    await store.store_short_link("b23:abc", ref)
    assert await store.short_link("b23:abc") == ref
    result = CachedResult("print(1)", {"segments": [], "source": "MODEL"}, {"ok": True})
    await store.store_result("k", result)
    assert await store.result("k") == result
    assert await cache.get(PREFIX + "result:k") is not None


async def test_lease_has_one_holder(cache: Cache) -> None:
    store = pipeline_cache(cache)
    tokens = [f"{uuid.uuid4()}:1" for _ in range(20)]
    holders = await asyncio.gather(*(store.claim_lease("k", token) for token in tokens))
    winner = holders[0]
    assert winner in tokens and set(holders) == {winner}
    other = next(token for token in tokens if token != winner)
    assert await store.claim_lease("k", winner) == winner
    assert await store.claim_lease("k", other) == winner


async def test_only_the_holder_extends_or_releases_the_lease(cache: Cache) -> None:
    store = pipeline_cache(cache)
    assert await store.claim_lease("k", "a:1") == "a:1"
    assert await store.release_lease("k", "b:1") is False
    assert await store.refresh_lease("k", "b:1") is False
    assert await store.take_over_lease("k", "b:1", "b:1") is False
    assert await store.claim_lease("k", "b:1") == "a:1"
    # A take-over replaces exactly the stale token; the former holder can no longer touch it.
    assert await store.take_over_lease("k", "a:1", "b:1") is True
    assert await store.release_lease("k", "a:1") is False
    assert await store.refresh_lease("k", "a:1") is False
    assert await store.claim_lease("k", "a:1") == "b:1"
    assert await store.refresh_lease("k", "b:1") is True
    assert await store.release_lease("k", "b:1") is True
    assert await store.claim_lease("k", "a:2") == "a:2"


async def test_a_lease_expires_unless_extended(cache: Cache) -> None:
    assert await cache.claim("lease", "a", 0.3) == "a"
    await asyncio.sleep(0.2)
    assert await cache.extend("lease", "a", 0.3) is True
    await asyncio.sleep(0.2)
    assert await cache.claim("lease", "b", 0.3) == "a"
    await asyncio.sleep(0.2)
    assert await cache.extend("lease", "a", 0.3) is False
    assert await cache.claim("lease", "b", 0.3) == "b"


async def test_an_unreadable_lease_is_never_ours() -> None:
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    store = pipeline_cache(RedisCache(client))
    try:
        with pytest.raises(CacheUnavailable):
            await store.claim_lease("k", "a:1")
        with pytest.raises(CacheUnavailable):
            await store.refresh_lease("k", "a:1")
        with pytest.raises(CacheUnavailable):
            await store.release_lease("k", "a:1")
    finally:
        await client.aclose()


async def test_disabled_cache_stores_nothing(cache: Cache) -> None:
    store = pipeline_cache(cache, enable_cache=False)
    await store.store_transcript("youtube:x", TRANSCRIPT)
    await store.store_result("k", CachedResult("x", {}, None))
    assert await store.transcript("youtube:x") is None
    assert await store.result("k") is None
    assert await cache.get(PREFIX + "subs:youtube:x") is None


async def test_malformed_entries_are_misses(cache: Cache) -> None:
    store = pipeline_cache(cache)
    await cache.set(PREFIX + "subs:youtube:x", "{not json", 60)
    await cache.set(PREFIX + "result:k", '{"code": "", "timeline": {}}', 60)
    assert await store.transcript("youtube:x") is None
    assert await store.result("k") is None


def test_result_key_depends_on_every_input() -> None:
    base = result_key(TRANSCRIPT, "python", "deepseek-v4-flash")
    assert base == result_key(TRANSCRIPT, "python", "deepseek-v4-flash")
    assert len(base) == 64
    other_lines = Transcript(TRANSCRIPT.info, (SubtitleLine(0, 8, "we load the json"),), "youtube")
    assert (
        len(
            {
                base,
                result_key(TRANSCRIPT, "go", "deepseek-v4-flash"),
                result_key(TRANSCRIPT, "python", "other-model"),
                result_key(other_lines, "python", "deepseek-v4-flash"),
            }
        )
        == 4
    )
    # The source does not matter: the same text from another provider hits.
    same = Transcript(TRANSCRIPT.info, TRANSCRIPT.lines, "bibigpt")
    assert result_key(same, "python", "deepseek-v4-flash") == base


@pytest.mark.parametrize("budget", [500, 2_000, 8_000, 100_000])
def test_fit_lines_covers_the_whole_course_within_budget(budget: int) -> None:
    course = parse_track(
        "json3",
        (Path(__file__).resolve().parent.parent / "fixtures" / "course_2h.json3").read_text(),
    )
    lines = fit_lines(course, budget)
    assert estimate_tokens("\n".join(lines)) <= max(budget, 48)
    assert lines[0].startswith("[0:00]")
    assert lines[-1].startswith(("[2:0", "[1:5"))
