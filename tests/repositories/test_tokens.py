"""repositories/tokens.py: the wallet, the ledger, credits and spends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from database import InsufficientTokens, InvalidRequest, NotFound, cache, pool, stats, transaction
from repositories import tokens
from tests import db
from tests.repositories import until_waiting_on_a_lock, wide_pool


@pytest.fixture
async def many_connections() -> AsyncIterator[None]:
    async with wide_pool(30):
        yield


async def wallet(admin: asyncpg.Connection, user_id: UUID) -> dict[str, Any]:
    row = await admin.fetchrow(
        "select balance, total_earned, total_spent, updated_at from user_tokens where user_id = $1", user_id
    )
    assert row is not None
    return dict(row)


async def clerk_user(admin: asyncpg.Connection, clerk_id: str = "user_tokens_1") -> UUID:
    """A Clerk user: 10 tokens from the welcome bonus."""
    return await db.insert_user(admin, clerk_id=clerk_id)


# ------------------------------------------------------------------ balance


async def test_get_balance_reads_the_wallet(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    balance = await tokens.get_balance(user_id)
    assert (balance.balance, balance.total_earned, balance.total_spent) == (10, 10, 0)


async def test_get_balance_of_unknown_user_is_not_found() -> None:
    with pytest.raises(NotFound):
        await tokens.get_balance(uuid.uuid4())


async def test_cached_balance_costs_no_round_trip_once_read(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    with stats.collect() as first:
        assert (await tokens.get_cached_balance(user_id)).balance == 10
    with stats.collect() as second:
        assert (await tokens.get_cached_balance(user_id)).balance == 10
    assert first.round_trips == db.trips(1)
    assert second.round_trips == 0


async def test_cached_balance_is_stale_only_for_writes_outside_this_process(
    admin: asyncpg.Connection,
) -> None:
    user_id = await clerk_user(admin)
    await tokens.get_cached_balance(user_id)
    await admin.execute(
        "update user_tokens set balance = 99, total_earned = 99 where user_id = $1", user_id
    )  # another process: not seen until the entry expires
    assert (await tokens.get_cached_balance(user_id)).balance == 10
    assert (await tokens.get_balance(user_id)).balance == 99


@pytest.mark.parametrize("write", ["credit", "spend", "duplicate", "refused"])
async def test_every_wallet_write_invalidates_the_cached_balance(
    admin: asyncpg.Connection, write: str
) -> None:
    user_id = await clerk_user(admin)
    await tokens.credit(user_id, 5, "purchase", "first")
    await tokens.get_cached_balance(user_id)
    # the same change made behind the cache's back, so only invalidation can reveal it
    await admin.execute("update user_tokens set balance = 14, total_earned = 14 where user_id = $1", user_id)
    if write == "credit":
        await tokens.credit(user_id, 1, "adjustment", "another")
    elif write == "spend":
        await tokens.spend(user_id, 1, "another")
    elif write == "duplicate":
        await tokens.credit(user_id, 5, "purchase", "first")
    else:
        with pytest.raises(InsufficientTokens):
            await tokens.spend(user_id, 1000, "too-much")
    fresh = await tokens.get_balance(user_id)
    assert await tokens.get_cached_balance(user_id) == fresh


async def test_a_write_during_the_cached_read_is_not_hidden_by_it(
    admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that started before a spend must not put its older balance in the
    cache after the spend invalidated it."""
    user_id = await clerk_user(admin)
    real_get_balance = tokens.get_balance

    async def read_then_spend(user: UUID, db_: Any = None) -> tokens.Balance:
        balance = await real_get_balance(user)
        await tokens.spend(user, 4, "during-read")  # lands after our read, before we cache
        return balance

    monkeypatch.setattr(tokens, "get_balance", read_then_spend)
    assert (await tokens.get_cached_balance(user_id)).balance == 10
    monkeypatch.setattr(tokens, "get_balance", real_get_balance)
    assert cache.cached_balance(user_id) is None
    assert (await tokens.get_cached_balance(user_id)).balance == 6


# ------------------------------------------------------------------- credit


