"""One asyncpg pool per process, created lazily and bound to the running loop.

Mangum runs every invocation on one persistent event loop, so the pool made
on the first request serves every warm request after it. A pool made on
another loop (a test's, or an `asyncio.run()` at import) cannot be used from
this one: it is dropped and a new pool is made.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from database import config

_pool: asyncpg.Pool | None = None
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
    server_settings = {"application_name": "dreamlens"}
    if settings.statement_timeout_ms > 0:
        server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
    return {
        "statement_cache_size": settings.statement_cache_size,
        "timeout": settings.connect_timeout,
        "command_timeout": settings.command_timeout,
        "server_settings": server_settings,
    }


def current() -> asyncpg.Pool | None:
    """The open pool of the running loop, or None: the warm path, no await."""
    if _pool is not None and _pool_loop is asyncio.get_running_loop() and not _pool.is_closing():
        return _pool
    return None


async def get_pool() -> asyncpg.Pool:
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
