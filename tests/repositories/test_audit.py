"""repositories/audit.py and `dreamlens audit`: each invariant, broken by raw SQL."""

from __future__ import annotations

import asyncio
from uuid import UUID

import asyncpg
import pytest

from database import Transaction, pool, stats
from functions import cli
from repositories import audit, tokens, users
from tests import db


async def books(admin: asyncpg.Connection) -> tuple[UUID, UUID]:
    """Two users with some history. The account ends with 64 tokens (earned 64,
    spent 0); the device, linked into it, with 0 (earned 1, spent 1)."""
    account = await users.get_or_create_clerk_user("user_audit")
    await tokens.credit(account.id, 50, "purchase", "payment:p1")
    await tokens.spend(account.id, 3, "generation:g1")
    await tokens.credit(account.id, 3, "refund", "refund:g1")
    device = await users.get_or_create_device_user("device-audit-0001", None, 5)
    await tokens.spend(device.id, 1, "generation:g2")
    await users.link_device(account.id, "device-audit-0001")
    assert await db.audit_problems(admin) == []
    return account.id, device.id


def problems(violations: list[audit.Violation]) -> list[tuple[UUID, str]]:
    return [(v.user_id, v.problem) for v in violations]


async def test_clean_books_have_no_violations(admin: asyncpg.Connection) -> None:
    await books(admin)
    with stats.collect() as counted:
        assert await audit.find_violations() == []
    assert counted.statements == 2  # one batch: its users, then their books
    assert await audit.count_users() == 2


async def test_empty_database_is_clean() -> None:
    assert await audit.find_violations() == []
    assert await audit.count_users() == 0


async def test_missing_wallet(admin: asyncpg.Connection) -> None:
    account, _ = await books(admin)
    await admin.execute("delete from user_tokens where user_id = $1", account)
    found = await audit.find_violations()
    assert problems(found) == [(account, "missing_wallet")]
    assert found[0].detail == "no user_tokens row"


async def test_user_made_without_the_trigger_has_no_wallet(admin: asyncpg.Connection) -> None:
    await books(admin)
    async with admin.transaction():
        await admin.execute("alter table users disable trigger trigger_initialize_new_user")
        bare = await db.insert_user(admin, clerk_id="user_bare")
        found = await audit.find_violations(db=Transaction(admin))
        await admin.execute("alter table users enable trigger trigger_initialize_new_user")
    assert problems(found) == [(bare, "missing_wallet")]


async def test_balance_that_disagrees_with_the_ledger(admin: asyncpg.Connection) -> None:
    account, _ = await books(admin)
    # earned moves with it, so only the ledger sum is wrong
    await admin.execute(
        "update user_tokens set balance = balance + 7, total_earned = total_earned + 7 where user_id = $1",
        account,
    )
    found = await audit.find_violations()
    assert problems(found) == [(account, "ledger_sum")]
    assert found[0].detail == "balance 71, ledger sum 64"


async def test_totals_that_disagree_with_the_balance(admin: asyncpg.Connection) -> None:
    _, device = await books(admin)
    await admin.execute("update user_tokens set total_spent = total_spent + 2 where user_id = $1", device)
    found = await audit.find_violations()
    assert problems(found) == [(device, "totals")]
    assert found[0].detail == "balance 0, total_earned 1 - total_spent 3 = -2"


async def test_balance_after_out_of_step_with_the_running_sum(admin: asyncpg.Connection) -> None:
    account, _ = await books(admin)
    ledger = await db.ledger(admin, account)
    second = ledger[1]["id"]
    await admin.execute("update token_transactions set balance_after = 59 where id = $1", second)
    found = await audit.find_violations()
    assert problems(found) == [(account, "balance_after")]
    assert (
        found[0].detail
        == f"1 ledger rows out of step; first: id {second} has balance_after 59, running sum 60"
    )


async def test_ledger_row_inserted_behind_the_wallets_back(admin: asyncpg.Connection) -> None:
    account, _ = await books(admin)
    await admin.execute(
        "insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)"
        " values ($1, 5, 0, 'adjustment', 'sneaky')",
        account,
    )
    assert problems(await audit.find_violations()) == [(account, "balance_after"), (account, "ledger_sum")]


