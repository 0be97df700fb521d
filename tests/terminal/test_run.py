"""`mora run` against a live server and the fake LLM: plain, JSON, reconnects, token expiry."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from mora_graphql.terminal.state import SessionState
from tests.conftest import LiveServer
from tests.fakes.fixtures import OPENAI_TEST_KEY, openai_server_fixture  # noqa: F401
from tests.fakes.openai_server import JSON, Fail, FakeOpenAI, Stream
from tests.live.test_session_progress import CODE, TIMELINE, chunks, code_stream
from tests.terminal.conftest import VIDEO, Account, client_env, run_cli


def run_args(live: LiveServer, srt: Path, *extra: str) -> list[str]:
    return [VIDEO, "--server", live.url, "--subtitles", str(srt), *extra]


def slow_stream(seconds: float) -> Stream:
    parts = chunks(CODE, 12)
    return Stream(
        reasoning_chunks=["Reading ", "the transcript."],
        content_chunks=parts,
        chunk_delay=seconds / len(parts),
    )


async def test_plain_mode_prints_exactly_the_stored_code(
    live: LiveServer, openai_server: FakeOpenAI, account: Account, srt_file: Path
) -> None:
    openai_server.enqueue(code_stream(delay=0.01), JSON(json.dumps(TIMELINE)))
    result = await run_cli(*run_args(live, srt_file), env=account.env)
    assert result.returncode == 0, result.stderr
    [session] = await account.sessions()
    assert session["status"] == "COMPLETED"
    assert result.stdout == session["generatedCode"].encode("utf-8")
    assert "generating code" in result.stderr
    assert f"completed session {session['id']}" in result.stderr


async def test_failure_exits_non_zero_with_the_error_code(
    live: LiveServer, openai_server: FakeOpenAI, account: Account, srt_file: Path
) -> None:
    openai_server.enqueue(Fail(401))
    result = await run_cli(*run_args(live, srt_file), env=account.env)
    assert result.returncode == 1, result.stderr
    assert result.stdout == b""
    assert "DEEPSEEK_API_ERROR (2003)" in result.stderr


async def test_json_lines_are_gap_free_events(
    live: LiveServer, openai_server: FakeOpenAI, account: Account, srt_file: Path
) -> None:
    openai_server.enqueue(code_stream(delay=0.01), JSON(json.dumps(TIMELINE)))
    result = await run_cli(*run_args(live, srt_file, "--json"), env=account.env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert events[0]["__typename"] == "SessionSnapshot"
    assert events[-1]["__typename"] == "SessionCompleted"
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    [session] = await account.sessions()
    assert events[-1]["session"]["generatedCode"] == session["generatedCode"]
    assert {e["sessionId"] for e in events} == {session["id"]}


async def test_code_reset_is_applied(
    live: LiveServer, openai_server: FakeOpenAI, account: Account, srt_file: Path
) -> None:
    """The LLM stream breaks after some code; the retry starts over with a CodeReset."""
    openai_server.enqueue(
        code_stream(delay=0.02, disconnect_after=15),
        code_stream(delay=0.01),
        JSON(json.dumps(TIMELINE)),
    )
    result = await run_cli(*run_args(live, srt_file, "--json"), env=account.env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.decode().splitlines()]
    names = [e["__typename"] for e in events]
    assert "CodeReset" in names, names
    assert names.index("CodeReset") > names.index("CodeDelta")
    [session] = await account.sessions()
    state = SessionState(session["id"])
    for event in events[:-1]:  # the deltas alone, without the final stored session
        assert state.apply(event)
    assert state.code == session["generatedCode"]
    assert state.resets == 1


async def test_missing_credentials_for_a_server(live: LiveServer, srt_file: Path) -> None:
    result = await run_cli(*run_args(live, srt_file), env=client_env())
    assert result.returncode == 4
    assert "MORA_EMAIL" in result.stderr


async def test_invalid_video_url_is_a_usage_error(live: LiveServer, account: Account) -> None:
    result = await run_cli("https://example.com/not-a-video", "--server", live.url, env=account.env)
    assert result.returncode == 2, result.stderr
    assert "UNSUPPORTED_PLATFORM" in result.stderr or "INVALID_VIDEO_URL" in result.stderr


async def test_access_token_from_mora_token(
    live: LiveServer, openai_server: FakeOpenAI, account: Account, srt_file: Path
) -> None:
    openai_server.enqueue(code_stream(), JSON(json.dumps(TIMELINE)))
    env = client_env(MORA_TOKEN=account.token)
    result = await run_cli(*run_args(live, srt_file), env=env)
    assert result.returncode == 0, result.stderr
    [session] = await account.sessions()
    assert result.stdout == session["generatedCode"].encode()


class CuttingProxy:
    """A TCP proxy to the server that aborts the first WebSocket connection after it has
    relayed `cut_after` reads from the server (mid-stream), and relays everything else."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.cuts = 0
        self.websockets = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        first = await reader.read(65536)
        is_ws = b"upgrade: websocket" in first.lower()
        cut = is_ws and self.websockets == 0
        self.websockets += is_ws
        up_writer.write(first)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            reads = 0
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    reads += count
                    if cut and reads >= self.cut_after:
                        self.cuts += 1
                        writer.transport.abort()
                        up_writer.transport.abort()
                        return
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))


async def test_dropped_connection_resumes_and_yields_the_exact_code(
    live: LiveServer, openai_server: FakeOpenAI, account: Account, srt_file: Path
) -> None:
    openai_server.enqueue(slow_stream(2.0), JSON(json.dumps(TIMELINE)))
    port = int(live.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_after=8)
    url = await proxy.start()
    try:
        result = await run_cli(
            VIDEO, "--server", url, "--subtitles", str(srt_file), env=account.env
        )
    finally:
        await proxy.stop()
    assert result.returncode == 0, result.stderr
    assert proxy.cuts == 1 and proxy.websockets >= 2
    assert "resuming after seq" in result.stderr
    [session] = await account.sessions()
    assert result.stdout == session["generatedCode"].encode("utf-8")


async def test_interrupt_leaves_a_remote_session_running(
    live: LiveServer, openai_server: FakeOpenAI, account: Account, srt_file: Path
) -> None:
    openai_server.enqueue(slow_stream(20.0), JSON(json.dumps(TIMELINE)))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mora_graphql.cli",
        "run",
        *run_args(live, srt_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=account.env,
    )
    assert process.stderr is not None
    seen = b""
    while b"generating code" not in seen:
        line = await asyncio.wait_for(process.stderr.readline(), 20)
        assert line, seen
        seen += line
    process.send_signal(signal.SIGINT)
    stdout, rest = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 130
    assert stdout == b""
    [session] = await account.sessions()
    assert f"session {session['id']} keeps running" in rest.decode()
    assert session["status"] == "PROCESSING"
    result = await live.gql(
        "mutation($id: ID!) { cancelSession(id: $id) { status } }",
        {"id": session["id"]},
        account.token,
    )
    assert result["data"]["cancelSession"]["status"] == "CANCELLED"
