"""Subscription fan-out, Mora against the graphql-ws reference server, same client.

    python bench/fanout.py [--subscribers 1,100,1000] [--rate auto] [--seconds 10]

For each subscriber count, both servers stream the same stamped events to N subscribers of
one session, and one line per server is printed: latency p50/p99 from source to subscriber,
deliveries/s, events lost, CPU of the server and of the client, and Mora's ratio to the peer.

The source of the events, stamped where they are made (`t_<n> = <CLOCK_MONOTONIC ns>`):
- Mora (`mora serve`, embedded mode: SQLite, in-process job, memory bus): a session whose code
  is streamed by bench/stamped_llm.py, a local OpenAI-compatible server in its own process,
  at the fixed rate; each content chunk carries the time it was written to the socket. That
  is Mora's only public way to produce events at a controlled rate, and it measures the whole
  path a token takes: LLM stream -> pipeline -> event bus -> subscription -> WebSocket. Mora
  may coalesce several chunks into one CodeDelta; every stamp inside is counted.
- The peer (bench/peers/graphql-ws-server.mjs): POST /start makes the server publish CodeDelta
  events on its own timer at the same rate, each stamped when published.
Subscribers are all in place (each got its SessionSnapshot) before the first event is made.

Figures: latency = receive time - stamp, over every stamp delivered to every subscriber;
deliveries/s = stamps delivered to all subscribers / (last delivery - first event made);
lost = stamps sent x subscribers - stamps delivered as CodeDelta (a stamp that only reaches a
subscriber inside a later SessionSnapshot counts as lost). Default rate: 100 events/s up to
100 subscribers, 50 events/s above. The clients are one asyncio process (`websockets`,
graphql-transport-ws, one connection per subscriber, no compression): its CPU % is printed,
and near 100 % the figures are client-bound, for both servers alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CpuMeter,
    Subscriber,
    Tally,
    connect_all,
    control,
    create_session,
    drain,
    free_port,
    load,
    mora,
    mora_env,
    pct,
    processes,
    raise_fd_limit,
    register,
    start_llm,
    start_peer,
    wait_llm,
    wait_ready,
)


def summary(
    name: str, subs: int, rate: float, count: int, tally: Tally, started: int, cpu: CpuMeter
) -> dict[str, Any]:
    span = max(1e-9, (tally.last_ns - started) / 1e9)
    expected = count * subs
    return {
        "name": name,
        "subs": subs,
        "rate": rate,
        "count": count,
        "p50": pct(tally.latencies, 0.50),
        "p99": pct(tally.latencies, 0.99),
        "deliveries": tally.delivered / span,
        "frames": tally.frames / span,
        "lost": expected - tally.delivered,
        "expected": expected,
        "duplicates": tally.duplicates,
        "errors": tally.errors,
        "unfinished": tally.unfinished,
        "server_cpu": cpu.result["server"],
        "client_cpu": cpu.result["client"],
    }


def line(result: dict[str, Any], peer: dict[str, Any] | None) -> str:
    text = (
        f"fanout {result['name']:<5} subs={result['subs']:<5} rate={result['rate']:g}/s "
        f"events={result['count']}: p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms, "
        f"{result['deliveries']:,.0f} deliveries/s ({result['frames']:,.0f} frames/s), "
        f"lost {result['lost']:,}/{result['expected']:,}, dup {result['duplicates']}, "
        f"server CPU {result['server_cpu']:.0f}%, client CPU {result['client_cpu']:.0f}%"
    )
    if result["unfinished"]:
        text += f", {result['unfinished']} subscriptions unfinished"
    if result["errors"]:
        text += f", {len(result['errors'])} errors (first: {result['errors'][0][:120]})"
    if peer is not None:
        text += (
            f" | vs peer: p99 {result['p99'] / peer['p99']:.2f}x, "
            f"deliveries {result['deliveries'] / peer['deliveries']:.2f}x"
        )
    return f"{text} | {load()}"


async def run_peer(
    url: str, pid: int, subs: int, rate: float, count: int, grace: float
) -> dict[str, Any]:
    session_id = f"fanout-{subs}-{time.monotonic_ns()}"
    tally = Tally()
    ws_url = url.replace("http", "ws") + "/graphql"
    subscribers = [Subscriber(ws_url, "", [session_id], tally) for _ in range(subs)]
    subscribers = await connect_all(subscribers)
    cpu = CpuMeter(server=pid, client=os.getpid())
    cpu.start()
    started = time.monotonic_ns()
    await control(url, "/start", {"sessionId": session_id, "rate": rate, "count": count})
    tally.unfinished = await drain(subscribers, count, count / rate, grace=grace)
    cpu.stop()
    return summary("peer", subs, rate, count, tally, started, cpu)


async def run_mora(
    http: httpx.AsyncClient,
    llm: str,
    pid: int,
    token: str,
    subs: int,
    rate: float,
    count: int,
    grace: float,
) -> dict[str, Any]:
    await control(llm, "/_bench/config", {"rate": rate, "count": count, "gate": True})
    session_id = await create_session(http, token, f"fanout {subs} {time.monotonic_ns()}")
    tally = Tally()
    ws_url = str(http.base_url).rstrip("/").replace("http", "ws") + "/graphql"
    subscribers = [Subscriber(ws_url, token, [session_id], tally) for _ in range(subs)]
    subscribers = await connect_all(subscribers)
    await wait_llm(llm, "waiting", 1, 60)
    cpu = CpuMeter(server=pid, client=os.getpid())
    cpu.start()
    started = time.monotonic_ns()
    await control(llm, "/_bench/release", {})
    tally.unfinished = await drain(subscribers, count, count / rate, grace=grace)
    cpu.stop()
    return summary("mora", subs, rate, count, tally, started, cpu)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", default="1,100,1000", help="comma-separated counts")
    parser.add_argument(
        "--rate", default="auto", help="events/s; auto = 100 up to 100 subscribers, else 50"
    )
    parser.add_argument("--seconds", type=float, default=10, help="stream length per run")
    parser.add_argument(
        "--grace",
        type=float,
        default=60,
        help="seconds to wait for late events after the source ended; later ones count as lost",
    )
    parser.add_argument("--only", choices=["mora", "peer"], help="run one server only")
    args = parser.parse_args()
    counts = [int(n) for n in args.subscribers.split(",")]
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="mora-bench-") as tmp, processes(Path(tmp)) as procs:
        llm = start_llm(procs, 100, 100)
        port = free_port()
        env = mora_env(f"sqlite+aiosqlite:///{tmp}/bench.db", llm, JOB_CONCURRENCY="16")
        server = procs.start("mora", mora("serve", "--port", str(port)), env)
        peer, peer_url = (None, "") if args.only == "mora" else start_peer(procs)
        base = f"http://127.0.0.1:{port}"
        if args.only != "peer":
            await wait_ready(base, server)
        if peer is not None:
            await wait_ready(peer_url, peer)
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            token = await register(http) if args.only != "peer" else ""
            for subs in counts:
                rate = float(args.rate) if args.rate != "auto" else (100.0 if subs <= 100 else 50.0)
                count = int(rate * args.seconds)
                peer_result = None
                if peer is not None:
                    peer_result = await run_peer(peer_url, peer.pid, subs, rate, count, args.grace)
                    print(line(peer_result, None), flush=True)
                if args.only != "peer":
                    result = await run_mora(
                        http, llm, server.pid, token, subs, rate, count, args.grace
                    )
                    print(line(result, peer_result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
