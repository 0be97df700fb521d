"""A lean OpenAI-compatible `/chat/completions` server whose streamed tokens carry a timestamp.

    python bench/stamped_llm.py [--rate 50] [--count 500] [--gate]

Prints its base URL on the first line of stdout and serves until stdin closes. It is its own
process so that the benchmark's clients never slow the token stream down, and it is plain
asyncio (no framework) so that 10,000 tokens/s cost it little CPU.

- A streaming request (the code stage) gets `count` content chunks at `rate` chunks/s. Chunk n
  is the Python line `t_<n> = <ns>\\n`, where <ns> is `time.monotonic_ns()` taken right before
  the chunk is written to the socket. CLOCK_MONOTONIC is one clock for every process of the
  machine, so a client subtracts it from its own `time.monotonic_ns()` to get the
  token-to-subscriber latency. The code is valid Python, so no repair round follows.
- Each stream starts at a random phase within one token interval, as independent LLM streams do.
- With `--gate` (or `{"gate": true}` posted to /_bench/config) streams wait after their
  headers until POST /_bench/release, so that subscribers are in place before the first token.
- A JSON-mode request (the timeline stage) gets a one-segment timeline at once.
- GET /_bench/stats: {"waiting", "streaming", "finished", "sent"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from typing import Any

TIMELINE = json.dumps(
    {
        "segments": [
            {"startTime": 0, "endTime": 30, "description": "all", "startLine": 1, "endLine": 1}
        ]
    }
)


class Server:
    def __init__(self, rate: float, count: int, gate: bool) -> None:
        self.rate = rate
        self.count = count
        self.gate = gate
        self.released = asyncio.Event()
        self.waiting = 0
        self.streaming = 0
        self.finished = 0
        self.sent = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                length = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(length) if length else b""
                body: Any = json.loads(raw) if raw else {}
                if path.endswith("/chat/completions") and method == "POST":
                    if body.get("stream"):
                        await self.stream(writer, body)
                    else:
                        self.respond(writer, 200, self.completion(body))
                elif path == "/_bench/stats":
                    self.respond(
                        writer,
                        200,
                        {
                            "waiting": self.waiting,
                            "streaming": self.streaming,
                            "finished": self.finished,
                            "sent": self.sent,
                        },
                    )
                elif path == "/_bench/release":
                    self.released.set()
                    self.respond(writer, 200, {"released": self.waiting})
                elif path == "/_bench/config":
                    self.rate = float(body.get("rate", self.rate))
                    self.count = int(body.get("count", self.count))
                    self.gate = bool(body.get("gate", self.gate))
                    self.released = asyncio.Event()
                    self.waiting = self.streaming = self.finished = self.sent = 0
                    self.respond(writer, 200, {"ok": True})
                else:
                    self.respond(writer, 404, {"error": "not found"})
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    @staticmethod
    def respond(writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n".encode()
            + data
        )

    @staticmethod
    def completion(body: dict[str, Any]) -> dict[str, Any]:
        content = TIMELINE if body.get("response_format") else "t_0 = 0\n"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "bench"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
        }

    async def stream(self, writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        head = json.dumps(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model", "bench"),
            }
        )[:-1]

        def event(delta: str, finish: str = "null", extra: str = "") -> bytes:
            data = (
                f'data: {head}, "choices": [{{"index": 0, "delta": {delta}, '
                f'"logprobs": null, "finish_reason": {finish}}}]{extra}}}\n\n'
            ).encode()
            return b"%x\r\n%s\r\n" % (len(data), data)

        writer.write(event('{"role": "assistant", "content": ""}'))
        await writer.drain()
        if self.gate:
            self.waiting += 1
            await self.released.wait()
            self.waiting -= 1
        self.streaming += 1
        interval = 1e9 / self.rate
        start = time.monotonic_ns() + int(random.random() * interval)
        try:
            for n in range(1, self.count + 1):
                delay = (start + (n - 1) * interval - time.monotonic_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(event(f'{{"content": "t_{n} = {time.monotonic_ns()}\\n"}}'))
                self.sent += 1
                await writer.drain()
            writer.write(event("{}", '"stop"'))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = f', "usage": {{"prompt_tokens": 10, "completion_tokens": {self.count}, "total_tokens": {self.count + 10}}}'
                data = f'data: {head}, "choices": []{usage}}}\n\n'.encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            self.finished += 1
        finally:
            self.streaming -= 1


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--gate", action="store_true")
    args = parser.parse_args()
    server = Server(args.rate, args.count, args.gate)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, backlog=4096)
    port = listener.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    listener.close()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
