"""`mora run VIDEO_URL`: create a session (or pick up `--session ID`) and follow it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mora_graphql.terminal.client import (
    AuthError,
    ClientError,
    MoraClient,
    RequestError,
    ServerUnavailable,
)
from mora_graphql.terminal.embedded import EmbeddedServer, sign_in_local_account
from mora_graphql.terminal.follow import follow
from mora_graphql.terminal.views import JsonView, LiveView, PlainView, View

EXIT_COMPLETED = 0
EXIT_FAILED = 1  # the session ended in ERROR
EXIT_USAGE = 2  # bad arguments, or the server rejected the request (e.g. INVALID_VIDEO_URL)
EXIT_CANCELLED = 3  # the session was cancelled (by cancelSession or a shutdown)
EXIT_AUTH = 4  # no usable credentials
EXIT_UNAVAILABLE = 5  # the server cannot be reached or started, reconnecting gave up
EXIT_INTERRUPTED = 130  # Ctrl-C

CREATE = """
mutation($input: CreateSessionInput!) { createSession(input: $input) { id status } }"""
CANCEL = "mutation($id: ID!) { cancelSession(id: $id) { status } }"
USAGE_CODES = frozenset(
    {"BAD_USER_INPUT", "INVALID_VIDEO_URL", "UNSUPPORTED_PLATFORM", "NOT_FOUND", "FORBIDDEN"}
)


@dataclass
class RunOptions:
    video_url: str | None
    session_id: str | None
    language: str | None
    subtitles: str | None
    force_refresh: bool
    server: str | None
    json: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video_url", nargs="?", metavar="VIDEO_URL")
    parser.add_argument("--language", help="target programming language (server default: python)")
    parser.add_argument(
        "--subtitles", metavar="FILE", help="SRT or WebVTT file to use instead of fetching them"
    )
    parser.add_argument(
        "--force-refresh", action="store_true", help="bypass the server's result cache"
    )
    parser.add_argument(
        "--server",
        metavar="URL",
        default=os.environ.get("MORA_SERVER") or None,
        help="Mora server (default: MORA_SERVER, else an embedded server for this command)",
    )
    parser.add_argument(
        "--session", metavar="ID", help="follow an existing session instead of creating one"
    )
    parser.add_argument("--json", action="store_true", help="one JSON event per line on stdout")


def options_from(args: argparse.Namespace) -> RunOptions:
    if bool(args.video_url) == bool(args.session):
        sys.stderr.write("mora run: give either VIDEO_URL or --session ID\n")
        sys.exit(EXIT_USAGE)
    subtitles = None
    if args.subtitles:
        try:
            if args.subtitles == "-":
                subtitles = sys.stdin.read()
            else:
                subtitles = Path(args.subtitles).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            sys.stderr.write(f"mora run: cannot read the subtitles: {exc}\n")
            sys.exit(EXIT_USAGE)
    return RunOptions(
        video_url=args.video_url,
        session_id=args.session,
        language=args.language,
        subtitles=subtitles,
        force_refresh=args.force_refresh,
        server=args.server,
        json=args.json,
    )


def pick_view(options: RunOptions) -> View:
    if options.json:
        return JsonView()
    if sys.stdout.isatty():
        return LiveView()
    return PlainView()


async def sign_in(client: MoraClient, embedded: bool) -> None:
    token = os.environ.get("MORA_TOKEN")
    email, password = os.environ.get("MORA_EMAIL"), os.environ.get("MORA_PASSWORD")
    if token:
        client.use_token(token)
    elif email and password:
        try:
            await client.login(email, password)
        except RequestError as exc:
            raise AuthError(f"login as {email} failed: {exc.message}") from exc
    elif embedded:
        await sign_in_local_account(client)
    else:
        raise AuthError("set MORA_TOKEN, or MORA_EMAIL and MORA_PASSWORD, to sign in to the server")


async def create_session(client: MoraClient, options: RunOptions) -> str:
    session_input: dict[str, Any] = {"videoUrl": options.video_url}
    if options.language:
        session_input["language"] = options.language
    if options.subtitles is not None:
        session_input["subtitles"] = options.subtitles
    if options.force_refresh:
        session_input["forceRefresh"] = True
    data = await client.execute(CREATE, {"input": session_input})
    return str(data["createSession"]["id"])


async def run(options: RunOptions, view: View) -> int:
    embedded = EmbeddedServer() if options.server is None else None
    try:
        server = options.server
        if embedded is not None:
            view.notice("starting an embedded server (pass --server URL to use a running one)")
            server = await embedded.start()
        assert server is not None
        client = MoraClient(server, notice=view.notice)
        try:
            await sign_in(client, embedded is not None)
            session_id = options.session_id or await create_session(client, options)
            return await _follow(client, session_id, options, view, embedded is not None)
        finally:
            await client.aclose()
    except AuthError as exc:
        view.close()
        view.notice(f"authentication failed: {exc}")
        return EXIT_AUTH
    except RequestError as exc:
        view.close()
        view.notice(f"the server refused: {exc.code}: {exc.message}")
        if exc.code == "UNAUTHENTICATED":
            return EXIT_AUTH
        return EXIT_USAGE if exc.code in USAGE_CODES else EXIT_UNAVAILABLE
    except ServerUnavailable as exc:
        view.close()
        view.notice(str(exc))
        return EXIT_UNAVAILABLE
    except ClientError as exc:
        view.close()
        view.notice(str(exc))
        return EXIT_USAGE
    finally:
        if embedded is not None:
            embedded.close()


async def _follow(
    client: MoraClient, session_id: str, options: RunOptions, view: View, embedded: bool
) -> int:
    """Follow until the end, or until Ctrl-C: then a session on a server of its own keeps
    running (the user can pick it up with `--session`), and a session on the embedded server,
    which stops with this command, is cancelled."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        view.started(session_id, options.video_url)
        following = asyncio.create_task(follow(client, session_id, view))
        waiting = asyncio.create_task(interrupted.wait())
        await asyncio.wait({following, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if following.done():
            state = following.result()
            view.finished(state)
            return {
                "COMPLETED": EXIT_COMPLETED,
                "ERROR": EXIT_FAILED,
                "CANCELLED": EXIT_CANCELLED,
            }.get(state.status, EXIT_UNAVAILABLE)
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        view.close()
    if embedded:
        with contextlib.suppress(ClientError):
            await client.execute(CANCEL, {"id": session_id})
        view.notice(f"interrupted: cancelled session {session_id} (the embedded server stops)")
    else:
        view.notice(
            f"interrupted: session {session_id} keeps running on the server; "
            f"follow it again with `mora run --server {options.server} --session {session_id}`"
        )
    return EXIT_INTERRUPTED


def main(args: argparse.Namespace) -> None:
    options = options_from(args)
    view = pick_view(options)
    try:
        code = asyncio.run(run(options, view))
    except KeyboardInterrupt:
        view.close()
        code = EXIT_INTERRUPTED
    sys.exit(code)
