"""Regressions found by the fault tests, each pinned down on its own.

A backend terminated while its connection sits idle in the pool (or between
a transaction's statements) sends its FATAL message and closes. asyncpg
reads the message at once but sees the close a moment later; in between,
the connection looks open and the pool hands it out. The proxy
(tests/reliability/proxy.py) holds that moment open for a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database import Transaction, config, pool, sql, stats
from database.executor import run_in_transaction
from tests.reliability.proxy import FaultyProxy, faulty_proxy


@pytest.fixture
async def proxy(direct_url: str) -> AsyncIterator[FaultyProxy]:
    """The app's pool, one connection wide, through the lingering proxy."""
    async with faulty_proxy(direct_url, close_delay=1.0) as started:
        await pool.close_pool()
        config.configure(url=started.url, non_pooling_url=started.url, pool_min_size=1, pool_max_size=1)
        try:
            yield started
        finally:
            await pool.close_pool()


async def terminate(admin: asyncpg.Connection, proxy: FaultyProxy, pid: int) -> None:
    """Terminate a backend and let its FATAL reach the client, socket still open."""
    assert await admin.fetchval("select pg_terminate_backend($1)", pid)
    await proxy.server_closed.wait()
    await asyncio.sleep(0.05)  # the client's loop reads what the proxy passed on


async def test_a_pooled_connection_whose_backend_was_terminated_is_discarded_and_retried(
    proxy: FaultyProxy, admin: asyncpg.Connection
) -> None:
    """Bug: the next statement on a pooled connection whose backend had been
    terminated (its FATAL read, its close not yet seen) failed with asyncpg's
    InternalClientError "cannot switch to state 12; another operation (2) is
    in progress". sql() did not count that as transient and let it escape:
    500 internal under pg_terminate_backend. And the pool would have handed
    the same broken connection out again. Now the connection is discarded
    and the statement retried on a new one."""
    first = await sql.fetchval("select pg_backend_pid()")
    await terminate(admin, proxy, first)

    with stats.collect() as counted:
        second = await sql.fetchval("select pg_backend_pid()")
    assert second != first
    assert counted.retries == 1


async def test_a_transaction_whose_backend_was_terminated_between_statements_is_retried_whole(
    proxy: FaultyProxy, admin: asyncpg.Connection
) -> None:
    """Bug: a backend terminated between a transaction's statements left
    COMMIT unable to start (InternalClientError "cannot switch to state 15"),
    and run_in_transaction() answered 500 instead of retrying the unit."""
    attempts: list[int] = []

    async def work(tx: Transaction) -> int:
        pid: int = await tx.fetchval("select pg_backend_pid()")
        await tx.execute("insert into users (clerk_id) values ('user_terminated_tx')")
        if not attempts:
            await terminate(admin, proxy, pid)
        attempts.append(pid)
        return pid

    with stats.collect() as counted:
        await run_in_transaction(work)
    assert len(attempts) == 2
    assert counted.retries == 1
    # the first attempt died with its transaction: one user, one welcome bonus
    assert await admin.fetchval("select count(*) from users where clerk_id = 'user_terminated_tx'") == 1
    assert await admin.fetchval("select count(*) from token_transactions") == 1
