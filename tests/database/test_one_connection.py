"""A pool of one (DB_POOL_MAX_SIZE=1, as in Lambda) is one connection that
callers take turns on, and that is never handed on in an unknown state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database import DatabaseUnavailable, config, pool, sql, time_budget, transaction
from repositories import tokens
from tests import db

CALLERS = 60


@pytest.fixture
async def one_connection() -> AsyncIterator[None]:
    await pool.close_pool()
    config.configure(pool_min_size=1, pool_max_size=1)
    try:
        yield
    finally:
        await pool.close_pool()


async def backends(admin: asyncpg.Connection) -> int:
    """The app's backends on the server, once those of connections closed
    before this test have exited (up to 5 s): a backend on its way out
    leaves, a connection still open stays and is counted."""
    count: int = 0
    deadline = time.monotonic() + 5
    while True:
        count = await admin.fetchval(
            "select count(*) from pg_stat_activity where application_name = 'dreamlens'"
        )
        if count <= 1 or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


async def test_it_is_one_connection_made_on_first_use(
    one_connection: None, admin: asyncpg.Connection
) -> None:
    opened = pool.connections_opened
    pids = {await sql.fetchval("select pg_backend_pid()") for _ in range(10)}
    assert isinstance(await pool.get_pool(), pool.OneConnection)
    assert len(pids) == 1
    assert pool.connections_opened == opened + 1
    assert await backends(admin) == 1


async def test_concurrent_callers_take_turns_and_every_spend_lands(
    one_connection: None, admin: asyncpg.Connection
) -> None:
    """Many tasks at once on one connection (the local server with a pool of
    one): none sees another's operation in progress, each spend is applied
    once, and the ledger balances."""
    user_id = await db.insert_user(admin, device_id="device-one-connection")
    await tokens.credit(user_id, 2 * CALLERS, "bonus", "one-connection-grant")
    start = await db.balance(admin, user_id)

    async def caller(number: int) -> None:
        async with transaction() as tx:
            await tokens.spend(user_id, 1, f"one-connection-{number}-a", db=tx)
            await asyncio.sleep(0)  # yield inside the transaction: the others must wait
            await tokens.spend(user_id, 1, f"one-connection-{number}-b", db=tx)

    await asyncio.gather(*(caller(number) for number in range(CALLERS)))
    assert await db.balance(admin, user_id) == start - 2 * CALLERS
    spends = [entry for entry in await db.ledger(admin, user_id) if entry["type"] == "spend"]
    assert len(spends) == 2 * CALLERS
    assert await backends(admin) == 1
    assert await db.audit_problems(admin) == []


async def test_a_caller_cancelled_mid_transaction_leaves_nothing_behind(
    one_connection: None, admin: asyncpg.Connection
) -> None:
    """Cancelled inside a transaction, its connection is terminated: the
    server rolls the insert back, and the next caller gets a new connection."""
    first = await sql.fetchval("select pg_backend_pid()")
    inside = asyncio.Event()

    async def cancelled_caller() -> None:
        async with transaction() as tx:
            await tx.execute("insert into users (clerk_id) values ('user_cancelled')")
            inside.set()
            await tx.execute("select pg_sleep(30)")

    task = asyncio.create_task(cancelled_caller())
    await inside.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    second = await sql.fetchval("select pg_backend_pid()")
    assert second != first
    assert await admin.fetchval("select count(*) from users where clerk_id = 'user_cancelled'") == 0


async def test_a_caller_waiting_for_its_turn_is_bounded_by_the_budget(
    one_connection: None, admin: asyncpg.Connection
) -> None:
    """While another caller holds the connection, a caller with a time budget
    gives up when it is spent (503 unavailable), and the holder finishes."""
    holding = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> int:
        async with transaction() as tx:
            holding.set()
            await release.wait()
            value: int = await tx.fetchval("select 41 + 1")
            return value

    task = asyncio.create_task(holder())
    await holding.wait()
    with time_budget(0.2), pytest.raises(DatabaseUnavailable):
        await sql.fetchval("select 1")
    release.set()
    assert await task == 42
    assert await sql.fetchval("select 2") == 2


async def test_a_closed_pool_of_one_refuses_and_a_new_one_is_made(one_connection: None) -> None:
    made = await pool.get_pool()
    await sql.fetchval("select 1")
    await pool.close_pool()
    assert made.is_closing()
    assert await sql.fetchval("select 3") == 3
    assert await pool.get_pool() is not made
