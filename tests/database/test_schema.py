"""schema.sql: the welcome-bonus trigger, constraints, and idempotent re-runs."""

from __future__ import annotations

import asyncpg
import pytest

from database import Conflict, InvalidRequest, sql
from database.migrations import schema_path
from tests import db

SCHEMA_FINGERPRINT = """
select md5(string_agg(item, '|' order by item)) from (
    select 'col:' || table_name || '.' || column_name || ':' || data_type || ':'
           || coalesce(column_default, '') as item
      from information_schema.columns where table_schema = 'public'
    union all
    select 'idx:' || indexname || ':' || indexdef from pg_indexes where schemaname = 'public'
    union all
    select 'con:' || conname || ':' || pg_get_constraintdef(oid) from pg_constraint
     where connamespace = 'public'::regnamespace
    union all
    select 'trg:' || tgname from pg_trigger where not tgisinternal
    union all
    select 'fn:' || proname || ':' || md5(prosrc) from pg_proc
     where pronamespace = 'public'::regnamespace
    union all
    select 'plan:' || p::text from plans p
    union all
    select 'price:' || g::text from generation_prices g
    union all
    select 'pkg:' || k::text from token_packages k
) s
"""


async def test_clerk_user_gets_ten_tokens_with_one_bonus_row(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_2abc")
    assert await db.balance(admin, user_id) == 10
    ledger = await db.ledger(admin, user_id)
    assert [(r["amount"], r["balance_after"], r["type"]) for r in ledger] == [(10, 10, "bonus")]
    assert await db.audit_problems(admin) == []


async def test_device_user_gets_five_tokens(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, device_id="device-12345")
    assert await db.balance(admin, user_id) == 5
    ledger = await db.ledger(admin, user_id)
    assert [(r["amount"], r["balance_after"], r["type"]) for r in ledger] == [(5, 5, "bonus")]


async def test_same_clerk_id_twice_is_a_conflict_and_grants_nothing_twice(
    admin: asyncpg.Connection,
) -> None:
    insert = "insert into users (clerk_id) values ($1) returning id"
    first = await sql.fetchval(insert, "user_twice")
    with pytest.raises(Conflict) as raised:
        await sql.fetchval(insert, "user_twice")
    assert raised.value.constraint == "users_clerk_id_key"
    assert await admin.fetchval("select count(*) from users") == 1
    assert await admin.fetchval("select count(*) from token_transactions") == 1
    assert await db.balance(admin, first) == 10


@pytest.mark.parametrize(
    "statement",
    [
        "update user_tokens set balance = -1",
        "insert into users (clerk_id, device_id) values ('both', 'device-both-1')",
        "insert into users (device_id) values ('bad id!')",
        "insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)"
        " select user_id, 1, 1, 'Bonus', 'k' from user_tokens",
    ],
)
async def test_constraints_refuse_bad_rows(admin: asyncpg.Connection, statement: str) -> None:
    await db.insert_user(admin, clerk_id="user_constraints")
    before = await admin.fetchval("select count(*) from token_transactions")
    with pytest.raises(InvalidRequest):
        await sql.execute(statement)
    assert await admin.fetchval("select count(*) from token_transactions") == before
    assert await db.balance(admin, await admin.fetchval("select id from users")) == 10


async def test_rerunning_schema_changes_nothing(admin: asyncpg.Connection) -> None:
    await admin.execute("update generation_prices set cost = 3 where quality = 'hd'")
    await db.insert_user(admin, clerk_id="user_rerun")
    before = await admin.fetchval(SCHEMA_FINGERPRINT)
    await admin.execute(schema_path().read_text())
    await admin.execute(schema_path().read_text())
    assert await admin.fetchval(SCHEMA_FINGERPRINT) == before
    # a price changed in production survives a re-run; no bonus granted again
    assert await admin.fetchval("select cost from generation_prices where quality = 'hd'") == 3
    assert await admin.fetchval("select count(*) from token_transactions") == 1


async def test_every_foreign_key_is_indexed(admin: asyncpg.Connection) -> None:
    unindexed = await admin.fetch(
        """
        select c.conrelid::regclass::text as tbl, a.attname as col
          from pg_constraint c
          join pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]
         where c.contype = 'f' and c.connamespace = 'public'::regnamespace
           and not exists (
               select 1 from pg_index i
                where i.indrelid = c.conrelid and i.indkey[0] = c.conkey[1])
        """
    )
    assert [dict(r) for r in unindexed] == []
