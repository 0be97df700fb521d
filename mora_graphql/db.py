"""Engine, sessionmaker and the one place that commits."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
import structlog
from sqlalchemy import JSON, DateTime, MetaData, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    StatementError,
)
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.types import TypeDecorator

from mora_graphql.config import Settings
from mora_graphql.errors import DatabaseUnavailable

T = TypeVar("T")

log = structlog.get_logger("mora.db")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57P")
"""PostgreSQL error classes worth a retry: connection exceptions, insufficient resources
(e.g. 53300 too many connections) and operator intervention (shutdown, cannot connect now)."""


def _sqlstate(exc: DBAPIError) -> str | None:
    for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
        state = getattr(error, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def is_disconnect(exc: DBAPIError) -> bool:
    """The connection was lost or could not be had (a restart, a killed backend, the server
    out of connections): worth a retry."""
    if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
        return True
    state = _sqlstate(exc)
    return state is not None and state.startswith(TRANSIENT_SQLSTATE_CLASSES)


def storable_text(text: str) -> str:
    """`text` as PostgreSQL text and JSONB can hold it: without NUL (U+0000), lone
    surrogates replaced by U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def storable(value: Any) -> Any:
    """A column value (text or JSON) with every string in it made `storable_text`."""
    if isinstance(value, str):
        return storable_text(value)
    if not isinstance(value, dict | list | tuple):
        return value
    try:  # one pass in C: most values need no change
        if b"\\u0000" not in orjson.dumps(value):
            return value
    except TypeError:  # a lone surrogate, or a value JSON columns cannot hold anyway
        pass
    return _storable(value)


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(item) for item in value]
    return value


def refusal(exc: StatementError) -> dict[str, str]:
    """Log fields for a statement the database (or the driver) refused: the error and the
    statement, without the parameters or a traceback."""
    return {
        "error": f"{type(exc.orig).__name__}: {exc.orig}"[:500],
        "statement": " ".join(str(exc.statement or "").split())[:200],
    }


def connection_lost(exc: BaseException) -> bool:
    """The statement failed because its connection was dead. SQLAlchemy has then invalidated
    it, and the pool replaces every connection opened before it on their next checkout."""
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


PING_AFTER_IDLE = 1.0
"""Seconds a pooled connection may sit unused before its checkout costs a ping round trip."""
_CHECKED_IN = "mora.checked_in"


def _stamp_checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info[_CHECKED_IN] = time.monotonic()


def _checkout_checks(engine: AsyncEngine, *, ping_idle: bool) -> None:
    """Checks each pooled connection at checkout; a dead one is replaced, not handed out.

    A connection whose socket the driver has seen close (a killed backend, a database restart)
    is replaced at no cost, always. With `ping_idle` (DATABASE_POOL_PRE_PING), one idle longer
    than `PING_AFTER_IDLE` is also pinged (one round trip); one checked in moments ago (under
    load, nearly every checkout) never is: SQLAlchemy's own pre-ping would cost three round
    trips (BEGIN, a statement, ROLLBACK) per checkout. What slips through (a connection that
    died silently) fails its first statement, and `run_read` / `run_transaction` run the work
    once more on a fresh connection.
    """
    dialect = engine.dialect

    def checkout(
        dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
    ) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        is_closed = getattr(driver, "is_closed", None)
        if is_closed is not None and is_closed():
            raise DisconnectionError("the connection was closed")
        if not ping_idle:
            return
        checked_in = record.info.get(_CHECKED_IN)
        if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE:
            return  # new, or in use moments ago
        try:
            alive = dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("the connection failed its ping") from exc
        if not alive:
            raise DisconnectionError("the connection failed its ping")

    if ping_idle:
        event.listen(engine.sync_engine.pool, "checkin", _stamp_checkin)
    event.listen(engine.sync_engine.pool, "checkout", checkout)


