"""sql(): the one door every statement goes through.

In this order it adds: the lazily made pool (database/pool.py); retries of
transient faults with tenacity (at most 3 attempts, exponential backoff from
100 ms); lazy initialization of an empty database; timing of each statement.
Errors leave as the project's own (database/errors.py).

The first attempt runs without tenacity, which takes over (imported then)
only after a transient fault: building its retry machinery around every
statement cost a warm POST /api/generations 70-250 µs of CPU and ~0.2 ms of
its ~1.4 ms p50 (bench/warm_overhead.py), and its import cost every cold start.

Inside a request's time budget (database/budget.py) every pool acquire,
statement, BEGIN and COMMIT is bounded by the time left, and no retry starts
that could not finish. A connection whose statement ran out of time, or
whose protocol lost its footing, is dropped, never handed out again: the
cancel request asyncpg would send and wait for takes the road that just
failed, and the server rolls back a connection that goes away.

A write may be retried after an unknown outcome only because every write in
repositories/ is idempotent by key: the ledger's idempotency key, the
provider's payment id, the generation id. A statement that is not must not
be sent through sql().
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import asyncpg

from database import budget, config, pool, stats
from database.errors import is_transient as _is_transient
from database.errors import translate
from database.migrations import ensure_initialized

T = TypeVar("T")

# a pool hands out proxies; a direct connection is the real thing
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

MAX_ATTEMPTS = 3


class Executor(Protocol):
    """What repositories take: `sql` itself, or a transaction's `tx`."""

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]: ...
    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


def round_trips_per_statement(settings: config.Settings | None = None) -> int:
    # with the statement cache off (PgBouncer, RDS Proxy) every statement is
    # prepared anew: one round trip to prepare, one to execute
    return 1 if (settings or config.settings()).statement_cache_size > 0 else 2


def _timeout(settings: config.Settings | None = None) -> float | None:
    """One operation's timeout: the configured command timeout, or less when
    the request's budget has less left (TimeoutError when it is spent)."""
    return budget.bounded((settings or config.settings()).command_timeout or None)


# a simple-protocol query: the server ends any unfinished extended query with it
END_UNFINISHED_QUERY = "select"


def _refused_by_asyncpg(exc: Exception) -> bool:
    """Raised by asyncpg itself, not sent by the server: no Sync went out.

    A malformed argument is an asyncpg.DataError (a PostgresError subclass)
    that asyncpg builds itself; the server's errors always carry a severity.
    """
    if isinstance(exc, asyncpg.InterfaceError):
        return True
    return isinstance(exc, asyncpg.PostgresError) and exc.severity is None


async def _end_unfinished_query(connection: Connection) -> None:
    """Bring the server back to idle after asyncpg refused a statement's arguments.

    asyncpg sends Parse and Describe with Flush (no Sync), then encodes the
    arguments; when that fails (a malformed address for an inet, a wrong
    argument count) it raises without sending Bind/Execute/Sync. The server
    then waits mid extended query inside an implicit transaction, holding the
    statement's locks (a TRUNCATE or a migration waits behind them) for as long
    as the connection sits in the pool; pg_stat_activity shows it `active` in
    ClientRead, so idle_in_transaction_session_timeout does not end it. Behind
    a transaction pooler it also pins a server connection to this client.
    With the statement cache on this shows only on a statement's first use;
    with it off (PgBouncer) on every such error. Inside a transaction block
    its COMMIT or ROLLBACK ends the query instead.
    """
    if connection.is_closed() or connection.is_in_transaction():
        return
    try:
        await connection.execute(END_UNFINISHED_QUERY)
    except asyncpg.InterfaceError:
        # another operation is running on it and will end with its own Sync
        return
    except (asyncpg.PostgresError, OSError, TimeoutError):
        # a connection in an unknown state must not go back to the pool
        connection.terminate()
        return
    stats.record_round_trips(1)


async def _timed(connection: Connection, method: str, query: str, args: tuple[Any, ...]) -> Any:
    settings = config.settings()
    started = time.perf_counter()
    try:
        return await getattr(connection, method)(query, *args, timeout=_timeout(settings))
    except Exception as exc:
        if _refused_by_asyncpg(exc):
            await _end_unfinished_query(connection)
        raise
    finally:
        ms = (time.perf_counter() - started) * 1000
        stats.record(
            query,
            ms,
            round_trips_per_statement(settings),
            settings.slow_statement_ms,
        )


async def _attempt(work: Callable[[], Awaitable[T]]) -> T:
    try:
        return await work()
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, asyncpg.UndefinedFunctionError):
        # an empty database, or one this code reached before its migration
        # (a deploy before `init-db`): apply what is missing once, run again
        await ensure_initialized()
        return await work()


async def _retry(work: Callable[[], Awaitable[T]], failure: BaseException) -> T:
    """Attempts 2..MAX_ATTEMPTS after the transient `failure` of the first,
    with tenacity's backoff, and none the request's budget could not fit.
    Tenacity's first attempt replays that failure, so its wait and stop count
    it as made. Imported here: a warm request that never fails never pays
    for tenacity."""
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random
    from tenacity.stop import stop_base

    class OutOfTime(stop_base):
        def __call__(self, retry_state: object) -> bool:
            return budget.too_late_to_retry()

    replayed = False
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(MAX_ATTEMPTS) | OutOfTime(),
        wait=wait_exponential(multiplier=0.1, max=2) + wait_random(0, 0.05),
        retry=retry_if_exception(_is_transient),
        reraise=True,
    ):
        with attempt:
            if not replayed:
                replayed = True
                raise failure
            stats.record_attempt(retry=True)
            return await _attempt(work)
    raise AssertionError("unreachable: tenacity either returns or raises")


