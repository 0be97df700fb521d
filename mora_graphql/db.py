"""Engine, sessionmaker and the one place that commits."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import weakref
from collections import namedtuple
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import asyncpg
import orjson
import structlog
from sqlalchemy import JSON, DateTime, MetaData, Select, event
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
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool
from sqlalchemy.types import TypeDecorator
from sqlalchemy.util import greenlet_spawn

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


def _error_name(exc: Exception) -> str:
    return type(exc.orig if isinstance(exc, DBAPIError) else exc).__name__


def _unavailable(exc: Exception, message: str | None = None) -> DatabaseUnavailable:
    log.warning("database unavailable", error=_error_name(exc), outcome_unknown=bool(message))
    return DatabaseUnavailable(message)


async def _read_twice(attempt: Callable[[], Awaitable[T]], lost: Callable[[Exception], bool]) -> T:
    """`attempt` once more when it failed on a connection that was `lost`;
    DatabaseUnavailable when that fails too."""
    for last in (False, True):
        try:
            return await attempt()
        except Exception as exc:
            if not lost(exc):
                raise
            if last:
                raise _unavailable(exc) from exc
            log.info("read runs again on a fresh connection", error=_error_name(exc))
    raise AssertionError("unreachable")


def _is_lost(exc: Exception) -> bool:
    return isinstance(exc, DBAPIError) and is_disconnect(exc)


async def run_read(db: Database, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """`work` (reads only) on a session of its own. The pool does not test connections on
    checkout, so a pooled connection whose backend is gone fails its first statement: then
    `work` runs once more, on a fresh connection. DatabaseUnavailable when that fails too."""

    async def attempt() -> T:
        async with db() as session:
            return await work(session)

    return await _read_twice(attempt, _is_lost)


class Reader(Protocol):
    """Runs one SELECT (built with SQLAlchemy Core) and returns plain rows: attribute access
    by column key, values of the columns' Python types."""

    async def all(self, statement: Select[Any], params: Mapping[str, Any]) -> Sequence[Any]: ...

    async def first(self, statement: Select[Any], params: Mapping[str, Any]) -> Any | None: ...


