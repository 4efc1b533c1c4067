"""sql(): the one door every statement goes through.

In this order it adds: the lazily made pool (database/pool.py); retries of
transient faults with tenacity (at most 3 attempts, exponential backoff from
100 ms); lazy initialization of an empty database; timing of each statement.
Errors leave as the project's own (database/errors.py).

A write may be retried after an unknown outcome only because every write in
repositories/ is idempotent by key: the ledger's idempotency key, the
provider's payment id, the generation id. A statement that is not must not
be sent through sql().
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import asyncpg
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from database import config, pool, stats
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


def round_trips_per_statement() -> int:
    # with the statement cache off (PgBouncer, RDS Proxy) every statement is
    # prepared anew: one round trip to prepare, one to execute
    return 1 if config.settings().statement_cache_size > 0 else 2


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
    started = time.perf_counter()
    try:
        return await getattr(connection, method)(query, *args)
    except Exception as exc:
        if _refused_by_asyncpg(exc):
            await _end_unfinished_query(connection)
        raise
    finally:
        ms = (time.perf_counter() - started) * 1000
        stats.record(
            stats.statement_name(query),
            ms,
            round_trips_per_statement(),
            config.settings().slow_statement_ms,
        )


def _retrying() -> AsyncRetrying:
    return AsyncRetrying(
        stop=stop_after_attempt(MAX_ATTEMPTS),
        wait=wait_exponential(multiplier=0.1, max=2) + wait_random(0, 0.05),
        retry=retry_if_exception(_is_transient),
        reraise=True,
    )


async def run_with_retries(work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` with lazy init and transient-fault retries; errors translated.

    `work` must be a whole unit (one statement, or one whole transaction):
    retrying half a transaction would apply its first half twice.
    """
    try:
        attempt_number = 0
        async for attempt in _retrying():
            with attempt:
                stats.record_attempt(retry=attempt_number > 0)
                attempt_number += 1
                try:
                    return await work()
                except asyncpg.UndefinedTableError:
                    # an empty database: create the schema once, then run again
                    await ensure_initialized()
                    return await work()
    except BaseException as exc:
        translated = translate(exc)
        if translated is exc:
            raise
        raise translated from exc
    raise AssertionError("unreachable: tenacity either returns or raises")


class Sql:
    """The wrapper. `await sql.fetchrow(QUERY, a, b)`; `await sql(QUERY, ...)` fetches all."""

    async def _run(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        async def once() -> Any:
            connection_pool = await pool.get_pool()
            async with connection_pool.acquire() as connection:
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
        connection_pool = await pool.get_pool()
        async with connection_pool.acquire() as connection:
            tx = connection.transaction()
            await tx.start()
            stats.record_round_trips(1)
            try:
                yield Transaction(connection)
            except BaseException:
                if not connection.is_closed():
                    await tx.rollback()
                    stats.record_round_trips(1)
                raise
            await tx.commit()
            stats.record_round_trips(1)
    except BaseException as exc:
        translated = translate(exc)
        if translated is exc:
            raise
        raise translated from exc


async def run_in_transaction(work: Callable[[Transaction], Awaitable[T]]) -> T:
    """Run `work(tx)` in one transaction, retried whole on transient faults,
    with lazy init of an empty database."""

    async def once() -> T:
        connection_pool = await pool.get_pool()
        async with connection_pool.acquire() as connection, connection.transaction():
            stats.record_round_trips(2)  # BEGIN and COMMIT
            return await work(Transaction(connection))

    return await run_with_retries(once)
