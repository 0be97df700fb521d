"""The pipeline's cache entries on the real memory and Redis caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from mora_graphql.cache import Cache
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
    assert await store.acquire_lease("k", "a") == "a"
    assert await store.acquire_lease("k", "b") == "a"
    assert await store.acquire_lease("k", "a") == "a"
    await store.release_lease("k", "b")  # not the holder: no effect
    assert await store.acquire_lease("k", "b") == "a"
    await store.release_lease("k", "a")
    assert await store.acquire_lease("k", "b") == "b"


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
