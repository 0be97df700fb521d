"""Memory per idle subscription: Mora's `mora serve` against the graphql-ws reference server.

    python bench/idle.py [--subscriptions 2000,10000] [--per-connection 1] [--only mora|peer]

For each N: RSS of the server process (VmRSS from /proc/<pid>/status) before and after N
`sessionProgress` subscriptions are parked on one session that emits nothing, divided by N.

- Mora (`mora serve`, embedded mode): the session is running, but its code stream (from
  bench/stamped_llm.py) is held before the first token, so the session stays PROCESSING and
  silent for as long as the benchmark needs.
- The peer (bench/peers/graphql-ws-server.mjs): a session id nobody publishes on.

Before the "before" reading, 50 subscriptions are opened and closed on each server, so code
paths and caches that the first subscription warms up are not charged to the N. After the last
subscription got its SessionSnapshot the servers are given 3 s to settle. Node's garbage
lingers until its next collection while CPython frees on the spot, so the peer runs with
--expose-gc and is asked for a full collection (POST /gc) before each reading: its figure is
its live memory, a lower bound.

Connections: by default every subscription has its own WebSocket connection, as every browser
tab does; that is the cost a server pays per follower. `--per-connection K` puts K
subscriptions on each connection instead (Mora is started with
MAX_SUBSCRIPTIONS_PER_CONNECTION=K), which separates the cost of a subscription from the cost
of a connection. 10,000 connections need 10,000 descriptors on each side: the client raises
its soft RLIMIT_NOFILE to the hard limit before starting the servers, which inherit it, and the
connections come from one asyncio process, 100 handshakes at a time. The client offers no
permessage-deflate (a compressor per connection would dominate both servers' figures).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Subscriber,
    Tally,
    connect_all,
    control,
    create_session,
    free_port,
    load,
    mora,
    mora_env,
    processes,
    raise_fd_limit,
    register,
    rss_bytes,
    start_llm,
    start_peer,
    wait_llm,
    wait_ready,
)


async def park(
    pid: int,
    ws_url: str,
    token: str,
    session_id: str,
    n: int,
    per_connection: int,
    gc_url: str = "",
) -> dict[str, Any]:
    warm = [Subscriber(ws_url, token, [session_id], Tally()) for _ in range(50)]
    warm = await connect_all(warm)
    for sub in warm:
        await sub.ws.close()
    await asyncio.sleep(3)
    if gc_url:
        await control(gc_url, "/gc", {})
    before = rss_bytes(pid)
    tally = Tally()
    connections = math.ceil(n / per_connection)
    subscribers = [
        Subscriber(ws_url, token, [session_id] * min(per_connection, n - i * per_connection), tally)
        for i in range(connections)
    ]
    started = time.monotonic()
    subscribers = await connect_all(subscribers, parallel=100)
    took = time.monotonic() - started
    parked = sum(len(sub.session_ids) for sub in subscribers)
    await asyncio.sleep(3)
    if gc_url:
        await control(gc_url, "/gc", {})
    after = rss_bytes(pid)
    await asyncio.gather(*(sub.ws.close() for sub in subscribers))
    return {
        "n": n,
        "connections": connections,
        "before": before,
        "after": after,
        "per_sub": (after - before) / max(1, parked),
        "parked": parked,
        "took": took,
    }


def line(name: str, result: dict[str, Any], peer: dict[str, Any] | None) -> str:
    text = (
        f"idle {name:<5} subscriptions={result['parked']}/{result['n']} "
        f"connections={result['connections']}: "
        f"RSS {result['before'] / 2**20:.1f} MB -> {result['after'] / 2**20:.1f} MB, "
        f"{result['per_sub'] / 1024:.1f} KB/subscription (parked in {result['took']:.1f} s)"
    )
    if peer is not None:
        text += f" | vs peer: {result['per_sub'] / peer['per_sub']:.2f}x"
    return f"{text} | {load()}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscriptions", default="2000,10000", help="comma-separated counts")
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--only", choices=["mora", "peer"])
    args = parser.parse_args()
    limit = raise_fd_limit()
    counts = [int(n) for n in args.subscriptions.split(",")]
    if max(counts) / args.per_connection + 100 > limit:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {limit} is too low; use --per-connection")
    for n in counts:
        with (
            tempfile.TemporaryDirectory(prefix="mora-bench-") as tmp,
            processes(Path(tmp)) as procs,
        ):
            peer_result = None
            if args.only != "mora":
                peer, peer_url = start_peer(procs)
                await wait_ready(peer_url, peer)
                ws_url = peer_url.replace("http", "ws") + "/graphql"
                peer_result = await park(
                    peer.pid, ws_url, "", "idle", n, args.per_connection, peer_url
                )
                print(line("peer", peer_result, None), flush=True)
            if args.only == "peer":
                continue
            llm = start_llm(procs, 1, 1)
            port = free_port()
            env = mora_env(
                f"sqlite+aiosqlite:///{tmp}/idle.db",
                llm,
                MAX_SUBSCRIPTIONS_PER_CONNECTION=str(max(10, args.per_connection)),
            )
            server = procs.start("mora", mora("serve", "--port", str(port)), env)
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base, server)
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                token = await register(http)
                session_id = await create_session(http, token, f"idle {time.monotonic_ns()}")
            await wait_llm(llm, "waiting", 1, 60)
            ws_url = base.replace("http", "ws") + "/graphql"
            result = await park(server.pid, ws_url, token, session_id, n, args.per_connection)
            print(line("mora", result, peer_result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