async def run_with_retries(work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` with lazy init and transient-fault retries; errors translated.

    `work` must be a whole unit (one statement, or one whole transaction):
    retrying half a transaction would apply its first half twice.
    """
    try:
        stats.record_attempt(retry=False)
        try:
            return await _attempt(work)
        except BaseException as exc:
            if not _is_transient(exc):
                raise
            failure = exc
        return await _retry(work, failure)
    except BaseException as exc:
        translated = translate(exc)
        if translated is exc:
            raise
        raise translated from exc


class _Pooled:
    """A connection from the pool (both bounded by the request's budget),
    dropped instead of returned when a statement on it ran out of time or its
    protocol lost its footing (errors.PROTOCOL_LOST): asyncpg would otherwise
    wait on it, or hand the same broken connection to the next request.

    A class, not an @asynccontextmanager: every statement passes through it,
    and the generator machinery cost each one a few more frames."""

    __slots__ = ("_connection", "_turn")

    async def __aenter__(self) -> Connection:
        connection_pool = pool.current()
        if connection_pool is None:
            async with asyncio.timeout(budget.bounded(None)):
                connection_pool = await pool.get_pool()
        # an idle connection is handed over without waiting, so only a wait for
        # one (a busy local server) needs the timer a bounded acquire costs
        wait = budget.bounded(None) if connection_pool.get_idle_size() == 0 else None
        self._turn = connection_pool.acquire(timeout=wait)
        self._connection: Connection = await self._turn.__aenter__()
        return self._connection

    async def __aexit__(self, kind: Any, error: BaseException | None, trace: Any) -> None:
        if isinstance(error, asyncpg.InternalClientError | TimeoutError):
            self._connection.terminate()
        await self._turn.__aexit__(kind, error, trace)


async def _command(connection: Connection, command: str) -> None:
    """BEGIN or COMMIT: a round trip, though not a statement we wrote."""
    await connection.execute(command, timeout=_timeout())
    stats.record_round_trips(1)


async def _roll_back(connection: Connection) -> None:
    """ROLLBACK, or drop the connection when that cannot be done in time: the
    server rolls back the transaction of a connection that goes away."""
    if connection.is_closed() or not connection.is_in_transaction():
        return
    try:
        await connection.execute("rollback", timeout=_timeout())
        stats.record_round_trips(1)
    except Exception:
        connection.terminate()
    except BaseException:
        connection.terminate()
        raise


class Sql:
    """The wrapper. `await sql.fetchrow(QUERY, a, b)`; `await sql(QUERY, ...)` fetches all."""

    async def _run(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        async def once() -> Any:
            async with _Pooled() as connection:
                return await _timed(connection, method, query, args)

        return await run_with_retries(once)

    async def __call__(self, query: str, *args: Any) -> list[asyncpg.Record]:
        result: list[asyncpg.Record] = await self._run("fetch", query, args)
        return result

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        result: list[asyncpg.Record] = await self._run("fetch", query, args)
        return result

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        result: asyncpg.Record | None = await self._run("fetchrow", query, args)
        return result

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._run("fetchval", query, args)

    async def execute(self, query: str, *args: Any) -> str:
        result: str = await self._run("execute", query, args)
        return result


sql = Sql()


class Transaction:
    """One connection in one transaction; the same methods as `sql`, no retries
    per statement (a retry wraps the whole unit: see run_in_transaction)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        result: list[asyncpg.Record] = await _timed(self._connection, "fetch", query, args)
        return result

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        result: asyncpg.Record | None = await _timed(self._connection, "fetchrow", query, args)
        return result

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await _timed(self._connection, "fetchval", query, args)

    async def execute(self, query: str, *args: Any) -> str:
        result: str = await _timed(self._connection, "execute", query, args)
        return result


@asynccontextmanager
async def transaction() -> AsyncIterator[Transaction]:
    """`async with transaction() as tx:` commit on success, roll back on any error.

    Errors are translated, but nothing is retried: wrap the unit in
    run_in_transaction() for that.
    """
    try:
        async with _Pooled() as connection:
            await _command(connection, "begin")
            try:
                yield Transaction(connection)
                await _command(connection, "commit")
            except BaseException:
                await _roll_back(connection)
                raise
    except BaseException as exc:
        translated = translate(exc)
        if translated is exc:
            raise
        raise translated from exc


async def run_in_transaction(work: Callable[[Transaction], Awaitable[T]]) -> T:
    """Run `work(tx)` in one transaction, retried whole on transient faults,
    with lazy init of an empty database."""

    async def once() -> T:
        async with _Pooled() as connection:
            await _command(connection, "begin")
            try:
                result = await work(Transaction(connection))
                await _command(connection, "commit")
            except BaseException:
                await _roll_back(connection)
                raise
            return result

    return await run_with_retries(once)


async def ping() -> None:
    """One round trip through sql(): returns when the database answers, and
    raises what any statement would when it cannot (GET /api/health)."""
    await sql.fetchval("select 1")