async def test_negative_balance_and_negative_history(admin: asyncpg.Connection) -> None:
    """The CHECKs forbid both; the audit still looks, for data from before them
    or from a restore. The constraints are dropped inside a transaction that is
    rolled back, so the schema is untouched afterwards."""
    account, device = await books(admin)
    rolled_back = admin.transaction()
    await rolled_back.start()
    try:
        await admin.execute("alter table user_tokens drop constraint user_tokens_balance_check")
        await admin.execute(
            "alter table token_transactions drop constraint token_transactions_balance_after_check"
        )
        # the account overdraws by 100 and stays consistent otherwise
        await admin.execute(
            "update user_tokens set balance = balance - 164, total_spent = total_spent + 164"
            " where user_id = $1",
            account,
        )
        await admin.execute(
            "insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)"
            " values ($1, -164, -100, 'spend', 'overdraw')",
            account,
        )
        # the device's history dips below zero and comes back
        await admin.execute(
            "insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)"
            " values ($1, -4, -4, 'adjustment', 'dip'), ($1, 4, 0, 'adjustment', 'back')",
            device,
        )
        found = await audit.find_violations(db=Transaction(admin))
    finally:
        await rolled_back.rollback()
    assert problems(found) == sorted([(account, "negative_balance"), (device, "negative_balance")])
    details = {v.user_id: v.detail for v in found}
    assert details[account] == "balance -100, lowest running balance -100"
    assert details[device] == "balance 0, lowest running balance -4"
    assert (
        await admin.fetchval("select count(*) from pg_constraint where conname = 'user_tokens_balance_check'")
        == 1
    )


async def test_violations_of_many_users_are_each_reported(admin: asyncpg.Connection) -> None:
    account, device = await books(admin)
    await admin.execute("update user_tokens set total_earned = total_earned + 1")
    found = await audit.find_violations()
    assert problems(found) == sorted([(account, "totals"), (device, "totals")])


async def test_the_audit_goes_through_the_users_in_batches(admin: asyncpg.Connection) -> None:
    """Batches of 3 over 10 users find what one batch of all finds, users in
    every batch, the last one short; each batch is two statements."""
    ids = [await db.insert_user(admin, clerk_id=f"user_batch_{n:02}") for n in range(10)]
    broken = sorted(ids)[1::3]  # one user in each batch, the short last one included
    for user_id in broken:
        await admin.execute("update user_tokens set balance = balance + 1 where user_id = $1", user_id)

    with stats.collect() as counted:
        in_batches = await audit.find_violations(batch_users=3)
    at_once = await audit.find_violations()

    assert in_batches == at_once
    assert sorted({v.user_id for v in in_batches}) == broken
    assert {v.problem for v in in_batches} == {"ledger_sum", "totals"}
    assert counted.statements == 2 * 4  # 3 + 3 + 3 + 1 users


async def test_a_batch_that_ends_exactly_on_the_last_user_stops_at_an_empty_one(
    admin: asyncpg.Connection,
) -> None:
    for n in range(4):
        await db.insert_user(admin, clerk_id=f"user_even_{n}")
    with stats.collect() as counted:
        assert await audit.find_violations(batch_users=2) == []
    assert counted.statements == 2 + 2 + 1


# ------------------------------------------------------------ dreamlens audit


async def test_run_audit_reports_clean_books(
    admin: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    await books(admin)
    assert await cli.run_audit() == 0
    assert capsys.readouterr().out == "audit clean: 2 users checked\n"


async def test_run_audit_prints_each_violation_and_fails(
    admin: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    account, device = await books(admin)
    await admin.execute("update user_tokens set total_earned = total_earned + 1")
    assert await cli.run_audit() == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert sorted(lines[:2]) == sorted(
        [
            f"{account}  totals: balance 64, total_earned 65 - total_spent 0 = 65",
            f"{device}  totals: balance 0, total_earned 2 - total_spent 1 = 1",
        ]
    )
    assert lines[2] == "audit failed: 2 violations; 2 users checked"


async def test_dreamlens_audit_command_exit_codes(
    admin: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console script: main() runs its own event loop, so it runs in a thread;
    this loop's pool is closed first, and main() closes the one it makes."""
    account, _ = await books(admin)
    await pool.close_pool()
    assert await asyncio.to_thread(cli.main, ["audit"]) == 0
    assert capsys.readouterr().out.splitlines() == ["audit clean: 2 users checked"]

    await admin.execute("delete from user_tokens where user_id = $1", account)
    assert await asyncio.to_thread(cli.main, ["audit"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{account}  missing_wallet: no user_tokens row",
        "audit failed: 1 violations; 2 users checked",
    ]
    # this loop's database access works again afterwards
    assert await audit.count_users() == 2
