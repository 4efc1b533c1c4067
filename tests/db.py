"""Tiny raw-SQL helpers for tests: put data in, read the database back."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from database.migrations import schema_path

DATA_TABLES = (
    "token_transactions",
    "user_tokens",
    "usage_logs",
    "generations",
    "payments",
    "subscriptions",
    "users",
    "generation_prices",
    "token_packages",
    "plans",
)


async def reset(connection: asyncpg.Connection) -> None:
    """Empty every table and put the seeded catalogue back."""
    await connection.execute(f"truncate {', '.join(DATA_TABLES)} restart identity cascade")
    await connection.execute(schema_path().read_text())


async def insert_user(
    connection: asyncpg.Connection, *, clerk_id: str | None = None, device_id: str | None = None
) -> UUID:
    user_id: UUID = await connection.fetchval(
        "insert into users (clerk_id, device_id) values ($1, $2) returning id", clerk_id, device_id
    )
    return user_id


async def balance(connection: asyncpg.Connection, user_id: UUID) -> int:
    value: int = await connection.fetchval("select balance from user_tokens where user_id = $1", user_id)
    return value


async def ledger(connection: asyncpg.Connection, user_id: UUID) -> list[dict[str, Any]]:
    rows = await connection.fetch(
        "select id, amount, balance_after, type, reference, idempotency_key"
        "  from token_transactions where user_id = $1 order by id",
        user_id,
    )
    return [dict(row) for row in rows]


AUDIT = """
with running as (
    select user_id, id, amount, balance_after,
           sum(amount) over (partition by user_id order by id) as running_sum
      from token_transactions
)
select 'balance_after' as problem, user_id::text
  from running where balance_after <> running_sum
union all
select 'ledger_sum', t.user_id::text
  from user_tokens t
  left join (select user_id, sum(amount) as total from token_transactions group by user_id) l
    on l.user_id = t.user_id
 where t.balance <> coalesce(l.total, 0)
    or t.balance <> t.total_earned - t.total_spent
union all
select 'negative_balance', user_id::text from user_tokens where balance < 0
"""


async def audit_problems(connection: asyncpg.Connection) -> list[tuple[str, str]]:
    """The ledger invariants, checked independently of the app's own audit."""
    return [(row["problem"], row["user_id"]) for row in await connection.fetch(AUDIT)]


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def trips(statements: int) -> int:
    """Round trips on the wire for `statements` statements outside a
    transaction: one each with the statement cache on, two (prepare, then
    execute) with it off, as behind PgBouncer (DREAMLENS_TEST_PGBOUNCER=1)."""
    from database.executor import round_trips_per_statement

    return statements * round_trips_per_statement()
