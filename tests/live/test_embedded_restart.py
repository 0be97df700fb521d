"""The embedded server (SQLite, in-process jobs, memory bus) killed mid-run and started again:
a client resuming with the last seq it saw gets no seq twice, and the code rebuilt from what
it received is the stored code."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import SECRET
from tests.distributed.test_topology import ROOT, SRT, TIMELINE, Cluster, free_port, wait_ready
from tests.fakes.fixtures import OPENAI_TEST_KEY
from tests.fakes.openai_server import JSON, FakeOpenAI, Script, Stream
from tests.wsclient import TRANSPORT_WS, collect, connect, subscribe

CODE = "\n".join(f"def step_{i}():\n    return {i}\n" for i in range(50))
PROGRESS = """
subscription($id: ID!, $after: Int) {
  sessionProgress(sessionId: $id, afterSeq: $after) {
    __typename seq status
    ... on SessionSnapshot { session { generatedCode } }
    ... on CodeDelta { text }
    ... on SessionCompleted { session { generatedCode status } }
  }
}"""


def responder(body: dict[str, Any]) -> Script:
    if body.get("response_format"):
        return JSON(json.dumps(TIMELINE))
    chunks = [CODE[i : i + 10] for i in range(0, len(CODE), 10)]
    return Stream(content_chunks=chunks, chunk_delay=0.05)


async def test_resuming_client_gets_no_reused_seq_after_a_crash(tmp_path: Path) -> None:
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY).start()
    fake.default = responder
    env = {
        **os.environ,
        "ENVIRONMENT": "test",
        "SECRET_KEY": SECRET,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'mora.db'}",
        "DEEPSEEK_API_URL": fake.url,
        "DEEPSEEK_API_KEY": OPENAI_TEST_KEY,
        "ENABLE_CACHE": "false",
        # Checkpoints far apart: the stored last_seq lags what clients saw when it dies.
        "CHECKPOINT_INTERVAL": "30",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("REDIS_URL", None)
    cluster = Cluster(env)
    try:
        migrate = subprocess.run(
            [sys.executable, "-m", "mora_graphql.cli", "migrate"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )
        assert migrate.returncode == 0, migrate.stderr.decode()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        ws_url = f"ws://127.0.0.1:{port}/graphql"
        first = cluster.start("first", "serve", "--port", str(port), log_dir=tmp_path)
        await wait_ready(url, first)
        import httpx

        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            token = (
                await http.post(
                    "/graphql",
                    json={
                        "query": 'mutation { register(email: "crash@example.com", password: "long enough pw") { accessToken } }'
                    },
                )
            ).json()["data"]["register"]["accessToken"]
            created = await http.post(
                "/graphql",
                json={
                    "query": 'mutation($s: String!) { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ", subtitles: $s}) { id } }',
                    "variables": {"s": SRT},
                },
                headers={"Authorization": f"Bearer {token}"},
            )
            session_id = created.json()["data"]["createSession"]["id"]
        seen: list[dict[str, Any]] = []
        async with connect(ws_url, TRANSPORT_WS, token=token) as ws:
            async for data in subscribe(ws, TRANSPORT_WS, PROGRESS, {"id": session_id}):
                seen.append(data["sessionProgress"])
                if sum(e["__typename"] == "CodeDelta" for e in seen) >= 8:
                    break
        first.send_signal(signal.SIGKILL)
        first.wait()
        last_seen = seen[-1]["seq"]

        second = cluster.start("second", "serve", "--port", str(port), log_dir=tmp_path)
        await wait_ready(url, second)
        rest = await asyncio.wait_for(
            collect(ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id, "after": last_seen}),
            60,
        )
        events = [e for e in rest if e["__typename"] != "SessionSnapshot"]
        assert events, rest
        # No seq the client already holds comes again, as an event or as a snapshot's base
        # for later events; after the last snapshot the sequence is gap-free.
        assert all(e["seq"] > last_seen for e in events), [e["seq"] for e in rest]
        snapshots = [i for i, e in enumerate(rest) if e["__typename"] == "SessionSnapshot"]
        tail = rest[snapshots[-1] :] if snapshots else rest
        seqs = [e["seq"] for e in tail]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert rest[-1]["__typename"] == "SessionCompleted"
        code = (tail[0]["session"]["generatedCode"] or "") if snapshots else ""
        if not snapshots:
            for event in seen:
                if event["__typename"] == "SessionSnapshot":
                    code = event["session"]["generatedCode"] or ""
                elif event["__typename"] == "CodeReset":
                    code = ""
                elif event["__typename"] == "CodeDelta":
                    code += event["text"]
        for event in tail[1:] if snapshots else tail:
            if event["__typename"] == "CodeReset":
                code = ""
            elif event["__typename"] == "CodeDelta":
                code += event["text"]
        stored = rest[-1]["session"]["generatedCode"]
        assert code == stored
        assert stored.strip() == CODE.strip()
    except BaseException:
        print(cluster.dump())
        raise
    finally:
        cluster.stop()
        fake.stop()
