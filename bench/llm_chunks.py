"""Client-side CPU cost of one streamed LLM chunk: `python bench/llm_chunks.py [--runs 5]`.

Starts the OpenAI-compatible fake (tests/fakes/openai_server.py, the real SSE wire format)
in a separate process, so its CPU is not counted, then streams `--chunks` deltas (a tenth of
them reasoning, the rest content, then the finish and usage chunks and `[DONE]`) through
`LLMClient.stream_chat` and prints, one line per run, the client process's CPU time
(`time.process_time`) divided by the number of chunks.

`--transport httpx` streams through httpx's own transport instead of the client's default
(`providers/transport.py`), for a before/after in one run.

`--pace S` makes the server sleep S seconds before each delta, so that every chunk arrives in
its own TCP segment, as tokens do from a real model; `--pace 0` sends them back to back (the
client then often reads several chunks per socket read). `--profile FILE` writes a cProfile
of one more run to FILE and prints its top functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mora_graphql.config import Settings  # noqa: E402
from mora_graphql.providers.llm import LLMClient, Usage  # noqa: E402
from tests.fakes.openai_server import FakeOpenAI, Stream  # noqa: E402

KEY = "sk-bench-key-000000000000"
MESSAGES = [
    {"role": "system", "content": "You turn tutorial subtitles into code."},
    {"role": "user", "content": "[0] let's print hello world in python"},
]


def deltas(chunks: int) -> tuple[list[str], list[str]]:
    """The reasoning and the content deltas of an answer of `chunks` deltas."""
    reasoning = [f"step {i} " for i in range(chunks // 10)]
    return reasoning, [f"x_{i} = {i}\n" for i in range(chunks - len(reasoning))]


def serve(chunks: int, pace: float) -> None:
    """The server process: answer every streamed request with `chunks` deltas."""
    reasoning, content = deltas(chunks)

    def reply(_body: dict[str, Any]) -> Stream:
        return Stream(reasoning_chunks=reasoning, content_chunks=content, chunk_delay=pace)

    fake = FakeOpenAI(api_key=KEY).start()
    fake.default = reply
    print(fake.url, flush=True)
    sys.stdin.read()
    fake.stop()


async def one_run(client: LLMClient, chunks: int) -> tuple[float, float]:
    """Stream one answer; returns (client CPU µs per chunk, wall seconds)."""
    usage = Usage()
    received: dict[str, list[str]] = {"reasoning": [], "content": []}
    wall = time.perf_counter()
    cpu = time.process_time()
    async for chunk in client.stream_chat(MESSAGES, usage=usage):
        received[chunk.kind].append(chunk.text)
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    # The client yields one chunk per run of the same kind in one read: compare the text.
    got = ("".join(received["reasoning"]), "".join(received["content"]))
    reasoning, content = deltas(chunks)
    if got != ("".join(reasoning), "".join(content)) or usage.calls != 1:
        raise SystemExit(f"the {chunks} deltas did not all arrive ({usage})")
    if usage.completion_tokens != chunks:
        raise SystemExit(f"expected the usage of {chunks} deltas, got {usage}")
    return cpu / chunks * 1e6, wall


async def bench(url: str, args: argparse.Namespace) -> None:
    settings = Settings(
        _env_file=None,
        environment="test",
        deepseek_api_key=SecretStr(KEY),
        deepseek_api_url=url,
        deepseek_timeout=30.0,
    )
    http_client = None
    if args.transport == "httpx":
        http_client = httpx2.AsyncClient(timeout=30.0)
    client = LLMClient(settings, http_client=http_client)
    try:
        await one_run(client, args.chunks)  # warm-up: connection, imports, caches
        results: list[float] = []
        for run in range(1, args.runs + 1):
            per_chunk, wall = await one_run(client, args.chunks)
            results.append(per_chunk)
            print(
                f"run {run}: {args.chunks} chunks, {per_chunk:.1f} µs CPU/chunk, wall {wall:.2f}s",
                flush=True,
            )
        print(
            f"median {statistics.median(results):.1f} µs CPU/chunk "
            f"(min {min(results):.1f}, max {max(results):.1f}, pace {args.pace:g}s, "
            f"transport {args.transport})",
            flush=True,
        )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await one_run(client, args.chunks)
            profiler.disable()
            profiler.dump_stats(args.profile)
            stats = pstats.Stats(profiler).strip_dirs()
            stats.sort_stats("cumulative").print_stats(25)
            stats.sort_stats("tottime").print_stats(20)
    finally:
        await client.aclose()
        if http_client is not None:
            await http_client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument(
        "--transport",
        choices=["lean", "httpx"],
        default="lean",
        help="the LLM client's own transport (lean) or httpx's default one",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.chunks, args.pace)
        return
    command = [sys.executable, __file__, "--serve", "--chunks", str(args.chunks)]
    command += ["--pace", str(args.pace)]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        if not url:
            raise SystemExit("the LLM server did not start")
        asyncio.run(bench(url, args))
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
