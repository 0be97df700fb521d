"""The `mora` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mora_graphql.config import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Coroutine

    from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _settings_or_exit() -> Settings:
    try:
        return get_settings()
    except SettingsError as exc:
        sys.exit(f"mora: configuration error: {exc}")
    except ValueError as exc:
        message = str(exc).split("\nFor further information")[0]
        if "SECRET_KEY" in message:
            message = message[message.index("SECRET_KEY") :]
        sys.exit(f"mora: configuration error: {message}")


def freeze_after_startup(app: ASGIApp) -> ASGIApp:
    """`freeze_heap` once the app has started.

    Measured with one subscriber at 100 events/s: full collections walked the whole start-up
    heap (modules, schema, clients) and paused the event loop for up to 465 ms, the worst
    delivery latencies of the run."""

    def app_with_frozen_heap(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "lifespan":
            return app(scope, receive, send)  # no frame of ours for a connection's life
        return lifespan(scope, receive, send)

    from mora_graphql.runtime import freeze_heap

    async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_after_freeze(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                freeze_heap()
            await send(message)

        await app(scope, receive, send_after_freeze)

    return app_with_frozen_heap


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from mora_graphql.app import create_app
    from mora_graphql.httpserver import HTTP_OPTIONS
    from mora_graphql.wsserver import WEBSOCKET_OPTIONS

    settings = _settings_or_exit()
    workers = args.workers or settings.web_concurrency
    problem = settings.multiprocess_problem(workers)
    if problem:
        sys.exit(f"mora: --workers {workers}: {problem}.")
    options: dict[str, Any] = {
        "host": args.host or settings.host,
        "port": args.port or settings.port,
        "log_level": settings.log_level.lower(),
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "ws_max_size": settings.max_ws_message_bytes,
        "timeout_graceful_shutdown": int(settings.worker_shutdown_timeout),
        "interface": "asgi3",  # the app is a plain function returning a coroutine
        **HTTP_OPTIONS,
        **WEBSOCKET_OPTIONS,
    }
    if workers > 1:
        # Each process builds its own app, pools and connections from the same settings,
        # and freezes its own start-up heap (`served_app`).
        uvicorn.run("mora_graphql.cli:served_app", factory=True, workers=workers, **options)
        return
    uvicorn.run(freeze_after_startup(create_app(settings)), **options)


def served_app() -> ASGIApp:
    """The app factory of each `mora serve --workers N` process (settings from the
    environment, as the parent read them)."""
    from mora_graphql.app import create_app

    return freeze_after_startup(create_app())


def cmd_migrate(args: argparse.Namespace) -> None:
    from mora_graphql.migrate import downgrade_database, upgrade_database

    settings = _settings_or_exit()
    if args.downgrade:
        downgrade_database(settings.database_url, args.downgrade)
        return
    upgrade_database(settings.database_url, args.revision)
    if not settings.is_sqlite:
        from mora_graphql.jobs.procrastinate_queue import build_app, install_schema

        if asyncio.run(install_schema(build_app(settings.database_url))):
            print("installed the job queue schema")


def cmd_worker(args: argparse.Namespace) -> None:
    from mora_graphql.logging import configure_logging, register_secrets, settings_secrets
    from mora_graphql.worker import run_worker

    settings = _settings_or_exit()
    if not settings.uses_procrastinate:
        sys.exit(
            "mora: `mora worker` needs the distributed job queue (a PostgreSQL DATABASE_URL plus "
            "REDIS_URL, or JOB_BACKEND=procrastinate); in the embedded mode `mora serve` runs "
            "the jobs itself."
        )
    if args.concurrency:
        settings = settings.model_copy(update={"job_concurrency": args.concurrency})
    configure_logging(settings.log_level, json=settings.json_logs)
    register_secrets(settings_secrets(settings))
    _run_fast(run_worker(settings))


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (as `mora serve` does through uvicorn): a worker
    streaming hundreds of sessions spends much of its time in the event loop's I/O."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def cmd_export_schema(args: argparse.Namespace) -> None:
    from mora_graphql.graphql.schema import build_schema

    sdl = build_schema(_settings_or_exit()).as_str() + "\n"
    if args.output == "-":
        sys.stdout.write(sdl)
    else:
        Path(args.output).write_text(sdl, encoding="utf-8")


async def _create_user(email: str, password: str, admin: bool) -> str:
    from mora_graphql.auth.service import AuthService
    from mora_graphql.db import create_engine, create_sessionmaker, transaction
    from mora_graphql.models import Role

    settings = _settings_or_exit()
    engine = create_engine(settings)
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            result = await AuthService(session, settings).register(
                email, password, Role.ADMIN if admin else Role.USER
            )
        return str(result.user.id)
    finally:
        await engine.dispose()


def cmd_user_create(args: argparse.Namespace) -> None:
    from mora_graphql.errors import MoraError

    password = os.environ.get("MORA_USER_PASSWORD") or getpass.getpass("Password: ")
    try:
        user_id = asyncio.run(_create_user(args.email, password, args.admin))
    except MoraError as exc:
        sys.exit(f"mora: {exc.message}")
    role = "admin" if args.admin else "user"
    print(f"created {role} {args.email} ({user_id})")


def cmd_run(args: argparse.Namespace) -> None:
    from mora_graphql.terminal.command import main

    main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mora", description="Mora GraphQL server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the API server (migrates an embedded SQLite database)"
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--workers",
        type=int,
        help="API processes on one port (default WEB_CONCURRENCY, 1); more than one needs Redis "
        "and the distributed job queue",
    )
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="upgrade the database schema")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument(
        "--downgrade", metavar="REVISION", help="downgrade to REVISION (e.g. base)"
    )
    migrate.set_defaults(func=cmd_migrate)

    worker = sub.add_parser("worker", help="run pipeline jobs from the PostgreSQL queue")
    worker.add_argument("--concurrency", type=int, help="jobs at once (default JOB_CONCURRENCY)")
    worker.set_defaults(func=cmd_worker)

    export = sub.add_parser("export-schema", help="print the GraphQL SDL")
    export.add_argument("-o", "--output", default="-")
    export.set_defaults(func=cmd_export_schema)

    user = sub.add_parser("user", help="manage users")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    create = user_sub.add_parser(
        "create", help="create a user (password from MORA_USER_PASSWORD or a prompt)"
    )
    create.add_argument("email")
    create.add_argument("--admin", action="store_true")
    create.set_defaults(func=cmd_user_create)

    from mora_graphql.terminal.command import add_arguments

    run = sub.add_parser(
        "run",
        help="create a session for a video and follow it (see README: `mora run`)",
        description="Create a session for VIDEO_URL and follow it to the end. Exit codes: "
        "0 completed, 1 failed, 2 usage or rejected request, 3 cancelled, "
        "4 authentication, 5 server unreachable, 130 interrupted.",
    )
    add_arguments(run)
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
