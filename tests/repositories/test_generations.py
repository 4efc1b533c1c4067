"""repositories/generations.py: the spend that queues a generation, the
worker's queue (claims, leases, the reaper) and results with their refunds."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from database import (
    Conflict,
    DeviceLinked,
    InsufficientTokens,
    InvalidRequest,
    NotFound,
    RateLimited,
    cache,
    config,
    pool,
    stats,
)
from repositories import generations
from repositories.generations import CreatedGeneration
from tests import db
from tests.repositories import side_by_side, until_waiting_on_a_lock


@pytest.fixture
async def wide_pool() -> AsyncIterator[None]:
    """Concurrent calls on separate connections, opened beforehand so the
    calls overlap instead of queueing behind connection set-up."""
    await pool.close_pool()
    config.configure(pool_max_size=30)
    connections = await pool.get_pool()
    held = [await connections.acquire() for _ in range(30)]
    for connection in held:
        await connections.release(connection)
    yield
    await pool.close_pool()


async def table_counts(admin: asyncpg.Connection) -> dict[str, int]:
    counts = {}
    for table in ("generations", "token_transactions", "usage_logs"):
        counts[table] = await admin.fetchval(f"select count(*) from {table}")
    return counts


async def wallet(admin: asyncpg.Connection, user_id: UUID) -> dict[str, Any]:
    row = await admin.fetchrow("select * from user_tokens where user_id = $1", user_id)
    return dict(row)


async def set_free_limit(admin: asyncpg.Connection, limit: int) -> None:
    await admin.execute("update plans set daily_generation_limit = $1 where id = 'free'", limit)


async def create(user_id: UUID, key: str | None = None, quality: str = "standard") -> CreatedGeneration:
    return await generations.create_generation(
        user_id, "a lighthouse at dusk", quality, key or str(uuid.uuid4())
    )


async def outcomes(calls: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


# -------------------------------------------------------------------- create


async def test_create_spends_queues_and_logs_in_one_round_trip(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_create")
    with stats.collect() as counted:
        created = await generations.create_generation(user_id, "a red fox", "hd", "key-1")
    assert counted.round_trips == db.trips(1)

    generation = created.generation
    assert (created.balance, created.replayed) == (8, False)
    assert (generation.status, generation.cost, generation.quality, generation.attempt) == (
        "pending",
        2,
        "hd",
        0,
    )
    assert await db.balance(admin, user_id) == 8
    stored = await admin.fetchrow("select * from generations where id = $1", generation.id)
    assert (stored["user_id"], stored["prompt"], stored["idempotency_key"]) == (user_id, "a red fox", "key-1")
    assert [
        (r["amount"], r["balance_after"], r["type"], r["reference"], r["idempotency_key"])
        for r in await db.ledger(admin, user_id)
    ] == [
        (10, 10, "bonus", None, "welcome_bonus"),
        (-2, 8, "spend", str(generation.id), f"generation:{generation.id}"),
    ]
    usage = await admin.fetch("select user_id, action, reference from usage_logs")
    assert [tuple(r) for r in usage] == [(user_id, "generation", str(generation.id))]
    tokens = await wallet(admin, user_id)
    assert (tokens["total_spent"], tokens["generations_today"]) == (2, 1)
    assert await db.audit_problems(admin) == []


async def test_create_invalidates_the_cached_balance(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_cache")
    cache.remember_balance(user_id, 10)
    await create(user_id)
    assert cache.cached_balance(user_id) is None


async def test_insufficient_tokens_writes_nothing(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, device_id="device-poor-01")
    await admin.execute("update generation_prices set cost = 6 where quality = 'hd'")
    before_counts, before_wallet = await table_counts(admin), await wallet(admin, user_id)

    with pytest.raises(InsufficientTokens) as raised:
        await create(user_id, quality="hd")

    assert (raised.value.balance, raised.value.cost) == (5, 6)
    assert await table_counts(admin) == before_counts
    assert await wallet(admin, user_id) == before_wallet
    assert await db.audit_problems(admin) == []


async def test_daily_limit_writes_nothing_and_says_when_it_lifts(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_limit")
    await set_free_limit(admin, 1)
    await create(user_id)
    before_counts, before_wallet = await table_counts(admin), await wallet(admin, user_id)

    with pytest.raises(RateLimited) as raised:
        await create(user_id)

    seconds_to_midnight = await admin.fetchval(
        "select extract(epoch from date_trunc('day', now() at time zone 'utc') + interval '1 day'"
        " - (now() at time zone 'utc'))"
    )
    assert 1 <= raised.value.retry_after <= 86_400
    assert abs(raised.value.retry_after - float(seconds_to_midnight)) < 60
    assert await table_counts(admin) == before_counts
    assert await wallet(admin, user_id) == before_wallet
    assert await db.audit_problems(admin) == []


async def test_daily_count_starts_again_on_a_new_utc_day(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_new_day")
    await set_free_limit(admin, 2)
    await admin.execute(
        "update user_tokens set generations_today = 2,"
        " generations_day = (now() at time zone 'utc')::date - 1 where user_id = $1",
        user_id,
    )
    await create(user_id)
    tokens = await wallet(admin, user_id)
    today = await admin.fetchval("select (now() at time zone 'utc')::date")
    assert (tokens["generations_today"], tokens["generations_day"]) == (1, today)
    assert await db.audit_problems(admin) == []


async def test_a_spend_begun_before_midnight_counts_on_the_day_already_recorded(
    admin: asyncpg.Connection,
) -> None:
    """A spend whose transaction began just before UTC midnight and waited on
    the wallet while a spend made after midnight committed finds the row
    dated a day later than its own now(). It used to reset the new day's
    count to its own day, giving the user one more generation on the new day;
    it now counts on the later day. The row is set as the waiting spend finds
    it, since the clock cannot be moved across midnight here."""
    user_id = await db.insert_user(admin, clerk_id="user_midnight")
    await set_free_limit(admin, 2)
    await admin.execute(
        "update user_tokens set generations_today = 1,"
        " generations_day = (now() at time zone 'utc')::date + 1 where user_id = $1",
        user_id,
    )
    tomorrow = await admin.fetchval("select (now() at time zone 'utc')::date + 1")

    await create(user_id)
    tokens = await wallet(admin, user_id)
    assert (tokens["generations_today"], tokens["generations_day"]) == (2, tomorrow)

    before_counts, before_wallet = await table_counts(admin), await wallet(admin, user_id)
    with pytest.raises(RateLimited):
        await create(user_id)
    assert await table_counts(admin) == before_counts
    assert await wallet(admin, user_id) == before_wallet
    assert await db.audit_problems(admin) == []


async def test_unknown_quality_is_invalid_and_writes_nothing(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_quality")
    before_counts, before_wallet = await table_counts(admin), await wallet(admin, user_id)
    with pytest.raises(InvalidRequest):
        await create(user_id, quality="ultra")
    assert await table_counts(admin) == before_counts
    assert await wallet(admin, user_id) == before_wallet


async def test_empty_prompt_is_invalid_and_writes_nothing(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_prompt")
    before_counts, before_wallet = await table_counts(admin), await wallet(admin, user_id)
    with pytest.raises(InvalidRequest):
        await generations.create_generation(user_id, "", "standard", "key-empty")
    assert await table_counts(admin) == before_counts
    assert await wallet(admin, user_id) == before_wallet


async def test_unknown_user_is_not_found() -> None:
    with pytest.raises(NotFound):
        await create(uuid.uuid4())


async def test_linked_device_cannot_generate(admin: asyncpg.Connection) -> None:
    owner = await db.insert_user(admin, clerk_id="user_owner")
    device = await db.insert_user(admin, device_id="device-linked-1")
    await admin.execute(
        "update users set linked_to_user_id = $1, linked_at = now() where id = $2", owner, device
    )
    before_counts = await table_counts(admin)
    with pytest.raises(DeviceLinked):
        await create(device)
    assert await table_counts(admin) == before_counts
    assert await db.balance(admin, device) == 5


async def test_a_spend_waiting_on_a_link_of_its_device_is_refused(admin: asyncpg.Connection) -> None:
    """Bug: the spend read the device's user row without a lock, took its
    snapshot, then waited for the wallet the link held. Once the link
    committed it spent what the device keeps: a generation on a linked
    device, which neither the device (403) nor the account (404) can see.
    Here a transaction holds what link_device holds (the user row and its
    wallet, as LOCK_LINK_PARTIES takes them) and links while the spend waits."""
    owner = await db.insert_user(admin, clerk_id="user_link_owner")
    device = await db.insert_user(admin, device_id="device-linking-1")
    before = await table_counts(admin)
    async with admin.transaction():
        await admin.execute(
            "select 1 from users u join user_tokens t on t.user_id = u.id"
            " where u.id = $1 for no key update of u, t",
            device,
        )
        spend = asyncio.ensure_future(create(device))
        await until_waiting_on_a_lock(admin)
        await admin.execute(
            "update users set linked_to_user_id = $1, linked_at = now(), linked_tokens = 0 where id = $2",
            owner,
            device,
        )
    with pytest.raises(DeviceLinked):
        await spend
    assert await table_counts(admin) == before
    assert await db.balance(admin, device) == 5


async def test_a_spend_waiting_on_a_credit_spends_from_the_credited_balance(
    admin: asyncpg.Connection,
) -> None:
    """The wallet holds 1 token, and a credit of 10 commits while an hd
    generation (2) waits for the wallet: the spend takes its 2 from the 11.
    Computed from the balance its snapshot saw (1 - 2), it failed the
    balance check before PostgreSQL rechecked the newer row, and was refused."""
    user_id = await db.insert_user(admin, device_id="device-credit-race")
    await create(user_id, quality="hd")
    await create(user_id, quality="hd")
    assert await db.balance(admin, user_id) == 1
    async with admin.transaction():
        await admin.execute(
            "update user_tokens set balance = balance + 10, total_earned = total_earned + 10"
            " where user_id = $1",
            user_id,
        )
        spend = asyncio.ensure_future(create(user_id, quality="hd"))
        await until_waiting_on_a_lock(admin)
    created = await spend
    assert created.generation.cost == 2
    assert await db.balance(admin, user_id) == 9
    spent = await admin.fetchval("select total_spent from user_tokens where user_id = $1", user_id)
    assert spent == 6


async def test_spends_racing_links_leave_no_generation_on_a_linked_device(
    admin: asyncpg.Connection, wide_pool: None
) -> None:
    """Twenty devices each linked, as an account's later devices (they keep
    their bonus), while spending on it: whichever commits first, every
    generation made ends up the account's."""
    from repositories import users

    account = await users.get_or_create_clerk_user("user_link_spending")
    first = await users.get_or_create_device_user("device-spend-first", None, 5)
    await users.link_device(account.id, first.device_id or "")
    devices = [await users.get_or_create_device_user(f"device-spend-{n:04}", None, 5) for n in range(20)]

    async def spend(device_id: UUID) -> bool:
        try:
            await create(device_id)
        except DeviceLinked:
            return False
        return True

    outcomes = await side_by_side(
        (spend(device.id), users.link_device(account.id, device.device_id or "")) for device in devices
    )
    made = sum(outcome for outcome in outcomes if isinstance(outcome, bool))
    owners = [row["user_id"] for row in await admin.fetch("select user_id from generations")]
    assert owners == [account.id] * made
    assert await db.audit_problems(admin) == []


