"""repositories/usage.py: logging actions, counting them for limits, pruning."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import pytest

from database import InvalidRequest
from repositories import usage
from tests import db


async def db_now(admin: asyncpg.Connection) -> datetime:
    now: datetime = await admin.fetchval("select now()")
    return now


async def test_a_keyed_action_is_logged_once_per_user_action_and_key(admin: asyncpg.Connection) -> None:
    """What sql() does after a commit it did not hear of: the same statement
    with the same key again. It must not add a row."""
    user_id = await db.insert_user(admin, clerk_id="user_usage_keyed")
    other = await db.insert_user(admin, clerk_id="user_usage_keyed_other")
    for _ in range(3):
        await usage.log_usage(user_id, "download", "203.0.113.7", reference="g1", key="k1")
    await usage.log_usage(user_id, "download", "203.0.113.7", reference="g1", key="k2")
    await usage.log_usage(user_id, "download", "203.0.113.7", reference="g2", key="k1")
    await usage.log_usage(user_id, "download", "203.0.113.7", reference="g2", key="k1")
    await usage.log_usage(user_id, "generation", "203.0.113.7", reference="g1", key="k1")
    await usage.log_usage(other, "download", "203.0.113.7", reference="g1", key="k1")
    await usage.log_usage(user_id, "download", "203.0.113.7", reference="g1")
    rows = await admin.fetch(
        "select user_id, action, idempotency_key from usage_logs order by user_id, action, idempotency_key"
    )
    assert sorted((row["user_id"], row["action"], row["idempotency_key"] or "") for row in rows) == sorted(
        [
            (user_id, "download", "k1"),
            (user_id, "download", "k1"),
            (user_id, "download", "k2"),
            (user_id, "download", ""),
            (user_id, "generation", "k1"),
            (other, "download", "k1"),
        ]
    )


async def test_counts_by_user_action_and_window(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_usage")
    other = await db.insert_user(admin, clerk_id="user_usage_other")
    for _ in range(3):
        await usage.log_usage(user_id, "download", "203.0.113.7", reference="g1")
    await usage.log_usage(user_id, "generation", "203.0.113.7")
    await usage.log_usage(other, "download", "198.51.100.1")
    await admin.execute(
        "insert into usage_logs (user_id, action, created_at)"
        " values ($1, 'download', now() - interval '2 hours')",
        user_id,
    )
    hour_ago = await db_now(admin) - timedelta(hours=1)

    assert await usage.count_usage("download", hour_ago, user_id=user_id) == 3
    assert await usage.count_usage("download", hour_ago - timedelta(hours=2), user_id=user_id) == 4
    assert await usage.count_usage("generation", hour_ago, user_id=user_id) == 1
    assert await usage.count_usage("download", hour_ago, user_id=user_id, source_ip="198.51.100.1") == 0
    assert await usage.count_usage("download", hour_ago, source_ip="203.0.113.7") == 3
    assert await usage.count_usage("download", hour_ago) == 4


async def test_anonymous_signups_are_counted_per_source_address(admin: asyncpg.Connection) -> None:
    for n in range(3):
        user_id = await db.insert_user(admin, device_id=f"device-signup-{n}")
        await usage.log_usage(user_id, "signup", "203.0.113.9")
    await usage.log_usage(None, "signup", "2001:db8::1")
    hour_ago = await db_now(admin) - timedelta(hours=1)

    assert await usage.count_usage("signup", hour_ago, source_ip="203.0.113.9") == 3
    # API Gateway's sample events carry a /32 host suffix: the same address
    assert await usage.count_usage("signup", hour_ago, source_ip="203.0.113.9/32") == 3
    assert await usage.count_usage("signup", hour_ago, source_ip="2001:db8::1") == 1
    assert await usage.count_usage("signup", hour_ago, source_ip="198.51.100.1") == 0


async def test_bad_actions_and_addresses_are_invalid(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_bad_usage")
    with pytest.raises(InvalidRequest):
        await usage.log_usage(user_id, "upload", None)
    with pytest.raises(InvalidRequest):
        await usage.log_usage(user_id, "download", "not an address")
    with pytest.raises(InvalidRequest):
        await usage.count_usage("upload", await db_now(admin))
    assert await admin.fetchval("select count(*) from usage_logs") == 0


async def plan_of(admin: asyncpg.Connection, query: str, *args: object) -> str:
    return "\n".join(row[0] for row in await admin.fetch("explain " + query, *args))


async def test_counts_are_served_by_the_usage_indexes(admin: asyncpg.Connection) -> None:
    """On a table big enough for the planner to care, each count reads its index."""
    users = [await db.insert_user(admin, clerk_id=f"user_bulk_{n}") for n in range(50)]
    await admin.execute(
        """
        insert into usage_logs (user_id, action, source_ip, created_at)
        select u, (array['generation', 'download', 'signup'])[1 + n % 3],
               ('10.0.' || (n % 250) || '.' || (n % 199))::inet,
               now() - (n % 1000) * interval '1 minute'
          from unnest($1::uuid[]) u, generate_series(1, 400) n
        """,
        users,
    )
    await admin.execute("analyze usage_logs")
    since = await db_now(admin) - timedelta(hours=1)

    by_user = await plan_of(admin, usage.COUNT_USAGE_BY_USER, users[0], "download", since, None)
    assert "usage_logs_user_action_created_idx" in by_user
    by_ip = await plan_of(admin, usage.COUNT_SIGNUPS_BY_IP, "10.0.3.3", since)
    assert "usage_logs_signup_ip_created_idx" in by_ip


async def test_prune_deletes_only_old_rows_one_bounded_batch_at_a_time(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_prune")
    await admin.execute(
        "insert into usage_logs (user_id, action, created_at)"
        " select $1, 'download', now() - interval '40 days' - n * interval '1 minute'"
        "   from generate_series(1, 12) n",
        user_id,
    )
    for _ in range(5):
        await usage.log_usage(user_id, "download", None)
    cutoff = await db_now(admin) - timedelta(days=30)

    deleted = [await usage.prune_usage(cutoff, batch_size=5) for _ in range(4)]

    assert deleted == [5, 5, 2, 0]
    assert await admin.fetchval("select count(*) from usage_logs") == 5
    assert await admin.fetchval("select min(created_at) from usage_logs") >= cutoff


async def test_prune_takes_the_oldest_rows_first(admin: asyncpg.Connection) -> None:
    await admin.execute(
        "insert into usage_logs (action, created_at)"
        " select 'signup', timestamptz '2020-01-01' + n * interval '1 day' from generate_series(1, 6) n"
    )
    assert await usage.prune_usage(datetime.fromisoformat("2021-01-01T00:00:00+00:00"), batch_size=2) == 2
    oldest = await admin.fetchval("select min(created_at) from usage_logs")
    assert oldest == datetime.fromisoformat("2020-01-04T00:00:00+00:00")


async def test_prune_refuses_a_non_positive_batch(admin: asyncpg.Connection) -> None:
    with pytest.raises(InvalidRequest):
        await usage.prune_usage(await db_now(admin), batch_size=0)