def create_engine(settings: Settings, url: str | None = None) -> AsyncEngine:
    url = url or settings.database_url
    if url.startswith("sqlite"):
        engine = create_async_engine(url, echo=settings.database_echo)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(
        url,
        echo=settings.database_echo,
        pool_size=settings.database_pool_size,
        pool_recycle=settings.database_pool_recycle,
        json_deserializer=orjson.loads,  # JSONB columns (timelines) decoded several times faster
    )
    _checkout_checks(engine, ping_idle=settings.database_pool_pre_ping)
    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


Database = async_sessionmaker[AsyncSession]


def create_read_sessionmaker(engine: AsyncEngine) -> Database:
    """Sessions for reads of one statement each: autocommit, so no BEGIN and ROLLBACK round
    trips around the statement (same pool as `engine`)."""
    return create_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))


_AFTER_COMMIT = "mora.after_commit"


def after_commit(session: AsyncSession, action: Callable[[], Awaitable[object]]) -> None:
    """Run `action` once the transaction that owns `session` has committed (never when it
    rolls back), e.g. queue a job for a row the job must be able to read."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


async def _run_after_commit(session: AsyncSession) -> None:
    actions: list[Callable[[], Awaitable[object]]] = session.info.pop(_AFTER_COMMIT, [])
    for action in actions:
        try:
            await action()
        except Exception:
            log.exception("action after commit failed")


@asynccontextmanager
async def single_statement(db: Database) -> AsyncIterator[AsyncSession]:
    """A session for one write that is atomic by itself (a conditional UPDATE): autocommit, so
    no BEGIN and COMMIT round trips around it. Never for several statements that must commit
    together."""
    async with db() as session:
        await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield session


@asynccontextmanager
async def transaction(db: Database) -> AsyncIterator[AsyncSession]:
    """One unit of work: commits once on success, rolls back on any error; then the
    `after_commit` actions run. They cannot undo the commit: one that fails is logged and the
    others still run, and the unit of work has succeeded."""
    async with db() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
        await _run_after_commit(session)


_UNKNOWN_OUTCOME = (
    "The database connection was lost while saving: the change may or may not have been "
    "made. Read it back before trying again."
)


def _unavailable(exc: DBAPIError, message: str | None = None) -> DatabaseUnavailable:
    log.warning(
        "database unavailable", error=type(exc.orig).__name__, outcome_unknown=bool(message)
    )
    return DatabaseUnavailable(message)


async def run_read(db: Database, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """`work` (reads only) on a session of its own. The pool does not test connections on
    checkout, so a pooled connection whose backend is gone fails its first statement: then
    `work` runs once more, on a fresh connection. DatabaseUnavailable when that fails too."""
    for last in (False, True):
        try:
            async with db() as session:
                return await work(session)
        except DBAPIError as exc:
            if not is_disconnect(exc):
                raise
            if last:
                raise _unavailable(exc) from exc
            log.info("read runs again on a fresh connection", error=type(exc.orig).__name__)
    raise AssertionError("unreachable")


async def run_transaction(db: Database, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """`work` in one `transaction`, returning its result. A connection found dead before
    COMMIT was sent (a stale pooled connection fails at BEGIN) wrote nothing, so `work` runs
    once more on a fresh connection; it must not repeat effects outside the database (its
    `after_commit` actions are dropped with the failed attempt). A connection lost during
    COMMIT leaves the outcome unknown: DatabaseUnavailable, never a second run."""
    for last in (False, True):
        commit_sent = committed = False
        try:
            async with db() as session:
                try:
                    result = await work(session)
                    await session.flush()
                    commit_sent = True
                    await session.commit()
                except BaseException:
                    await session.rollback()
                    raise
                committed = True
                await _run_after_commit(session)
                return result
        except DBAPIError as exc:
            if committed or not is_disconnect(exc):
                raise
            if commit_sent:
                raise _unavailable(exc, _UNKNOWN_OUTCOME) from exc
            if last:
                raise _unavailable(exc) from exc
            log.info("transaction runs again on a fresh connection", error=type(exc.orig).__name__)
    raise AssertionError("unreachable")
