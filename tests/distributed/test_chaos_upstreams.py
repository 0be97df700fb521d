"""30% of LLM and subtitle requests fail at random: 429, 5xx, timeouts, dropped connections."""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tests.distributed.cluster import (
    Mora,
    RedisServer,
    create_session,
    dumped_on_failure,
    mora_env,
    register,
    sql,
    video_url,
    wait_settled,
)
from tests.distributed.databases import fresh_database
from tests.fakes.bibigpt_server import (
    API_KEY,
    BibiScript,
    FakeBibiGPT,
    HttpError,
    Slow,
    Subtitles,
)
from tests.fakes.fixtures import OPENAI_TEST_KEY
from tests.fakes.openai_server import JSON, Fail, FakeOpenAI, Hang, Script, Stream
from tests.fakes.server import AbruptDisconnect

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

SESSIONS = 40
FAILURE_RATE = 0.3
TIMEOUT = 2  # DEEPSEEK_TIMEOUT and BIBIGPT_TIMEOUT, seconds; a hang lasts twice as long
CODE = "\n".join(f"def step_{i}():\n    return {i}\n" for i in range(30))
TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 60, "description": "all", "startLine": 1, "endLine": 3}
    ]
}
LINES = [(0.0, 30.0, "define the steps one by one"), (30.0, 60.0, "return each number")]


class Dice:
    """A seeded source of failures shared by both fake servers (thread-safe)."""

    def __init__(self, seed: int, rate: float) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.rate = rate
        self.thrown: Counter[str] = Counter()

    def roll(self, server: str, kinds: tuple[str, ...]) -> str | None:
        with self._lock:
            failing = self._rng.random() < self.rate
            kind = self._rng.choice(kinds)
            depth = self._rng.randrange(1, 8)
            self.thrown[f"{server}:{kind if failing else 'ok'}"] += 1
        return f"{kind}:{depth}" if failing else None


class FlakyBibiGPT(FakeBibiGPT):
    """BibiGPT answering every URL with subtitles, except when the dice say otherwise."""

    def __init__(self, dice: Dice) -> None:
        super().__init__()
        self.dice = dice

    async def _answer(self, request: Request, script: BibiScript) -> Response:
        failure = self.dice.roll("bibigpt", ("429", "500", "503", "timeout", "disconnect"))
        ok = Subtitles(LINES, duration=60.0)
        if failure is None:
            return await super()._answer(request, ok)
        kind = failure.split(":")[0]
        if kind == "timeout":
            return await super()._answer(request, Slow(TIMEOUT * 2, then=ok))
        if kind == "disconnect":
            return StreamingResponse(_cut_short(), media_type="application/json")
        return await super()._answer(request, HttpError(int(kind), retry_after=0))


async def _cut_short() -> AsyncIterator[bytes]:
    yield b'{"success": true, "detail": {"title": "A tu'
    raise AbruptDisconnect


def llm(dice: Dice) -> Any:
    chunks = [CODE[i : i + 16] for i in range(0, len(CODE), 16)]

    def answer(body: dict[str, Any]) -> Script:
        streaming = bool(body.get("stream"))
        kinds = ("429", "500", "503", "timeout") + (("disconnect",) if streaming else ())
        failure = dice.roll("llm", kinds)
        ok: Script = (
            JSON(json.dumps(TIMELINE))
            if body.get("response_format")
            else Stream(content_chunks=chunks, chunk_delay=0.01)
        )
        if failure is None:
            return ok
        kind, depth = failure.split(":")
        if kind == "timeout":
            return Hang(TIMEOUT * 2, then=ok)
        if kind == "disconnect":
            return Stream(content_chunks=chunks, chunk_delay=0.01, disconnect_after=int(depth))
        return Fail(int(kind), retry_after=0 if kind == "429" else None)

    return answer


async def test_flaky_upstreams_leave_no_session_stuck(tmp_path: Path) -> None:
    database = fresh_database("chaos_upstreams")
    redis = RedisServer(tmp_path).start()
    dice = Dice(seed=20261201, rate=FAILURE_RATE)
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY).start()
    fake.default = llm(dice)
    bibigpt = FlakyBibiGPT(dice).start()
    env = mora_env(
        database,
        redis.url(),
        fake.url,
        SUBTITLE_PROVIDERS="bibigpt",
        BIBIGPT_API_KEY=API_KEY,
        BIBIGPT_API_URL=bibigpt.api_url,
        BIBIGPT_TIMEOUT=str(TIMEOUT),
        DEEPSEEK_TIMEOUT=str(TIMEOUT),
        # As an operator facing a flaky provider would: more retries, short backoff.
        DEEPSEEK_MAX_RETRIES="6",
        DEEPSEEK_RETRY_BASE_DELAY="0.1",
        JOB_CONCURRENCY="10",
        STALLED_JOB_TIMEOUT="30",
    )
    mora = Mora(env, tmp_path)
    try:
        with dumped_on_failure(mora):
            await mora.start(apis=2, workers=2)
            ids: list[str] = []
            for api in mora.apis:
                async with httpx.AsyncClient(base_url=api, timeout=60) as http:
                    token = await register(http)
                    ids += await asyncio.gather(
                        *(
                            create_session(
                                http, token, video_url=video_url(len(ids) + i), subtitles=None
                            )
                            for i in range(SESSIONS // 2)
                        )
                    )
            started = time.monotonic()
            settled = await wait_settled(database, ids, 150)
            print(f"{len(ids)} sessions settled in {time.monotonic() - started:.0f}s")
            print("thrown:", dict(sorted(dice.thrown.items())))
            outcome = Counter(status for status, _ in settled.values())
            print("outcome:", dict(outcome))
            assert len(settled) == len(ids), settled
            stuck = {sid: s for sid, s in settled.items() if s[0] not in {"COMPLETED", "ERROR"}}
            assert stuck == {}
            uncoded = {sid: s for sid, s in settled.items() if s[0] == "ERROR" and not s[1]}
            assert uncoded == {}
            assert outcome["COMPLETED"] >= math.ceil(0.99 * len(ids)), settled
            assert dice.thrown["llm:ok"] and sum(
                n for kind, n in dice.thrown.items() if not kind.endswith(":ok")
            ) >= 0.2 * sum(dice.thrown.values())
            codes = sql(database, "SELECT generated_code FROM sessions WHERE status = 'COMPLETED'")
            assert all(row[0].strip() == CODE.strip() for row in codes)
    finally:
        mora.stop()
        fake.stop()
        bibigpt.stop()
        redis.stop()