async def test_concurrent_creates_never_overdraw(admin: asyncpg.Connection, wide_pool: None) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_race")

    results = await outcomes([create(user_id) for _ in range(30)])

    created = [r for r in results if isinstance(r, CreatedGeneration)]
    refused = [r for r in results if isinstance(r, InsufficientTokens)]
    assert (len(created), len(refused)) == (10, 20)
    assert sorted(r.balance for r in created) == list(range(10))
    assert all(r.balance == 0 and r.cost == 1 for r in refused)
    assert await db.balance(admin, user_id) == 0
    assert await admin.fetchval("select count(*) from generations") == 10
    assert await admin.fetchval("select count(*) from usage_logs") == 10
    assert await admin.fetchval("select count(*) from token_transactions where type = 'spend'") == 10
    assert await db.audit_problems(admin) == []


async def test_daily_limit_is_exact_under_concurrency(admin: asyncpg.Connection, wide_pool: None) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_limit_race")
    await set_free_limit(admin, 3)

    results = await outcomes([create(user_id) for _ in range(10)])

    assert sum(isinstance(r, CreatedGeneration) for r in results) == 3
    assert sum(isinstance(r, RateLimited) for r in results) == 7
    assert await db.balance(admin, user_id) == 7
    assert (await wallet(admin, user_id))["generations_today"] == 3
    assert await admin.fetchval("select count(*) from generations") == 3
    assert await db.audit_problems(admin) == []