class SessionReader:
    """A `Reader` on a session the caller holds (inside its transaction)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def all(self, statement: Select[Any], params: Mapping[str, Any]) -> Sequence[Any]:
        conn = await self.session.connection()
        rows: Sequence[Any] = (await conn.execute(statement, params)).all()
        return rows

    async def first(self, statement: Select[Any], params: Mapping[str, Any]) -> Any | None:
        rows = await self.all(statement, params)
        return rows[0] if rows else None


class PooledReader:
    """A `Reader` running each statement on a pooled connection of its own, without a
    transaction, once more on a fresh connection when the first was dead (as `run_read`).

    On asyncpg (`driver=True`) the statement is compiled once and run on the driver's
    connection, checked out of the engine's pool (so its checkout checks and recycling apply):
    SQLAlchemy's session, connection and result objects cost about twice the statement
    itself. Values go through the same type processors as SQLAlchemy's results. Without
    `driver` (SQLite, or tracing on, whose statement spans come from SQLAlchemy's engine
    events) statements run on an autocommit `AsyncConnection`.

    At most as many reads run at once as the pool keeps connections (`DATABASE_POOL_SIZE`);
    the others wait for one of them. A burst of reads beyond that would open overflow
    connections only to close them again when the burst is over, at the price of a connection
    setup each (a third of the process's CPU under a steady load of concurrent reads)."""

    def __init__(self, engine: AsyncEngine, *, driver: bool = True) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._dialect = engine.dialect
        self._pool = engine.sync_engine.pool
        self._driver = driver and engine.dialect.driver == "asyncpg"
        self._compiled: weakref.WeakKeyDictionary[Select[Any], _DriverStatement] = (
            weakref.WeakKeyDictionary()
        )
        size = self._pool.size() if isinstance(self._pool, QueuePool) else 0
        self._slots = asyncio.Semaphore(size) if size > 0 else None

    async def first(self, statement: Select[Any], params: Mapping[str, Any]) -> Any | None:
        rows = await self.all(statement, params)
        return rows[0] if rows else None

    async def all(self, statement: Select[Any], params: Mapping[str, Any]) -> Sequence[Any]:
        if not self._driver:
            # shielded: SQLAlchemy's connection cancelled mid-statement would be left for the
            # garbage collector instead of returning to the pool
            return await asyncio.shield(asyncio.ensure_future(self._gated(statement, params)))
        return await self._gated(statement, params)

    async def _gated(self, statement: Select[Any], params: Mapping[str, Any]) -> Sequence[Any]:
        if self._slots is None:
            return await self._read(statement, params)
        async with self._slots:
            return await self._read(statement, params)

    async def _read(self, statement: Select[Any], params: Mapping[str, Any]) -> Sequence[Any]:
        if not self._driver:
            return await _read_twice(lambda: self._core(statement, params), _is_lost)
        compiled = self._compiled.get(statement)
        if compiled is None:
            compiled = self._compiled[statement] = _DriverStatement(statement, self._dialect)
        args = compiled.arguments(params)
        return await _read_twice(lambda: self._on_driver(compiled, args), _driver_lost)

    async def _core(self, statement: Select[Any], params: Mapping[str, Any]) -> Sequence[Any]:
        async with self._engine.connect() as conn:
            rows: Sequence[Any] = (await conn.execute(statement, params)).all()
        return rows

    async def _on_driver(self, compiled: _DriverStatement, args: list[Any]) -> list[Any]:
        fairy = await greenlet_spawn(self._pool.connect)
        try:
            driver = fairy.driver_connection
            assert driver is not None
            if compiled.processors is None:
                await compiled.describe(driver)
            records = await driver.fetch(compiled.sql, *args)
        except Exception as exc:
            if _driver_lost(exc):
                # as SQLAlchemy does on a disconnect: the connections opened before this one
                # are replaced at their next checkout, this one now
                await greenlet_spawn(self._pool._invalidate, fairy, exc)
            raise
        except BaseException:
            # cancelled (a sibling field failed): the statement may still be running on it
            await greenlet_spawn(fairy.invalidate)
            raise
        finally:
            await greenlet_spawn(fairy.close)
        return compiled.rows(records)


class _DriverStatement:
    """A SELECT compiled for asyncpg: its SQL, how to bind its parameters and how to turn the
    driver's records into rows, with SQLAlchemy's bind and result processors."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if compiled.positiontup is None or compiled.literal_execute_params:
            raise ValueError("not a statement with positional parameters only")
        self.sql = compiled.string
        self.names = tuple(compiled.positiontup)
        self.binds = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in self.names
        )
        self.columns = list(statement.selected_columns)
        self.row = namedtuple("Row", [column.key for column in self.columns])  # type: ignore[misc]
        self.dialect = dialect
        self.processors: list[tuple[int, Callable[[Any], Any]]] | None = None

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        return [
            params[name] if bind is None else bind(params[name])
            for name, bind in zip(self.names, self.binds, strict=True)
        ]

    async def describe(self, driver: Any) -> None:
        """The result processors, which depend on the types the server reports."""
        prepared = await driver.prepare(self.sql)
        processors: list[tuple[int, Callable[[Any], Any]]] = []
        for index, (column, attribute) in enumerate(
            zip(self.columns, prepared.get_attributes(), strict=True)
        ):
            impl = column.type.dialect_impl(self.dialect)
            process = impl.result_processor(self.dialect, attribute.type.oid)
            if process is not None:
                processors.append((index, process))
        self.processors = processors

    def rows(self, records: Sequence[Any]) -> list[Any]:
        row = self.row
        processors = self.processors or ()
        if not processors:
            return [row(*record) for record in records]
        rows = []
        for record in records:
            values = list(record)
            for index, process in processors:
                values[index] = process(values[index])
            rows.append(row(*values))
        return rows


def _driver_lost(exc: Exception) -> bool:
    """A connection-level failure seen through the pool or the driver itself."""
    if isinstance(exc, DBAPIError):
        return is_disconnect(exc)
    if isinstance(exc, OSError | TimeoutError):
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError):
        return True
    if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
        return True
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state.startswith(TRANSIENT_SQLSTATE_CLASSES)


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
