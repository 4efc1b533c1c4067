"""Scheduled jobs on real data, called as the CLI and Lambda's scheduler call them."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from database import ConfigurationError, pool
from functions import jobs
from tests import db


async def insert_usage(admin: asyncpg.Connection, count: int, age: timedelta) -> None:
    await admin.execute(
        "insert into usage_logs (action, created_at)"
        " select 'download', now() - $2::interval from generate_series(1, $1)",
        count,
        age,
    )


async def test_prune_removes_only_old_rows_in_bounded_batches(
    admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USAGE_PRUNE_BATCH_SIZE", "7")
    monkeypatch.setenv("USAGE_PRUNE_MAX_BATCHES", "3")
    await insert_usage(admin, 30, timedelta(days=31))
    await insert_usage(admin, 5, timedelta(days=29))

    first = await jobs.prune_usage()
    assert first == {"deleted": 21, "batches": 3}  # never more than a batch per statement
    second = await jobs.prune_usage()
    assert second == {"deleted": 9, "batches": 2}
    assert await admin.fetchval("select count(*) from usage_logs") == 5
    assert (
        await admin.fetchval("select count(*) from usage_logs where created_at < now() - interval '30 days'")
        == 0
    )


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("USAGE_RETENTION_DAYS", "0"),  # would delete the signup rows the hourly limit counts
        ("USAGE_RETENTION_DAYS", "thirty"),
        ("USAGE_PRUNE_BATCH_SIZE", "0"),
        ("USAGE_PRUNE_MAX_BATCHES", "-1"),
    ],
)
async def test_prune_refuses_a_setting_out_of_range_and_deletes_nothing(
    admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    await insert_usage(admin, 3, timedelta(minutes=10))
    await insert_usage(admin, 2, timedelta(days=31))

    with pytest.raises(ConfigurationError, match=name):
        await jobs.prune_usage()
    assert await admin.fetchval("select count(*) from usage_logs") == 5


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("GENERATION_PENDING_CUTOFF_MINUTES", "0"),
        ("GENERATION_REAP_BATCH_SIZE", "0"),
        ("GENERATION_REAP_MAX_BATCHES", "many"),
    ],
)
async def test_the_reaper_refuses_a_setting_out_of_range(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigurationError, match=name):
        await jobs.reap_generations()


async def test_reap_job_returns_and_expires_generations(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_reap_job")
    await admin.execute(
        """
        insert into generations (user_id, prompt, quality, cost, status, attempt, lease_expires_at)
        values ($1, 'lapsed once', 'standard', 1, 'processing', 1, now() - interval '1 minute'),
               ($1, 'lapsed thrice', 'standard', 1, 'processing', 3, now() - interval '1 minute')
        """,
        user_id,
    )
    # their spends, as create_generation would have written them
    await admin.execute(
        """
        with spent as (
            update user_tokens set balance = balance - 2, total_spent = total_spent + 2
             where user_id = $1 returning balance)
        insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)
        select $1, -1, spent.balance + 1, 'spend', 'generation:' || g.id
          from spent, generations g where g.prompt = 'lapsed once'
        union all
        select $1, -1, spent.balance, 'spend', 'generation:' || g.id
          from spent, generations g where g.prompt = 'lapsed thrice'
        """,
        user_id,
    )
    results = await asyncio.gather(jobs.reap_generations(), jobs.reap_generations())
    assert sorted(r["returned"] for r in results) == [0, 1]
    assert sorted(r["failed"] for r in results) == [0, 1]
    states = dict(await admin.fetch("select prompt, status from generations"))
    assert states == {"lapsed once": "pending", "lapsed thrice": "failed"}
    assert await db.balance(admin, user_id) == 9  # one refund, once
    assert await db.audit_problems(admin) == []


async def test_reap_job_drains_a_backlog_in_bounded_batches_across_runs(
    admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog larger than a run takes is refunded over the next runs, each
    run a bounded number of bounded statements, two runs at once included."""
    monkeypatch.setenv("GENERATION_REAP_BATCH_SIZE", "4")
    monkeypatch.setenv("GENERATION_REAP_MAX_BATCHES", "2")
    users = [await db.insert_user(admin, clerk_id=f"user_backlog_{n}") for n in range(3)]
    for user_id in users:
        await admin.execute(
            """
            with g as (
                insert into generations (user_id, prompt, quality, cost, created_at, updated_at)
                select $1, 'never taken', 'standard', 1, now() - interval '1 hour' + n * interval '1 second',
                       now() - interval '1 hour'
                  from generate_series(1, 5) n
             returning id, created_at),
            spent as (
                update user_tokens set balance = balance - 5, total_spent = total_spent + 5
                 where user_id = $1 returning balance)
            insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)
            select $1, -1, spent.balance + 5 - row_number() over (order by g.created_at),
                   'spend', 'generation:' || g.id
              from g, spent
            """,
            user_id,
        )
    assert await db.audit_problems(admin) == []

    first = await jobs.reap_generations()
    assert first == {"returned": 0, "failed": 8, "batches": 2}
    together = await asyncio.gather(jobs.reap_generations(), jobs.reap_generations())
    assert all(run["batches"] <= 2 for run in together)
    assert sum(run["failed"] for run in together) == 7
    assert await jobs.reap_generations() == {"returned": 0, "failed": 0, "batches": 1}

    assert await admin.fetchval("select count(*) from generations where status = 'failed'") == 15
    assert await admin.fetchval("select count(*) from token_transactions where type = 'refund'") == 15
    assert [await db.balance(admin, user_id) for user_id in users] == [10, 10, 10]
    assert await db.audit_problems(admin) == []


async def test_expire_job_ends_only_ended_periods(admin: asyncpg.Connection) -> None:
    ended = await db.insert_user(admin, clerk_id="user_ended")
    running = await db.insert_user(admin, clerk_id="user_running")
    await admin.execute(
        """
        insert into subscriptions (user_id, plan, status, current_period_start, current_period_end)
        values ($1, 'pro', 'active', now() - interval '31 days', now() - interval '1 day'),
               ($2, 'pro', 'active', now() - interval '1 day', now() + interval '29 days')
        """,
        ended,
        running,
    )
    assert await jobs.expire_subscriptions() == {"expired": 1}
    statuses = dict(await admin.fetch("select user_id, status from subscriptions"))
    assert statuses == {ended: "expired", running: "active"}


async def test_audit_job_is_clean_on_a_clean_ledger(admin: asyncpg.Connection) -> None:
    await db.insert_user(admin, device_id="device-audit-job")
    assert await jobs.audit_ledger() == {"violations": 0}


async def test_scheduled_handler_runs_on_its_own_process_loop(admin: asyncpg.Connection) -> None:
    """Lambda calls the handler synchronously; it keeps one loop (and one pool)
    across warm invocations, as Mangum does."""
    await insert_usage(admin, 3, timedelta(days=40))

    def invoke_twice() -> list[dict[str, int]]:
        try:
            first = jobs.prune_usage_handler({"source": "aws.events"}, None)
            second = jobs.prune_usage_handler({"source": "aws.events"}, None)
            return [first, second]
        finally:
            jobs.runtime.run(pool.close_pool())

    first, second = await asyncio.to_thread(invoke_twice)
    assert first["deleted"] == 3 and second["deleted"] == 0
    assert await admin.fetchval("select count(*) from usage_logs") == 0