async def test_same_key_concurrently_creates_and_spends_once(
    admin: asyncpg.Connection, wide_pool: None
) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_same_key")

    results = await outcomes([create(user_id, key="same-key") for _ in range(20)])

    assert all(isinstance(r, CreatedGeneration) for r in results), results
    assert len({r.generation.id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert {r.balance for r in results} == {9}
    assert await admin.fetchval("select count(*) from generations") == 1
    assert await admin.fetchval("select count(*) from token_transactions where type = 'spend'") == 1
    assert await admin.fetchval("select count(*) from usage_logs") == 1
    assert await db.balance(admin, user_id) == 9
    assert await db.audit_problems(admin) == []


async def same_key_behind_a_locked_wallet(
    admin: asyncpg.Connection, user_id: UUID, key: str, count: int
) -> list[Any]:
    """`count` creates with one key, all started while another transaction
    holds the wallet: every statement has taken its snapshot (none can see
    the others' generation) before the first of them gets the lock."""
    async with admin.transaction():
        await admin.execute("select 1 from user_tokens where user_id = $1 for update", user_id)
        calls = asyncio.gather(*(create(user_id, key=key) for _ in range(count)), return_exceptions=True)
        await until_waiting_on_a_lock(admin, count)
    return list(await calls)


async def test_same_key_concurrently_on_the_last_tokens_replays_instead_of_refusing(
    admin: asyncpg.Connection, wide_pool: None
) -> None:
    """Bug: a repeat of a key racing its first use (a client retrying while
    the first request is still running) waited for the wallet's lock, then
    found the balance the first use had just spent, and answered 402
    insufficient_tokens though its generation had been created and paid: its
    snapshot predates the first use's commit, so neither its lookup of the
    key nor the unique constraint (it inserts nothing) could tell it."""
    user_id = await db.insert_user(admin, device_id="device-last-token")
    await admin.execute("update generation_prices set cost = 5 where quality = 'standard'")

    results = await same_key_behind_a_locked_wallet(admin, user_id, "last-tokens", 8)

    assert all(isinstance(r, CreatedGeneration) for r in results), results
    assert len({r.generation.id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert {r.balance for r in results} == {0}
    assert await admin.fetchval("select count(*) from token_transactions where type = 'spend'") == 1
    assert await db.audit_problems(admin) == []


async def test_same_key_concurrently_on_the_days_last_generation_replays_instead_of_limiting(
    admin: asyncpg.Connection, wide_pool: None
) -> None:
    """Bug (the same, for the daily limit): the racing repeat answered 429."""
    user_id = await db.insert_user(admin, clerk_id="user_last_of_day")
    await set_free_limit(admin, 1)

    results = await same_key_behind_a_locked_wallet(admin, user_id, "last-of-day", 8)

    assert all(isinstance(r, CreatedGeneration) for r in results), results
    assert len({r.generation.id for r in results}) == 1
    assert await admin.fetchval("select count(*) from generations") == 1
    assert await db.audit_problems(admin) == []


async def test_replay_returns_the_first_result_and_applies_nothing(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_replay")
    first = await create(user_id, key="first")
    await create(user_id, key="second")
    before_counts, before_wallet = await table_counts(admin), await wallet(admin, user_id)

    with stats.collect() as counted:
        again = await create(user_id, key="first")

    assert counted.round_trips == db.trips(1)
    assert again.replayed is True
    assert again.generation == first.generation
    assert again.balance == first.balance == 9
    assert await table_counts(admin) == before_counts
    assert await wallet(admin, user_id) == before_wallet
    assert await db.audit_problems(admin) == []


async def test_same_key_for_another_user_is_independent(admin: asyncpg.Connection) -> None:
    first_user = await db.insert_user(admin, clerk_id="user_key_a")
    second_user = await db.insert_user(admin, clerk_id="user_key_b")
    first = await create(first_user, key="shared")
    second = await create(second_user, key="shared")
    assert first.generation.id != second.generation.id
    assert not second.replayed


@pytest.mark.parametrize(
    ("prompt", "quality"), [("another prompt", "standard"), ("a lighthouse at dusk", "hd")]
)
async def test_same_key_with_another_request_is_a_conflict(
    admin: asyncpg.Connection, prompt: str, quality: str
) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_conflict")
    await create(user_id, key="reused")
    before_counts = await table_counts(admin)
    with pytest.raises(Conflict):
        await generations.create_generation(user_id, prompt, quality, "reused")
    assert await table_counts(admin) == before_counts
    assert await db.balance(admin, user_id) == 9


async def test_active_plan_sets_the_limit(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_pro_limit")
    await set_free_limit(admin, 1)
    await admin.execute("update plans set daily_generation_limit = 2 where id = 'pro'")
    await admin.execute(
        "insert into subscriptions (user_id, plan, status, current_period_end)"
        " values ($1, 'pro', 'active', now() + interval '1 day')",
        user_id,
    )
    await create(user_id)
    await create(user_id)
    with pytest.raises(RateLimited):
        await create(user_id)
    assert await db.audit_problems(admin) == []


# ---------------------------------------------------------------------- read


async def test_another_users_generation_is_not_found(admin: asyncpg.Connection) -> None:
    owner = await db.insert_user(admin, clerk_id="user_owner_get")
    stranger = await db.insert_user(admin, clerk_id="user_stranger")
    created = await create(owner)
    assert await generations.get_generation(owner, created.generation.id) == created.generation
    with pytest.raises(NotFound):
        await generations.get_generation(stranger, created.generation.id)


async def test_list_pages_newest_first_with_ties_broken_by_id(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_list")
    other = await db.insert_user(admin, clerk_id="user_list_other")
    # five generations, three of them created at the same instant
    await admin.execute(
        "insert into generations (user_id, prompt, quality, cost, created_at)"
        " select $1, 'p' || n, 'standard', 1, timestamptz '2030-01-01' + (least(n, 3) || ' min')::interval"
        "   from generate_series(1, 5) n",
        user_id,
    )
    await admin.execute(
        "insert into generations (user_id, prompt, quality, cost) values ($1, 'not mine', 'standard', 1)",
        other,
    )
    expected = [
        row["id"]
        for row in await admin.fetch(
            "select id from generations where user_id = $1 order by created_at desc, id desc", user_id
        )
    ]

    seen: list[UUID] = []
    pages = 0
    before = None
    while True:
        page = await generations.list_generations(user_id, limit=2, before=before)
        seen += [item.id for item in page.items]
        pages += 1
        if page.next_before is None:
            break
        before = page.next_before

    assert seen == expected
    assert pages == 3


async def test_list_refuses_a_limit_outside_one_to_a_hundred(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_list_limit")
    for limit in (0, 101):
        with pytest.raises(InvalidRequest):
            await generations.list_generations(user_id, limit=limit)


async def test_list_before_another_users_generation_is_empty(admin: asyncpg.Connection) -> None:
    owner = await db.insert_user(admin, clerk_id="user_list_owner")
    stranger = await db.insert_user(admin, clerk_id="user_list_stranger")
    await create(stranger)
    mine = await create(owner)
    page = await generations.list_generations(stranger, before=mine.generation.id)
    assert page.items == []
    assert page.next_before is None


# -------------------------------------------------------------------- worker


async def queue(admin: asyncpg.Connection, users: int, each: int) -> list[UUID]:
    """`users` device users with `each` generations queued apiece."""
    ids = []
    for n in range(users):
        user_id = await db.insert_user(admin, device_id=f"device-queue-{n:04d}")
        for _ in range(each):
            ids.append((await create(user_id)).generation.id)
    return ids


async def after_leases(admin: asyncpg.Connection, seconds: int = 1) -> Any:
    """A clock just past every lease now held."""
    return await admin.fetchval(
        "select max(lease_expires_at) + $1 * interval '1 second' from generations", seconds
    )


async def test_claim_moves_oldest_pending_to_processing_with_a_lease(admin: asyncpg.Connection) -> None:
    ids = await queue(admin, users=1, each=3)
    claim_id = uuid.uuid4()

    claimed = await generations.claim_generations(limit=2, lease_seconds=60, claim_id=claim_id)

    assert [c.id for c in claimed] == ids[:2]
    assert all(c.attempt == 1 and c.quality == "standard" for c in claimed)
    rows = await admin.fetch(
        "select id, status, attempt, claim_id, lease_expires_at - now() as lease"
        "  from generations order by created_at"
    )
    assert [r["status"] for r in rows] == ["processing", "processing", "pending"]
    assert [r["claim_id"] for r in rows] == [claim_id, claim_id, None]
    assert timedelta(seconds=55) < rows[0]["lease"] <= timedelta(seconds=60)


async def test_two_workers_never_receive_the_same_generation(
    admin: asyncpg.Connection, wide_pool: None
) -> None:
    ids = await queue(admin, users=8, each=5)

    batches = await asyncio.gather(
        *(generations.claim_generations(limit=7, lease_seconds=60, claim_id=uuid.uuid4()) for _ in range(8))
    )

    claimed = [c.id for batch in batches for c in batch]
    assert len(claimed) == len(set(claimed))
    assert set(claimed) <= set(ids)
    processing = await admin.fetchval("select count(*) from generations where status = 'processing'")
    assert processing == len(claimed)
    assert await admin.fetchval("select count(*) from generations where attempt > 1") == 0


async def test_a_retried_claim_returns_the_same_rows(admin: asyncpg.Connection) -> None:
    await queue(admin, users=1, each=4)
    claim_id = uuid.uuid4()

    first = await generations.claim_generations(limit=2, lease_seconds=60, claim_id=claim_id)
    again = await generations.claim_generations(limit=2, lease_seconds=60, claim_id=claim_id)

    assert again == first
    assert await admin.fetchval("select count(*) from generations where status = 'processing'") == 2
    assert await admin.fetchval("select max(attempt) from generations") == 1


async def test_a_claim_repeated_while_it_runs_takes_one_batch(
    admin: asyncpg.Connection, wide_pool: None
) -> None:
    """A worker that times out and repeats its keyed claim may do so while the
    first is still running: every repeat answers that one batch, and no
    second batch is left processing under a lease nobody will report on."""
    await queue(admin, users=8, each=5)
    for _ in range(10):
        claim_id = uuid.uuid4()
        batches = await asyncio.gather(
            *(generations.claim_generations(limit=3, lease_seconds=60, claim_id=claim_id) for _ in range(8))
        )
        assert all(batch == batches[0] for batch in batches)
        assert len(batches[0]) == 3
        held = await admin.fetchval(
            "select count(*) from generations where status = 'processing' and claim_id = $1", claim_id
        )
        assert held == 3
    assert await admin.fetchval("select count(*) from generations where status = 'processing'") == 30
    assert await admin.fetchval("select max(attempt) from generations") == 1


async def test_claim_refuses_bad_arguments() -> None:
    with pytest.raises(InvalidRequest):
        await generations.claim_generations(limit=0, lease_seconds=60, claim_id=uuid.uuid4())
    with pytest.raises(InvalidRequest):
        await generations.claim_generations(limit=1, lease_seconds=0, claim_id=uuid.uuid4())


async def test_expired_leases_are_retried_then_failed_and_refunded_once(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_lease")
    created = await create(user_id, quality="hd")
    assert await db.balance(admin, user_id) == 8

    for attempt in (1, 2):
        [claimed] = await generations.claim_generations(limit=5, lease_seconds=60, claim_id=uuid.uuid4())
        assert (claimed.id, claimed.attempt) == (created.generation.id, attempt)
        # a lease still running is left alone
        assert await generations.reap_generations() == generations.ReapResult(returned=0, failed=0)
        result = await generations.reap_generations(now=await after_leases(admin))
        assert result == generations.ReapResult(returned=1, failed=0)
        row = await admin.fetchrow("select status, lease_expires_at, claim_id from generations")
        assert tuple(row) == ("pending", None, None)

    [claimed] = await generations.claim_generations(limit=5, lease_seconds=60, claim_id=uuid.uuid4())
    assert claimed.attempt == 3
    cache.remember_balance(user_id, 8)
    clock = await after_leases(admin)
    assert await generations.reap_generations(now=clock) == generations.ReapResult(returned=0, failed=1)
    assert await generations.reap_generations(now=clock) == generations.ReapResult(returned=0, failed=0)

    failed = await generations.get_generation(user_id, created.generation.id)
    assert (failed.status, failed.attempt) == ("failed", 3)
    assert failed.error and failed.finished_at is not None
    assert cache.cached_balance(user_id) is None
    assert await db.balance(admin, user_id) == 10
    refunds = [r for r in await db.ledger(admin, user_id) if r["type"] == "refund"]
    assert [(r["amount"], r["balance_after"], r["reference"], r["idempotency_key"]) for r in refunds] == [
        (2, 10, str(created.generation.id), f"refund:{created.generation.id}")
    ]
    assert await db.audit_problems(admin) == []


async def test_overlapping_reapers_refund_once(admin: asyncpg.Connection, wide_pool: None) -> None:
    ids = await queue(admin, users=4, each=3)
    await generations.claim_generations(limit=100, lease_seconds=60, claim_id=uuid.uuid4())
    clock = await after_leases(admin)

    results = await asyncio.gather(
        *(generations.reap_generations(max_attempts=1, now=clock) for _ in range(2))
    )

    assert sum(r.failed for r in results) == len(ids)
    assert await admin.fetchval("select count(*) from generations where status = 'failed'") == len(ids)
    assert await admin.fetchval("select count(*) from token_transactions where type = 'refund'") == len(ids)
    assert await admin.fetchval("select count(distinct balance) from user_tokens") == 1
    assert await admin.fetchval("select min(balance) from user_tokens") == 5
    assert await db.audit_problems(admin) == []


async def test_one_reap_refunds_several_generations_of_one_user_in_ledger_order(
    admin: asyncpg.Connection,
) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_many_refunds")
    for quality in ("hd", "standard", "hd", "standard"):
        await create(user_id, quality=quality)
    assert await db.balance(admin, user_id) == 4
    clock = await admin.fetchval("select now() + interval '1 hour'")

    assert await generations.reap_generations(now=clock) == generations.ReapResult(returned=0, failed=4)

    assert await db.balance(admin, user_id) == 10
    refunds = [r for r in await db.ledger(admin, user_id) if r["type"] == "refund"]
    assert [r["balance_after"] for r in refunds] == sorted(r["balance_after"] for r in refunds)
    assert refunds[-1]["balance_after"] == 10
    assert await db.audit_problems(admin) == []


async def test_pending_past_the_cutoff_fails_and_refunds(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_stale")
    created = await create(user_id)
    soon = await admin.fetchval("select now() + interval '14 minutes'")
    late = await admin.fetchval("select now() + interval '16 minutes'")

    assert await generations.reap_generations(now=soon) == generations.ReapResult(returned=0, failed=0)
    assert await generations.reap_generations(now=late) == generations.ReapResult(returned=0, failed=1)

    generation = await generations.get_generation(user_id, created.generation.id)
    assert (generation.status, generation.attempt) == ("failed", 0)
    assert await db.balance(admin, user_id) == 10
    assert await db.audit_problems(admin) == []


async def test_a_backlog_is_reaped_in_bounded_batches_oldest_first(admin: asyncpg.Connection) -> None:
    """However large the backlog, one statement takes at most a batch of each
    kind, so it finishes inside the statement timeout; `more` says to go on."""
    ids = await queue(admin, users=3, each=4)
    clock = await admin.fetchval("select now() + interval '1 hour'")

    results = [await generations.reap_generations(now=clock, batch_size=5) for _ in range(4)]

    assert [(r.failed, r.more) for r in results] == [(5, True), (5, True), (2, False), (0, False)]
    failed_in_order = [
        row["reference"]
        for row in await admin.fetch(
            "select reference from token_transactions where type = 'refund' order by id"
        )
    ]
    assert sorted(failed_in_order[:5]) == sorted(str(i) for i in ids[:5])  # the oldest first
    assert sorted(failed_in_order) == sorted(str(i) for i in ids)  # each refunded once
    assert await admin.fetchval("select min(balance) = 5 and max(balance) = 5 from user_tokens")
    assert await db.audit_problems(admin) == []


async def test_lapsed_leases_are_taken_in_bounded_batches(admin: asyncpg.Connection) -> None:
    await queue(admin, users=1, each=5)
    await generations.claim_generations(limit=5, lease_seconds=60, claim_id=uuid.uuid4())
    clock = await after_leases(admin)

    results = [await generations.reap_generations(now=clock, batch_size=2) for _ in range(4)]

    assert [(r.returned, r.more) for r in results] == [(2, True), (2, True), (1, False), (0, False)]
    assert await admin.fetchval("select count(*) from generations where status = 'pending'") == 5


async def test_reap_refuses_an_empty_batch() -> None:
    with pytest.raises(InvalidRequest):
        await generations.reap_generations(batch_size=0)


async def test_a_requeued_generation_waits_the_cutoff_from_its_return(admin: asyncpg.Connection) -> None:
    """A generation returned to the queue after a lapsed lease is not failed at
    once for having been created long ago: the cut-off counts from its return."""
    user_id = await db.insert_user(admin, clerk_id="user_requeued")
    created = await create(user_id)
    await admin.execute(
        "update generations"
        "   set created_at = now() - interval '1 hour', updated_at = now() - interval '1 hour'"
    )
    await generations.claim_generations(limit=1, lease_seconds=60, claim_id=uuid.uuid4())
    clock = await after_leases(admin)

    assert await generations.reap_generations(now=clock) == generations.ReapResult(returned=1, failed=0)
    assert await generations.reap_generations(now=clock) == generations.ReapResult(returned=0, failed=0)
    generation = await generations.get_generation(user_id, created.generation.id)
    assert generation.status == "pending"


# ------------------------------------------------------------------- results


async def test_success_is_recorded_and_a_later_result_changes_nothing(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_success")
    created = await create(user_id)
    await generations.claim_generations(limit=1, lease_seconds=60, claim_id=uuid.uuid4())

    done = await generations.record_result(created.generation.id, "succeeded", "images/a.png", None)
    assert (done.status, done.image_key, done.error) == ("succeeded", "images/a.png", None)
    assert done.finished_at is not None
    assert await admin.fetchval("select lease_expires_at from generations") is None

    again = await generations.record_result(created.generation.id, "failed", None, "worker crashed")
    assert again == done
    assert await db.balance(admin, user_id) == 9
    assert await admin.fetchval("select count(*) from token_transactions where type = 'refund'") == 0
    assert await db.audit_problems(admin) == []


async def test_a_pending_generation_may_receive_its_result(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_pending_result")
    created = await create(user_id)
    done = await generations.record_result(created.generation.id, "succeeded", "images/b.png", None)
    assert done.status == "succeeded"


async def test_concurrent_failure_results_refund_once(admin: asyncpg.Connection, wide_pool: None) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_fail_twice")
    created = await create(user_id, quality="hd")
    await generations.claim_generations(limit=1, lease_seconds=60, claim_id=uuid.uuid4())
    cache.remember_balance(user_id, 8)

    results = await asyncio.gather(
        *(
            generations.record_result(created.generation.id, "failed", None, "out of memory")
            for _ in range(20)
        )
    )

    assert {(r.status, r.error) for r in results} == {("failed", "out of memory")}
    assert len({r.finished_at for r in results}) == 1
    assert cache.cached_balance(user_id) is None
    assert await db.balance(admin, user_id) == 10
    refunds = [r for r in await db.ledger(admin, user_id) if r["type"] == "refund"]
    assert [(r["amount"], r["balance_after"], r["idempotency_key"]) for r in refunds] == [
        (2, 10, f"refund:{created.generation.id}")
    ]
    assert await db.audit_problems(admin) == []


async def test_success_without_an_image_key_is_invalid(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_no_key")
    created = await create(user_id)
    for status, image_key in (("succeeded", None), ("done", "images/c.png")):
        with pytest.raises(InvalidRequest):
            await generations.record_result(created.generation.id, status, image_key, None)
    assert await admin.fetchval("select status from generations") == "pending"


async def test_result_for_an_unknown_generation_is_not_found() -> None:
    with pytest.raises(NotFound):
        await generations.record_result(uuid.uuid4(), "failed", None, "lost")
