"""One pool per process, created lazily and bound to the running loop.

Mangum runs every invocation on one persistent event loop, so the pool made
on the first request serves every warm request after it. A pool made on
another loop (a test's, or an `asyncio.run()` at import) cannot be used from
this one: it is dropped and a new pool is made.

A pool of one (DB_POOL_MAX_SIZE=1, the default inside Lambda, which runs one
request at a time) is a single connection (OneConnection): asyncpg's Pool
would spend about 90 µs of every warm request on sharing a connection that
is never shared (a proxy object, a shielded task on release, an idle timer).
Larger pools (the local server, the tests' concurrent callers) are asyncpg's.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, TypeAlias

import asyncpg

from database import config

Pool: TypeAlias = "asyncpg.Pool | OneConnection"

_pool: Pool | None = None
_pool_loop: asyncio.AbstractEventLoop | None = None
_lock: asyncio.Lock | None = None

# connections opened by this process (tests check warm invocations reuse one)
connections_opened = 0


async def _keep_session(connection: asyncpg.Connection) -> None:
    """No reset query on release.

    asyncpg's default reset (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL)
    is one more round trip on every request; nothing here uses session state,
    and asyncpg still rolls back a transaction left open.
    """


async def _on_connect(connection: asyncpg.Connection) -> None:
    global connections_opened
    connections_opened += 1


def connect_arguments(settings: config.Settings) -> dict[str, Any]:
    # Plan periods are days added to timestamps, and a day is 24 hours only
    # in a zone without clock changes: in the database's own zone (when not
    # UTC) a month bought before clocks go forward would end an hour early,
    # and a refund of it would leave that hour
    server_settings = {"application_name": "dreamlens", "TimeZone": "UTC"}
    if settings.statement_timeout_ms > 0:
        server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
    if settings.client_check_interval_ms > 0:
        server_settings["client_connection_check_interval"] = str(settings.client_check_interval_ms)
    return {
        "statement_cache_size": settings.statement_cache_size,
        "timeout": settings.connect_timeout,
        "command_timeout": settings.command_timeout,
        "server_settings": server_settings,
    }


class OneConnection:
    """A pool of one connection, made on first use and made again once closed.

    Callers take turns (an asyncio.Lock), so the local server still works
    with DB_POOL_MAX_SIZE=1. A connection is handed back only in a known
    state: one given back inside a transaction or by a cancelled caller (a
    query may still be running on it) is terminated, and the server rolls
    back whatever it had open; the next caller connects anew."""

    def __init__(self) -> None:
        self._connection: asyncpg.Connection | None = None
        self._turn = asyncio.Lock()
        self._closing = False

    def is_closing(self) -> bool:
        return self._closing

    def get_idle_size(self) -> int:
        # a closed connection is not idle: taking it means connecting anew,
        # which the caller must bound by the request's time (asyncpg's pool
        # counts the same way)
        connection = self._connection
        if self._turn.locked() or connection is None or connection.is_closed():
            return 0
        return 1

    def acquire(self, *, timeout: float | None = None) -> _Turn:
        return _Turn(self, timeout)

    async def _take(self, wait: float | None) -> asyncpg.Connection:
        if self._closing:
            raise asyncpg.InterfaceError("the pool is closed")
        if self._turn.locked() and wait is not None:
            await asyncio.wait_for(self._turn.acquire(), wait)
        else:
            await self._turn.acquire()  # free: taken without suspending
        try:
            connection = self._connection
            if connection is None or connection.is_closed():
                connection = await self._connect(wait)
            return connection
        except BaseException:
            self._turn.release()
            raise

    async def _connect(self, within: float | None) -> asyncpg.Connection:
        self._connection = None
        # the settings of now, not of when the pool was made: a URL that
        # failed may have been corrected since (a secret loaded, a test)
        settings = config.settings()
        arguments = connect_arguments(settings)
        if within is not None:
            arguments["timeout"] = min(within, arguments["timeout"])
        connection: asyncpg.Connection = await asyncpg.connect(settings.url, **arguments)
        await _on_connect(connection)
        self._connection = connection
        return connection

    def _give_back(self, connection: asyncpg.Connection, clean: bool) -> None:
        if connection.is_closed():
            pass  # the next caller connects anew
        elif not clean or connection.is_in_transaction():
            connection.terminate()
        self._turn.release()

    async def close(self) -> None:
        self._closing = True
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            await connection.close()

    def terminate(self) -> None:
        self._closing = True
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.terminate()


class _Turn:
    """`async with one.acquire(timeout=...) as connection:`, as asyncpg's Pool."""

    __slots__ = ("_connection", "_owner", "_timeout")

    def __init__(self, owner: OneConnection, timeout: float | None) -> None:
        self._owner = owner
        self._timeout = timeout
        self._connection: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._connection = await self._owner._take(self._timeout)
        return self._connection

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        assert self._connection is not None
        # an Exception came back from a query that ended; anything else (a
        # cancellation) may have left one running
        clean = kind is None or issubclass(kind, Exception)
        self._owner._give_back(self._connection, clean)


def current() -> Pool | None:
    """The open pool of the running loop, or None: the warm path, no await."""
    if _pool is not None and _pool_loop is asyncio.get_running_loop() and not _pool.is_closing():
        return _pool
    return None


async def get_pool() -> Pool:
    global _pool, _pool_loop, _lock
    loop = asyncio.get_running_loop()
    if _pool is not None and _pool_loop is loop and not _pool.is_closing():
        return _pool
    if _lock is None or _pool_loop is not loop:
        _lock = asyncio.Lock()
        _pool_loop = loop
        if _pool is not None:
            # made on another loop: its sockets belong to that loop
            _pool.terminate()
            _pool = None
    async with _lock:
        if _pool is None or _pool.is_closing():
            settings = config.settings()
            if settings.pool_max_size == 1:
                _pool = OneConnection()
                return _pool
            _pool = await asyncpg.create_pool(
                settings.url,
                min_size=settings.pool_min_size,
                max_size=settings.pool_max_size,
                init=_on_connect,
                reset=_keep_session,
                **connect_arguments(settings),
            )
        return _pool


async def close_pool() -> None:
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        await pool.close()


async def connect_direct() -> asyncpg.Connection:
    """A connection outside the pool, on the non-pooling URL (init, migrations)."""
    settings = config.settings()
    return await asyncpg.connect(settings.non_pooling_url, **connect_arguments(settings))
