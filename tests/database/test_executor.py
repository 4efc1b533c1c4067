"""sql(): retries for transient faults only, timing, errors, transactions."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from database import (
    Conflict,
    DatabaseUnavailable,
    InvalidRequest,
    Transaction,
    config,
    pool,
    sql,
    stats,
    transaction,
)
from database.executor import run_in_transaction
from tests import db

# nextval is not transactional: the first call terminates its own backend
# (as an operator's pg_terminate_backend or a failover would), later calls pass
FAULT_ONCE = """
select case when nextval('fault_once') = 1
            then pg_terminate_backend(pg_backend_pid())
            else true end
"""


async def test_terminated_backend_is_retried_and_succeeds(admin: asyncpg.Connection) -> None:
    await admin.execute("create sequence if not exists fault_once; select setval('fault_once', 1, false)")
    try:
        with stats.collect() as counted:
            assert await sql.fetchval(FAULT_ONCE) is True
        assert counted.attempts == 2
        assert counted.retries == 1
    finally:
        await admin.execute("drop sequence fault_once")


async def test_terminated_write_is_applied_once_by_its_key(admin: asyncpg.Connection) -> None:
    """A write whose connection dies is retried, and its idempotency key makes
    the retry a no-op if the first attempt had committed."""
    user_id = await db.insert_user(admin, clerk_id="user_retry_write")
    await admin.execute("create sequence if not exists fault_once; select setval('fault_once', 1, false)")
    write = """
    with fault as (select case when nextval('fault_once') = 1
                               then pg_terminate_backend(pg_backend_pid()) end)
    insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)
    select $1, 1, 11, 'adjustment', 'retry-key' from fault
    on conflict (user_id, idempotency_key) do nothing
    """
    try:
        with stats.collect() as counted:
            await sql.execute(write, user_id)
        assert counted.retries == 1
        keys = [row["idempotency_key"] for row in await db.ledger(admin, user_id)]
        assert keys == ["welcome_bonus", "retry-key"]
    finally:
        await admin.execute("drop sequence fault_once")


async def test_a_fault_that_persists_is_tried_three_times_then_unavailable() -> None:
    with stats.collect() as counted, pytest.raises(DatabaseUnavailable):
        await sql.fetchval("select pg_terminate_backend(pg_backend_pid())")
    assert (counted.attempts, counted.retries) == (3, 2)


async def test_unique_violation_is_not_retried(admin: asyncpg.Connection) -> None:
    await db.insert_user(admin, clerk_id="user_dup")
    with stats.collect() as counted, pytest.raises(Conflict):
        await sql.execute("insert into users (clerk_id) values ('user_dup')")
    assert counted.attempts == 1


async def test_check_violation_is_not_retried(admin: asyncpg.Connection) -> None:
    await db.insert_user(admin, clerk_id="user_check")
    with stats.collect() as counted, pytest.raises(InvalidRequest):
        await sql.execute("update user_tokens set balance = balance - 1000")
    assert counted.attempts == 1


async def test_syntax_error_is_not_retried() -> None:
    with stats.collect() as counted, pytest.raises(asyncpg.PostgresSyntaxError):
        await sql.execute("selec 1")
    assert counted.attempts == 1


async def test_statements_and_round_trips_are_counted() -> None:
    with stats.collect() as counted:
        await sql.fetchval("select 1")
        await sql.fetch("select 2")
    assert counted.statements == 2
    assert counted.round_trips == 2
    assert counted.db_ms > 0


async def test_slow_statement_is_logged_by_name_without_parameters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dreamlens.database")
    await sql.fetchval("-- name: sleepy_prompt_lookup\nselect pg_sleep(0.15)::text || $1", "my secret prompt")
    messages = [record.getMessage() for record in caplog.records]
    assert any("slow statement sleepy_prompt_lookup" in m for m in messages)
    assert not any("my secret prompt" in m for m in messages)


async def test_fast_statement_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dreamlens.database")
    await sql.fetchval("select 1")
    assert caplog.records == []


async def test_a_lock_timeout_is_unavailable_and_not_retried(admin: asyncpg.Connection) -> None:
    """A migration waits for its locks under lock_timeout (and a role may set
    one): running out of it is a 503 to try again later, not a 500."""
    user_id = await db.insert_user(admin, clerk_id="user_lock_timeout")

    async def wait_for_the_wallet(tx: Transaction) -> None:
        await tx.execute("set local lock_timeout = '50ms'")
        await tx.execute("select 1 from user_tokens where user_id = $1 for update", user_id)

    async with admin.transaction():
        await admin.execute("select 1 from user_tokens where user_id = $1 for update", user_id)
        with stats.collect() as counted, pytest.raises(DatabaseUnavailable, match="busy"):
            await run_in_transaction(wait_for_the_wallet)
    assert counted.retries == 0


async def test_failed_unit_of_work_rolls_back_every_statement(admin: asyncpg.Connection) -> None:
    with pytest.raises(Conflict):
        async with transaction() as tx:
            await tx.execute("insert into users (clerk_id) values ('user_tx_1')")
            await tx.execute("insert into users (device_id) values ('device-tx-0001')")
            await tx.execute("insert into users (clerk_id) values ('user_tx_1')")
    assert await admin.fetchval("select count(*) from users") == 0
    assert await admin.fetchval("select count(*) from user_tokens") == 0
    assert await admin.fetchval("select count(*) from token_transactions") == 0


async def test_application_error_in_unit_of_work_rolls_back(admin: asyncpg.Connection) -> None:
    class Abandon(Exception):
        pass

    with pytest.raises(Abandon):
        async with transaction() as tx:
            await tx.execute("insert into users (clerk_id) values ('user_tx_2')")
            raise Abandon
    assert await admin.fetchval("select count(*) from users") == 0


async def test_successful_unit_of_work_commits_and_shares_one_connection(
    admin: asyncpg.Connection,
) -> None:
    async with transaction() as tx:
        first = await tx.fetchval("select pg_backend_pid()")
        await tx.execute("insert into users (clerk_id) values ('user_tx_3')")
        assert await tx.fetchval("select pg_backend_pid()") == first
    assert await admin.fetchval("select count(*) from users") == 1


async def test_run_in_transaction_retries_the_whole_unit(admin: asyncpg.Connection) -> None:
    await admin.execute("create sequence if not exists fault_once; select setval('fault_once', 1, false)")
    calls = 0

    async def work(tx: Transaction) -> bool:
        nonlocal calls
        calls += 1
        await tx.execute("insert into users (clerk_id) values ('user_unit')")
        value: bool = await tx.fetchval(FAULT_ONCE)
        return value

    try:
        with stats.collect() as counted:
            await run_in_transaction(work)
        assert calls == 2
        assert counted.retries == 1
        # the first attempt's insert died with its transaction
        assert await admin.fetchval("select count(*) from users where clerk_id = 'user_unit'") == 1
        assert await admin.fetchval("select count(*) from token_transactions") == 1
    finally:
        await admin.execute("drop sequence fault_once")


async def test_pool_is_reused_across_calls() -> None:
    await sql.fetchval("select 1")
    opened = pool.connections_opened
    for _ in range(20):
        await sql.fetchval("select 1")
    assert pool.connections_opened == opened


LOG_FROM_ADDRESS = "insert into usage_logs (action, source_ip) values ('signup', $1::inet)"


@pytest.mark.parametrize("statement_cache_size", [0, 100])
async def test_refused_argument_leaves_no_query_holding_locks(
    admin: asyncpg.Connection, statement_cache_size: int
) -> None:
    """asyncpg refuses a malformed argument only after sending the statement's
    Parse: the connection must go back to the pool idle, not mid extended
    query in a transaction that holds the table's locks (behind PgBouncer
    that also pins a server connection to the client)."""
    await pool.close_pool()
    config.configure(statement_cache_size=statement_cache_size, pool_max_size=1)
    try:
        with stats.collect() as counted, pytest.raises(InvalidRequest):
            await sql.execute(LOG_FROM_ADDRESS, "not an address")
        assert counted.attempts == 1
        in_transaction = await admin.fetchval(
            "select count(*) from pg_stat_activity"
            " where application_name = 'dreamlens' and xact_start is not null"
        )
        assert in_transaction == 0
        async with admin.transaction():
            await admin.execute("lock table usage_logs in access exclusive mode nowait")
        # the same pooled connection still works
        await sql.execute(LOG_FROM_ADDRESS, "203.0.113.7")
        assert await admin.fetchval("select count(*) from usage_logs") == 1
    finally:
        await pool.close_pool()


async def test_wrong_argument_count_leaves_no_query_holding_locks(admin: asyncpg.Connection) -> None:
    await pool.close_pool()
    config.configure(statement_cache_size=0, pool_max_size=1)
    try:
        with pytest.raises(asyncpg.InterfaceError, match="expects 1 argument"):
            await sql.execute(LOG_FROM_ADDRESS, "203.0.113.7", "one too many")
        async with admin.transaction():
            await admin.execute("lock table usage_logs in access exclusive mode nowait")
    finally:
        await pool.close_pool()