async def test_credit_adds_tokens_with_one_ledger_row(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    result = await tokens.credit(user_id, 50, "purchase", "payment:p1", "50 tokens", "p1")
    assert not result.duplicate
    assert (result.entry.amount, result.entry.balance_after, result.entry.type) == (50, 60, "purchase")
    assert (result.entry.description, result.entry.reference) == ("50 tokens", "p1")
    assert await wallet(admin, user_id) | {"updated_at": None} == {
        "balance": 60,
        "total_earned": 60,
        "total_spent": 0,
        "updated_at": None,
    }
    rows = await db.ledger(admin, user_id)
    assert [(r["id"], r["amount"], r["balance_after"], r["idempotency_key"]) for r in rows[1:]] == [
        (result.entry.id, 50, 60, "payment:p1")
    ]
    assert await db.audit_problems(admin) == []


async def test_credit_with_a_seen_key_applies_nothing_and_returns_the_first_entry(
    admin: asyncpg.Connection,
) -> None:
    user_id = await clerk_user(admin)
    first = await tokens.credit(user_id, 50, "purchase", "payment:p1")
    again = await tokens.credit(user_id, 50, "purchase", "payment:p1")
    assert again.duplicate
    assert again.entry == first.entry
    assert await db.balance(admin, user_id) == 60
    assert len(await db.ledger(admin, user_id)) == 2
    assert await db.audit_problems(admin) == []


async def test_same_key_on_another_user_is_another_credit(admin: asyncpg.Connection) -> None:
    first, second = await clerk_user(admin, "user_a1"), await clerk_user(admin, "user_a2")
    await tokens.credit(first, 5, "adjustment", "same-key")
    result = await tokens.credit(second, 5, "adjustment", "same-key")
    assert not result.duplicate
    assert await db.balance(admin, second) == 15


async def test_refund_credit_gives_back_spent_tokens(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    await tokens.spend(user_id, 2, "generation:g1")
    await tokens.credit(user_id, 2, "refund", "refund:g1")
    assert await wallet(admin, user_id) | {"updated_at": None} == {
        "balance": 10,
        "total_earned": 10,
        "total_spent": 0,
        "updated_at": None,
    }
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize(
    ("amount", "type_", "key"),
    [(0, "purchase", "k"), (-5, "purchase", "k"), (True, "purchase", "k"), (5, "spend", "k"),
     (5, "transfer_out", "k"), (5, "gift", "k"), (5, "purchase", ""), (5, "purchase", "k" * 201)],
)  # fmt: skip
async def test_credit_refuses_bad_input_and_writes_nothing(
    admin: asyncpg.Connection, amount: int, type_: str, key: str
) -> None:
    user_id = await clerk_user(admin)
    with pytest.raises(InvalidRequest):
        await tokens.credit(user_id, amount, type_, key)
    assert await db.balance(admin, user_id) == 10
    assert len(await db.ledger(admin, user_id)) == 1


async def test_credit_to_unknown_user_is_not_found(admin: asyncpg.Connection) -> None:
    with pytest.raises(NotFound):
        await tokens.credit(uuid.uuid4(), 5, "purchase", "k")
    assert await admin.fetchval("select count(*) from token_transactions") == 0


async def test_credit_is_one_round_trip(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    await tokens.get_balance(user_id)  # the pool is up
    with stats.collect() as counted:
        await tokens.credit(user_id, 5, "purchase", "k")
    assert (counted.statements, counted.round_trips) == (1, db.trips(1))


# -------------------------------------------------------------------- spend


async def test_spend_takes_tokens_with_one_ledger_row(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    result = await tokens.spend(user_id, 3, "generation:g1", "A cat", "g1")
    assert not result.duplicate
    assert (result.entry.amount, result.entry.balance_after, result.entry.type) == (-3, 7, "spend")
    assert await wallet(admin, user_id) | {"updated_at": None} == {
        "balance": 7,
        "total_earned": 10,
        "total_spent": 3,
        "updated_at": None,
    }
    assert [(r["amount"], r["balance_after"]) for r in await db.ledger(admin, user_id)] == [(10, 10), (-3, 7)]
    assert await db.audit_problems(admin) == []


async def test_spend_of_the_whole_balance_leaves_zero(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    result = await tokens.spend(user_id, 10, "all")
    assert result.entry.balance_after == 0
    assert await db.balance(admin, user_id) == 0


async def test_spend_that_would_overdraw_changes_nothing(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    before = await wallet(admin, user_id)
    ledger_before = await db.ledger(admin, user_id)
    with pytest.raises(InsufficientTokens) as raised:
        await tokens.spend(user_id, 11, "generation:g1")
    assert (raised.value.balance, raised.value.cost) == (10, 11)
    assert await wallet(admin, user_id) == before
    assert await db.ledger(admin, user_id) == ledger_before
    assert await db.audit_problems(admin) == []


async def test_refused_spend_can_be_retried_with_its_key_once_tokens_arrive(
    admin: asyncpg.Connection,
) -> None:
    user_id = await clerk_user(admin)
    with pytest.raises(InsufficientTokens):
        await tokens.spend(user_id, 12, "generation:g1")
    await tokens.credit(user_id, 5, "purchase", "payment:p1")
    result = await tokens.spend(user_id, 12, "generation:g1")
    assert not result.duplicate
    assert result.entry.balance_after == 3


async def test_spend_with_a_seen_key_returns_the_first_result_even_when_the_balance_is_lower(
    admin: asyncpg.Connection,
) -> None:
    user_id = await clerk_user(admin)
    first = await tokens.spend(user_id, 8, "generation:g1")
    await tokens.spend(user_id, 2, "generation:g2")
    again = await tokens.spend(user_id, 8, "generation:g1")
    assert again.duplicate
    assert again.entry == first.entry
    assert await db.balance(admin, user_id) == 0
    assert len(await db.ledger(admin, user_id)) == 3
    assert await db.audit_problems(admin) == []


async def test_reversal_takes_back_earned_tokens(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    await tokens.credit(user_id, 50, "purchase", "payment:p1")
    result = await tokens.spend(user_id, 50, "reversal:p1:r1", type="reversal")
    assert (result.entry.amount, result.entry.type) == (-50, "reversal")
    assert await wallet(admin, user_id) | {"updated_at": None} == {
        "balance": 10,
        "total_earned": 10,
        "total_spent": 0,
        "updated_at": None,
    }
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize(("amount", "type_"), [(0, "spend"), (-1, "spend"), (1, "purchase"), (1, "bonus")])
async def test_spend_refuses_bad_input_and_writes_nothing(
    admin: asyncpg.Connection, amount: int, type_: str
) -> None:
    user_id = await clerk_user(admin)
    with pytest.raises(InvalidRequest):
        await tokens.spend(user_id, amount, "k", type=type_)
    assert len(await db.ledger(admin, user_id)) == 1


async def test_spend_from_unknown_user_is_not_found() -> None:
    with pytest.raises(NotFound):
        await tokens.spend(uuid.uuid4(), 1, "k")


async def test_spend_is_one_round_trip(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    await tokens.get_balance(user_id)
    with stats.collect() as counted:
        await tokens.spend(user_id, 1, "k")
    assert (counted.statements, counted.round_trips) == (1, db.trips(1))


async def test_spend_joins_the_callers_transaction(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)

    class Abandon(Exception):
        pass

    with pytest.raises(Abandon):
        async with transaction() as tx:
            result = await tokens.spend(user_id, 4, "in-unit", db=tx)
            assert result.entry.balance_after == 6
            raise Abandon
    assert await db.balance(admin, user_id) == 10
    assert len(await db.ledger(admin, user_id)) == 1


# -------------------------------------------------------------- concurrency


async def test_hundred_concurrent_spends_never_overdraw(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    user_id = await clerk_user(admin)
    opened = pool.connections_opened
    results = await asyncio.gather(
        *(tokens.spend(user_id, 1, f"generation:{n}") for n in range(100)), return_exceptions=True
    )
    assert pool.connections_opened - opened > 1  # they did run side by side
    succeeded = [r for r in results if isinstance(r, tokens.LedgerResult)]
    refused = [r for r in results if isinstance(r, InsufficientTokens)]
    assert len(succeeded) == 10
    assert len(refused) == 90
    # each refusal was decided on the locked, latest balance, not a stale snapshot
    assert {(e.balance, e.cost) for e in refused} == {(0, 1)}
    assert sorted(r.entry.balance_after for r in succeeded) == list(range(10))
    assert await wallet(admin, user_id) | {"updated_at": None} == {
        "balance": 0,
        "total_earned": 10,
        "total_spent": 10,
        "updated_at": None,
    }
    spends = [r for r in await db.ledger(admin, user_id) if r["type"] == "spend"]
    assert len(spends) == 10
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("move", ["spend", "credit"])
async def test_twenty_concurrent_repeats_of_one_key_apply_once(
    admin: asyncpg.Connection, many_connections: None, move: str
) -> None:
    user_id = await clerk_user(admin)

    def once() -> Any:
        if move == "spend":
            return tokens.spend(user_id, 3, "generation:g1")
        return tokens.credit(user_id, 3, "purchase", "payment:p1")

    results = await asyncio.gather(*(once() for _ in range(20)))
    assert len({r.entry.id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert await db.balance(admin, user_id) == (7 if move == "spend" else 13)
    assert len(await db.ledger(admin, user_id)) == 2
    assert await db.audit_problems(admin) == []


async def test_concurrent_credits_and_spends_keep_the_running_sum(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    user_id = await clerk_user(admin)
    moves = [tokens.credit(user_id, 2, "adjustment", f"c{n}") for n in range(30)]
    moves += [tokens.spend(user_id, 1, f"s{n}") for n in range(30)]
    await asyncio.gather(*moves)
    assert await db.balance(admin, user_id) == 10 + 60 - 30
    assert await db.audit_problems(admin) == []


# ------------------------------------------------------------------- ledger


async def test_ledger_pages_newest_first_and_join_up_exactly(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    for n in range(11):
        await tokens.credit(user_id, 1, "adjustment", f"k{n}")
    other = await clerk_user(admin, "user_other")
    await tokens.credit(other, 1, "adjustment", "theirs")
    every_id = [r["id"] for r in await db.ledger(admin, user_id)][::-1]
    assert len(every_id) == 12

    seen: list[int] = []
    before = None
    pages = 0
    while True:
        page = await tokens.list_transactions(user_id, limit=5, before=before)
        seen += [entry.id for entry in page.items]
        pages += 1
        if page.next_before is None:
            break
        assert page.next_before == page.items[-1].id
        before = page.next_before
    assert seen == every_id
    assert pages == 3
    first = await tokens.list_transactions(user_id, limit=5)
    assert first.items[0].balance_after == 21
    assert first.items[-1].id == every_id[4]


async def test_ledger_page_that_exactly_ends_the_ledger_has_no_next(admin: asyncpg.Connection) -> None:
    user_id = await clerk_user(admin)
    await tokens.credit(user_id, 1, "adjustment", "k")
    page = await tokens.list_transactions(user_id, limit=2)
    assert len(page.items) == 2
    assert page.next_before is None
    first = await tokens.list_transactions(user_id, limit=1)
    last = await tokens.list_transactions(user_id, limit=1, before=first.next_before)
    assert last.next_before is None
    assert [e.type for e in last.items] == ["bonus"]
    assert (await tokens.list_transactions(user_id, before=last.items[0].id)).items == []


@pytest.mark.parametrize("limit", [0, -1, 101])
async def test_ledger_page_size_is_bounded(admin: asyncpg.Connection, limit: int) -> None:
    user_id = await clerk_user(admin)
    with pytest.raises(InvalidRequest):
        await tokens.list_transactions(user_id, limit=limit)


async def test_unknown_user_has_an_empty_ledger() -> None:
    page = await tokens.list_transactions(uuid.uuid4())
    assert page.items == []
    assert page.next_before is None


async def test_a_spend_waiting_on_a_credit_spends_from_the_credited_balance(
    admin: asyncpg.Connection,
) -> None:
    """The wallet holds 1 token, and a credit of 10 commits while a spend of
    2 waits for the wallet: 11 - 2 leaves 9. Computed from the balance its
    snapshot saw (1 - 2), it failed the balance check before PostgreSQL
    rechecked the newer row, and was refused."""
    user_id = await db.insert_user(admin, clerk_id="user_spend_behind_credit")
    await tokens.spend(user_id, 9, "spend-down")
    assert await db.balance(admin, user_id) == 1
    async with admin.transaction():
        await admin.execute(
            "update user_tokens set balance = balance + 10, total_earned = total_earned + 10"
            " where user_id = $1",
            user_id,
        )
        await admin.execute(
            "insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)"
            " values ($1, 10, 11, 'purchase', 'credit-while-waiting')",
            user_id,
        )
        spend = asyncio.ensure_future(tokens.spend(user_id, 2, "spend-behind-credit"))
        await until_waiting_on_a_lock(admin)
    result = await spend
    assert result.entry.balance_after == 9
    assert await db.balance(admin, user_id) == 9
    assert await db.audit_problems(admin) == []
