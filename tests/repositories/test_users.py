"""repositories/users.py: get-or-create, the anonymous signup limit, device linking."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg
import pytest

from database import (
    Conflict,
    DeviceLinked,
    InvalidRequest,
    NotFound,
    RateLimited,
    stats,
    transaction,
)
from repositories import generations, payments, subscriptions, tokens, users
from tests import db
from tests.repositories import attached_payment, paid_payment, side_by_side, wide_pool

LIMIT = 5


@pytest.fixture
async def many_connections() -> AsyncIterator[None]:
    async with wide_pool(30):
        yield


async def signups(admin: asyncpg.Connection, ip: str | None = None) -> int:
    count: int = await admin.fetchval(
        "select count(*) from usage_logs where action = 'signup' and source_ip is not distinct from $1::inet",
        ip,
    )
    return count


async def add_generation(admin: asyncpg.Connection, user_id: UUID, key: str | None) -> UUID:
    generation_id: UUID = await admin.fetchval(
        "insert into generations (user_id, prompt, quality, cost, idempotency_key)"
        " values ($1, 'a cat in a hat', 'standard', 1, $2) returning id",
        user_id,
        key,
    )
    return generation_id


async def add_payment(admin: asyncpg.Connection, user_id: UUID, key: str | None) -> UUID:
    payment_id: UUID = await admin.fetchval(
        "insert into payments (user_id, package_id, amount, currency, tokens, idempotency_key)"
        " values ($1, 'tokens_50', 9900, 'RUB', 50, $2) returning id",
        user_id,
        key,
    )
    return payment_id


# ------------------------------------------------------------ Clerk users


async def test_new_clerk_user_is_created_with_the_welcome_bonus(admin: asyncpg.Connection) -> None:
    user = await users.get_or_create_clerk_user("user_2new", "new@example.com")
    assert user.created
    assert (user.clerk_id, user.device_id, user.email, user.linked_to_user_id) == (
        "user_2new",
        None,
        "new@example.com",
        None,
    )
    assert await db.balance(admin, user.id) == 10
    assert [r["type"] for r in await db.ledger(admin, user.id)] == ["bonus"]


async def test_existing_clerk_user_costs_one_round_trip_and_no_write(admin: asyncpg.Connection) -> None:
    first = await users.get_or_create_clerk_user("user_2old", "old@example.com")
    row_version = await admin.fetchval("select xmin::text from users where id = $1", first.id)
    with stats.collect() as counted:
        again = await users.get_or_create_clerk_user("user_2old", "changed@example.com")
    assert (counted.statements, counted.round_trips) == (1, db.trips(1))
    assert not again.created
    assert again.model_dump() == first.model_dump() | {"created": False}
    assert await admin.fetchval("select xmin::text from users where id = $1", first.id) == row_version
    assert await admin.fetchval("select count(*) from token_transactions") == 1


async def test_thirty_concurrent_first_sights_make_one_user_and_one_bonus(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    found = await asyncio.gather(*(users.get_or_create_clerk_user("user_2race") for _ in range(30)))
    assert len({user.id for user in found}) == 1
    assert sum(user.created for user in found) == 1
    assert await admin.fetchval("select count(*) from users") == 1
    (user_id,) = {user.id for user in found}
    assert await db.balance(admin, user_id) == 10
    assert len(await db.ledger(admin, user_id)) == 1
    assert await db.audit_problems(admin) == []


async def test_empty_clerk_id_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        await users.get_or_create_clerk_user("")


async def test_get_user(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_get")
    user = await users.get_user(user_id)
    assert (user.id, user.clerk_id, user.created) == (user_id, "user_get", False)
    with pytest.raises(NotFound):
        await users.get_user(uuid.uuid4())


async def test_balance_and_plan_in_one_round_trip(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_standing")
    with stats.collect() as counted:
        standing = await users.get_balance_and_plan(user_id)
    assert counted.round_trips == db.trips(1)
    assert standing == users.BalanceAndPlan(balance=10, plan="free")


async def test_balance_and_plan_sees_only_an_active_unexpired_plan(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_planned")
    await admin.execute(
        "insert into subscriptions (user_id, plan, status, current_period_start, current_period_end)"
        " values ($1, 'premium', 'expired', now() - interval '40 days', now() - interval '10 days'),"
        "        ($1, 'pro', 'active', now() - interval '31 days', now() - interval '1 day')",
        user_id,
    )
    assert (await users.get_balance_and_plan(user_id)).plan == "free"
    await admin.execute(
        "update subscriptions set current_period_end = now() + interval '1 day' where status = 'active'"
    )
    assert (await users.get_balance_and_plan(user_id)).plan == "pro"


async def test_balance_and_plan_of_no_user_is_not_found() -> None:
    with pytest.raises(NotFound):
        await users.get_balance_and_plan(uuid.uuid4())


# ----------------------------------------------------------- device users


async def test_new_device_user_gets_five_tokens_and_a_signup_row(admin: asyncpg.Connection) -> None:
    user = await users.get_or_create_device_user("device-new-0001", "203.0.113.7", LIMIT)
    assert user.created
    assert (user.device_id, user.clerk_id) == ("device-new-0001", None)
    assert await db.balance(admin, user.id) == 5
    row = await admin.fetchrow(
        "select user_id, host(source_ip) as source_ip from usage_logs where action = 'signup'"
    )
    assert row is not None
    assert (row["user_id"], row["source_ip"]) == (user.id, "203.0.113.7")
    assert await admin.fetchval("select host(signup_ip) from users where id = $1", user.id) == "203.0.113.7"


async def test_existing_device_costs_one_round_trip(admin: asyncpg.Connection) -> None:
    first = await users.get_or_create_device_user("device-old-0001", "203.0.113.7", LIMIT)
    with stats.collect() as counted:
        again = await users.get_or_create_device_user("device-old-0001", "203.0.113.7", LIMIT)
    assert (counted.statements, counted.round_trips) == (1, db.trips(1))
    assert (again.id, again.created) == (first.id, False)
    assert await signups(admin, "203.0.113.7") == 1


async def test_local_call_without_ip_has_no_limit(admin: asyncpg.Connection) -> None:
    made = [await users.get_or_create_device_user(f"device-local-{n:04}", None, 1) for n in range(3)]
    assert all(user.created for user in made)
    assert await signups(admin, None) == 3


async def test_malformed_device_id_is_refused(admin: asyncpg.Connection) -> None:
    with pytest.raises(InvalidRequest):
        await users.get_or_create_device_user("bad id!", "203.0.113.7", LIMIT)
    assert await admin.fetchval("select count(*) from users") == 0
    assert await signups(admin, "203.0.113.7") == 0


async def test_malformed_ip_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        await users.get_or_create_device_user("device-ip-0001", "not-an-ip", LIMIT)


async def test_fifty_concurrent_new_devices_from_one_ip_make_exactly_the_limit(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    ip = "198.51.100.23"
    results = await asyncio.gather(
        *(users.get_or_create_device_user(f"device-flood-{n:04}", ip, LIMIT) for n in range(50)),
        return_exceptions=True,
    )
    made = [r for r in results if isinstance(r, users.User)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(made) == LIMIT
    assert len(refused) == 50 - LIMIT
    # the window started with these signups: an hour until the oldest leaves it
    assert all(3500 < r.retry_after <= 3600 for r in refused)
    assert await admin.fetchval("select count(*) from users") == LIMIT
    assert await signups(admin, ip) == LIMIT

    other = await users.get_or_create_device_user("device-elsewhere-1", "198.51.100.24", LIMIT)
    assert other.created
    # devices already made from the limited address still resolve
    for user in made:
        assert (await users.get_or_create_device_user(user.device_id or "", ip, LIMIT)).id == user.id
    assert await db.audit_problems(admin) == []


async def test_signups_older_than_an_hour_leave_the_window(admin: asyncpg.Connection) -> None:
    ip = "198.51.100.30"
    old = await db.insert_user(admin, device_id="device-old-signup")
    await admin.execute(
        "insert into usage_logs (user_id, action, source_ip, created_at)"
        " values ($1, 'signup', $2::inet, now() - interval '61 minutes'),"
        "        ($1, 'signup', $2::inet, now() - interval '50 minutes')",
        old,
        ip,
    )
    assert (await users.get_or_create_device_user("device-window-1", ip, 2)).created
    with pytest.raises(RateLimited) as raised:
        await users.get_or_create_device_user("device-window-2", ip, 2)
    # the 50-minute-old signup is the oldest counted: it leaves in 10 minutes
    assert 540 < raised.value.retry_after <= 600


async def test_retry_after_never_exceeds_the_window(admin: asyncpg.Connection) -> None:
    """Regression: the window was measured from now(), the start of the refused
    transaction, which may come before the signup it counts (the transaction
    begins, then waits for the IP lock): retry_after came out as 3601."""
    ip = "198.51.100.40"
    # a transaction held open while another signup runs beside it: two connections
    async with wide_pool(2), transaction() as tx:
        await tx.fetchval("select now()")  # this transaction has begun
        assert (await users.get_or_create_device_user("device-early-0001", ip, 1)).created
        with pytest.raises(RateLimited) as raised:
            await users.get_or_create_device_user("device-early-0002", ip, 1, db=tx)
    assert raised.value.retry_after <= 3600


async def test_ip_with_a_mask_counts_as_the_address(admin: asyncpg.Connection) -> None:
    """API Gateway's sample events carry the source IP as "a.b.c.d/32"."""
    await users.get_or_create_device_user("device-mask-0001", "192.0.2.9/32", 1)
    with pytest.raises(RateLimited):
        await users.get_or_create_device_user("device-mask-0002", "192.0.2.9", 1)
    assert await signups(admin, "192.0.2.9") == 1


async def signup_addresses(admin: asyncpg.Connection) -> dict[str, str]:
    """Each signup's device and the address stored for it, in the log and on the user."""
    rows = await admin.fetch(
        "select u.device_id, host(l.source_ip) as logged, host(u.signup_ip) as signed_up"
        "  from usage_logs l join users u on u.id = l.user_id where l.action = 'signup'"
    )
    assert all(row["logged"] == row["signed_up"] for row in rows)
    return {row["device_id"]: row["logged"] for row in rows}


async def test_addresses_in_one_ipv6_64_share_the_limit(admin: asyncpg.Connection) -> None:
    """An IPv6 client holds a /64 and rotates its address inside it."""
    for n, ip in enumerate(("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff")):
        assert (await users.get_or_create_device_user(f"device-v6-{n:04}", ip, 2)).created
    with pytest.raises(RateLimited):
        await users.get_or_create_device_user("device-v6-0002", "2001:db8:1:2:a:b:c:d", 2)
    assert await admin.fetchval("select count(*) from users") == 2
    # operators see the exact addresses, not the network
    assert await signup_addresses(admin) == {
        "device-v6-0000": "2001:db8:1:2::1",
        "device-v6-0001": "2001:db8:1:2:ffff:ffff:ffff:ffff",
    }


async def test_addresses_in_neighbouring_ipv6_64s_do_not_share_the_limit(admin: asyncpg.Connection) -> None:
    assert (await users.get_or_create_device_user("device-v6-a-0001", "2001:db8:1:2::1", 1)).created
    assert (await users.get_or_create_device_user("device-v6-b-0001", "2001:db8:1:3::1", 1)).created
    assert (await users.get_or_create_device_user("device-v6-c-0001", "2001:db8:1:1:ffff::1", 1)).created
    with pytest.raises(RateLimited):
        await users.get_or_create_device_user("device-v6-a-0002", "2001:db8:1:2::2", 1)
    assert await admin.fetchval("select count(*) from users") == 3


async def test_ipv4_counts_each_address_alone(admin: asyncpg.Connection) -> None:
    assert (await users.get_or_create_device_user("device-v4-a-0001", "192.0.2.1", 1)).created
    assert (await users.get_or_create_device_user("device-v4-b-0001", "192.0.2.2", 1)).created
    with pytest.raises(RateLimited):
        await users.get_or_create_device_user("device-v4-a-0002", "192.0.2.1", 1)
    assert await signup_addresses(admin) == {"device-v4-a-0001": "192.0.2.1", "device-v4-b-0001": "192.0.2.2"}


async def test_ipv4_mapped_into_ipv6_counts_as_the_ipv4_address(admin: asyncpg.Connection) -> None:
    """A dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d: it is
    that IPv4 address, not an IPv6 /64 (::/64 would hold every mapped client)."""
    assert (await users.get_or_create_device_user("device-mapped-01", "::ffff:192.0.2.20", 1)).created
    with pytest.raises(RateLimited):
        await users.get_or_create_device_user("device-mapped-02", "192.0.2.20", 1)
    # another IPv4 address, mapped, has its own limit
    assert (await users.get_or_create_device_user("device-mapped-03", "::ffff:192.0.2.21", 1)).created
    assert await signup_addresses(admin) == {
        "device-mapped-01": "192.0.2.20",
        "device-mapped-03": "192.0.2.21",
    }
    assert await admin.fetchval("select count(*) from usage_logs where family(source_ip) = 4") == 2


async def test_a_signup_waits_for_one_from_another_address_of_its_64(admin: asyncpg.Connection) -> None:
    """The advisory lock is the network's: a signup from the same /64 waits
    for an open one to commit, then counts it (limit 1: refused)."""
    async with wide_pool(2):
        async with transaction() as tx:
            first = await users.get_or_create_device_user("device-lock-0001", "2001:db8:9:1::1", 1, db=tx)
            assert first.created
            second = asyncio.create_task(
                users.get_or_create_device_user("device-lock-0002", "2001:db8:9:1::2", 1)
            )
            while not await admin.fetchval(
                "select exists (select 1 from pg_locks where locktype = 'advisory' and not granted)"
            ):
                assert not second.done(), "the second signup did not wait for the first's lock"
                await asyncio.sleep(0.01)
        with pytest.raises(RateLimited):
            await second
    assert await admin.fetchval("select count(*) from users") == 1


async def test_forty_concurrent_new_devices_rotating_through_one_64_make_exactly_the_limit(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    # privacy addresses: scattered through the /64
    client = ipaddress.IPv6Network("2001:db8:77:1::/64")
    addresses = {f"device-rotate-{n:04}": str(client[n * 0x9E37_79B9_7F4A + 1]) for n in range(40)}
    results = await asyncio.gather(
        *(users.get_or_create_device_user(device, ip, LIMIT) for device, ip in addresses.items()),
        return_exceptions=True,
    )
    made = [r for r in results if isinstance(r, users.User)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert (len(made), len(refused)) == (LIMIT, 40 - LIMIT)
    assert await admin.fetchval("select count(*) from users") == LIMIT
    # each user's signup row holds the exact address it came from
    assert await signup_addresses(admin) == {user.device_id: addresses[user.device_id or ""] for user in made}
    # one welcome bonus per user created, and nothing else in the ledger
    bonuses = await admin.fetch("select user_id, amount, idempotency_key from token_transactions")
    assert sorted((row["user_id"], row["amount"], row["idempotency_key"]) for row in bonuses) == sorted(
        (user.id, 5, "welcome_bonus") for user in made
    )
    # another /64 of the same /48 is not held back
    assert (await users.get_or_create_device_user("device-rotate-next", "2001:db8:77:2::1", LIMIT)).created
    assert await db.audit_problems(admin) == []


async def test_device_signup_in_a_callers_transaction(admin: asyncpg.Connection) -> None:
    async with transaction() as tx:
        user = await users.get_or_create_device_user("device-in-tx-01", "192.0.2.10", LIMIT, db=tx)
        assert user.created
    assert await db.balance(admin, user.id) == 5


# ---------------------------------------------------------------- linking


async def test_link_moves_the_balance_and_reowns_generations_and_payments(admin: asyncpg.Connection) -> None:
    account = await users.get_or_create_clerk_user("user_link")
    device = await users.get_or_create_device_user("device-link-0001", "192.0.2.1", LIMIT)
    await tokens.credit(device.id, 50, "purchase", "payment:p0")
    await tokens.spend(device.id, 1, "generation:g0")
    generation = await add_generation(admin, device.id, "same-key")
    payment = await add_payment(admin, device.id, "same-key")
    # the account already used the same client keys: re-owning must not collide
    await add_generation(admin, account.id, "same-key")
    await add_payment(admin, account.id, "same-key")

    result = await users.link_device(account.id, "device-link-0001")

    assert result.moved_tokens == 54
    assert result.user.id == account.id
    assert await db.balance(admin, device.id) == 0
    assert await db.balance(admin, account.id) == 64
    device_rows = await db.ledger(admin, device.id)
    account_rows = await db.ledger(admin, account.id)
    key = f"link:{device.id}"
    assert [(r["amount"], r["balance_after"], r["type"], r["idempotency_key"]) for r in device_rows[-1:]] == [
        (-54, 0, "transfer_out", key)
    ]
    assert [
        (r["amount"], r["balance_after"], r["type"], r["idempotency_key"]) for r in account_rows[-1:]
    ] == [(54, 64, "transfer_in", key)]
    assert (device_rows[-1]["reference"], account_rows[-1]["reference"]) == (str(account.id), str(device.id))
    for table, row_id in (("generations", generation), ("payments", payment)):
        row = await admin.fetchrow(f"select user_id, idempotency_key from {table} where id = $1", row_id)
        assert row is not None
        assert (row["user_id"], row["idempotency_key"]) == (account.id, None)
    for table in ("generations", "payments"):
        keys = await admin.fetch(f"select idempotency_key from {table} where user_id = $1", device.id)
        assert keys == []
    linked = await admin.fetchrow(
        "select linked_to_user_id, linked_at, linked_tokens from users where id = $1", device.id
    )
    assert linked is not None
    assert (linked["linked_to_user_id"], linked["linked_tokens"]) == (account.id, 54)
    assert linked["linked_at"] is not None
    assert await db.audit_problems(admin) == []


async def test_a_request_repeated_as_the_account_after_the_link_answers_what_the_device_did(
    admin: asyncpg.Connection,
) -> None:
    """The device spent and started a payment, and lost both answers; the
    user signed in and the app linked the device, which now answers 403, so
    the app repeats both requests, with their keys, as the account."""
    account = await users.get_or_create_clerk_user("user_link_repeat")
    device = await users.get_or_create_device_user("device-link-rep1", "192.0.2.1", LIMIT)
    spent = await generations.create_generation(device.id, "a fox", "hd", "spend-key")
    bought, _ = await payments.create_pending_payment(device.id, "tokens_50", "buy-key")
    await users.link_device(account.id, "device-link-rep1")
    balance = await db.balance(admin, account.id)

    again = await generations.create_generation(account.id, "a fox", "hd", "spend-key")
    bought_again, created = await payments.create_pending_payment(account.id, "tokens_50", "buy-key")

    # answered as the first answer was: the device's balance right after it
    assert (again.generation.id, again.replayed, again.balance) == (spent.generation.id, True, spent.balance)
    assert (bought_again.id, created) == (bought.id, False)
    assert await db.balance(admin, account.id) == balance
    assert await admin.fetchval("select count(*) from generations") == 1
    assert await admin.fetchval("select count(*) from payments") == 1
    assert await db.audit_problems(admin) == []


async def test_linked_device_can_no_longer_act_alone(admin: asyncpg.Connection) -> None:
    account = await users.get_or_create_clerk_user("user_link_alone")
    await users.get_or_create_device_user("device-alone-0001", "192.0.2.1", LIMIT)
    await users.link_device(account.id, "device-alone-0001")
    with pytest.raises(DeviceLinked):
        await users.get_or_create_device_user("device-alone-0001", "192.0.2.1", LIMIT)
    with pytest.raises(DeviceLinked):
        await users.get_or_create_device_user("device-alone-0001", None, LIMIT)


async def test_a_linked_device_cannot_start_a_payment(admin: asyncpg.Connection) -> None:
    """Another Lambda may still hold the device's identity in its cache: the
    statement itself refuses, so nothing can be paid into the device's wallet."""
    account = await users.get_or_create_clerk_user("user_link_nopay")
    device = await users.get_or_create_device_user("device-nopay-0001", None, LIMIT)
    await users.link_device(account.id, "device-nopay-0001")
    with pytest.raises(DeviceLinked):
        await payments.create_pending_payment(device.id, "tokens_50", "after-link")
    assert await admin.fetchval("select count(*) from payments") == 0


async def test_payments_started_while_linking_all_reach_the_account(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    """Twenty devices each link while starting a payment: whichever commits
    first, no payment is left with a linked device, where its tokens could
    never be used."""
    account = await users.get_or_create_clerk_user("user_link_paying")
    devices = [await users.get_or_create_device_user(f"device-paying-{n:04}", None, LIMIT) for n in range(20)]

    async def buy(device_id: UUID) -> bool:
        try:
            await payments.create_pending_payment(device_id, "tokens_50", "while-linking")
        except DeviceLinked:
            return False
        return True

    outcomes = await side_by_side(
        (buy(device.id), users.link_device(account.id, device.device_id or "")) for device in devices
    )
    bought = sum(outcome for outcome in outcomes if isinstance(outcome, bool))
    owners = [row["user_id"] for row in await admin.fetch("select user_id from payments")]
    assert owners == [account.id] * bought
    assert await db.audit_problems(admin) == []


async def test_linking_again_is_a_no_op_reporting_the_first_move(admin: asyncpg.Connection) -> None:
    account = await users.get_or_create_clerk_user("user_link_twice")
    device = await users.get_or_create_device_user("device-twice-0001", None, LIMIT)
    first = await users.link_device(account.id, "device-twice-0001")
    ledger_before = await admin.fetchval("select count(*) from token_transactions")
    again = await users.link_device(account.id, "device-twice-0001")
    assert first.moved_tokens == again.moved_tokens == 5
    assert again.user == first.user
    assert await admin.fetchval("select count(*) from token_transactions") == ledger_before
    assert await db.balance(admin, account.id) == 15
    assert await db.balance(admin, device.id) == 0
    assert await db.audit_problems(admin) == []


async def test_a_later_device_keeps_its_welcome_bonus(admin: asyncpg.Connection) -> None:
    account = await users.get_or_create_clerk_user("user_link_many")
    await users.get_or_create_device_user("device-first-0001", None, LIMIT)
    second = await users.get_or_create_device_user("device-second-001", None, LIMIT)
    await tokens.credit(second.id, 20, "purchase", "payment:p2")
    third = await users.get_or_create_device_user("device-third-0001", None, LIMIT)
    await tokens.spend(third.id, 2, "generation:g3")

    assert (await users.link_device(account.id, "device-first-0001")).moved_tokens == 5
    assert (await users.link_device(account.id, "device-second-001")).moved_tokens == 20
    assert await db.balance(admin, second.id) == 5

    # 3 tokens left: all of them stay, nothing moves, no ledger rows
    rows_before = await admin.fetchval("select count(*) from token_transactions")
    assert (await users.link_device(account.id, "device-third-0001")).moved_tokens == 0
    assert await admin.fetchval("select count(*) from token_transactions") == rows_before
    assert await db.balance(admin, third.id) == 3
    assert await admin.fetchval("select linked_tokens from users where id = $1", third.id) == 0
    assert (await users.link_device(account.id, "device-third-0001")).moved_tokens == 0
    assert await db.balance(admin, account.id) == 10 + 5 + 20
    assert await db.audit_problems(admin) == []


async def test_concurrent_double_link_moves_once(admin: asyncpg.Connection, many_connections: None) -> None:
    account = await users.get_or_create_clerk_user("user_link_race")
    device = await users.get_or_create_device_user("device-race-0001", None, LIMIT)
    await tokens.credit(device.id, 7, "purchase", "payment:p1")
    results = await asyncio.gather(*(users.link_device(account.id, "device-race-0001") for _ in range(10)))
    assert {r.moved_tokens for r in results} == {12}
    assert await db.balance(admin, account.id) == 22
    assert await db.balance(admin, device.id) == 0
    assert await admin.fetchval("select count(*) from token_transactions where type = 'transfer_in'") == 1
    assert await db.audit_problems(admin) == []


async def test_two_devices_linked_at_once_share_one_bonus(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    """Whichever link commits second sees the first and leaves its bonus behind."""
    account = await users.get_or_create_clerk_user("user_link_pair")
    for n in range(2):
        await users.get_or_create_device_user(f"device-pair-{n:04}", None, LIMIT)
    results = await asyncio.gather(*(users.link_device(account.id, f"device-pair-{n:04}") for n in range(2)))
    assert sorted(r.moved_tokens for r in results) == [0, 5]
    assert await db.balance(admin, account.id) == 15
    assert await db.audit_problems(admin) == []


async def test_device_linked_elsewhere_is_a_conflict(admin: asyncpg.Connection) -> None:
    first = await users.get_or_create_clerk_user("user_link_first")
    second = await users.get_or_create_clerk_user("user_link_second")
    await users.get_or_create_device_user("device-taken-0001", None, LIMIT)
    await users.link_device(first.id, "device-taken-0001")
    with pytest.raises(Conflict):
        await users.link_device(second.id, "device-taken-0001")
    assert await db.balance(admin, second.id) == 10
    assert await db.audit_problems(admin) == []


async def test_link_refuses_unknown_and_wrong_parties(admin: asyncpg.Connection) -> None:
    account = await users.get_or_create_clerk_user("user_link_bad")
    device = await users.get_or_create_device_user("device-bad-00001", None, LIMIT)
    with pytest.raises(NotFound):
        await users.link_device(account.id, "device-nobody-01")
    with pytest.raises(NotFound):
        await users.link_device(uuid.uuid4(), "device-bad-00001")
    # a device account is not a Clerk account to link into
    other_device = await users.get_or_create_device_user("device-bad-00002", None, LIMIT)
    with pytest.raises(InvalidRequest):
        await users.link_device(other_device.id, "device-bad-00001")
    assert await db.balance(admin, device.id) == 5
    assert await admin.fetchval("select count(*) from users where linked_to_user_id is not null") == 0


# ------------------------------------------------------- linking a plan


async def plans(admin: asyncpg.Connection, user_id: UUID) -> list[tuple[str, str, timedelta]]:
    """(plan, status, time left) of each of the user's subscriptions, oldest first."""
    rows = await admin.fetch(
        "select plan, status, current_period_end - now() as left_ from subscriptions"
        " where user_id = $1 order by created_at",
        user_id,
    )
    return [(row["plan"], row["status"], row["left_"]) for row in rows]


async def plan_end(admin: asyncpg.Connection, user_id: UUID) -> datetime:
    end: datetime = await admin.fetchval(
        "select current_period_end from subscriptions where user_id = $1 and status = 'active'", user_id
    )
    return end


async def add_lapsed_plan(
    admin: asyncpg.Connection, user_id: UUID, ended_ago: timedelta = timedelta(days=1)
) -> None:
    """A premium plan still marked active, its end `ended_ago` past: the
    expiry job has not reached it yet."""
    await admin.execute(
        "insert into subscriptions (user_id, plan, status, current_period_start, current_period_end)"
        " values ($1, 'premium', 'active', now() - interval '31 days', now() - $2::interval)",
        user_id,
        ended_ago,
    )


async def test_a_plan_bought_on_the_device_becomes_the_accounts(admin: asyncpg.Connection) -> None:
    account = await users.get_or_create_clerk_user("user_plan_moves")
    device = await users.get_or_create_device_user("device-plan-0001", None, LIMIT)
    bought = await paid_payment(device.id, "pro_month")
    end = await plan_end(admin, device.id)

    await users.link_device(account.id, "device-plan-0001")

    assert await plans(admin, device.id) == []
    [(plan, status, _)] = await plans(admin, account.id)
    assert (plan, status) == ("pro", "active")
    assert await plan_end(admin, account.id) == end  # its paid time, to the microsecond
    assert (await users.get_balance_and_plan(account.id)).plan == "pro"
    # the device's payment went with it, and its refund now shortens the account's plan
    assert bought.provider_payment_id is not None
    await payments.apply_refund(bought.provider_payment_id, "rf-linked", bought.amount)
    [(_, status, _)] = await plans(admin, account.id)
    assert status == "canceled"
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize(
    ("account_package", "device_package", "kept"),
    [("pro_month", "premium_month", "premium"), ("premium_month", "pro_month", "premium")],
)
async def test_both_plans_merge_into_the_higher_with_both_times_at_their_worth(
    admin: asyncpg.Connection, account_package: str, device_package: str, kept: str
) -> None:
    account = await users.get_or_create_clerk_user("user_plan_merge")
    device = await users.get_or_create_device_user("device-merge-0001", None, LIMIT)
    await paid_payment(account.id, account_package)
    await paid_payment(device.id, device_package)
    account_end = await plan_end(admin, account.id)
    device_end = await plan_end(admin, device.id)

    before = await admin.fetchval("select now()")
    await users.link_device(account.id, "device-merge-0001")
    after = await admin.fetchval("select now()")

    [(plan, status, _)] = await plans(admin, account.id)
    assert (plan, status) == (kept, "active")
    # both times left when the link ran, pro's converted into premium at its
    # worth (pro_month 499.00 against premium_month 1499.00 RUB for 30 days)
    worth = {"pro_month": 49900 / 149900, "premium_month": 1.0}

    def merged_at(moment: datetime) -> datetime:
        return (
            moment
            + (account_end - moment) * worth[account_package]
            + (device_end - moment) * worth[device_package]
        )

    merged = await plan_end(admin, account.id)
    ends = sorted((merged_at(before), merged_at(after)))
    assert ends[0] - timedelta(seconds=1) <= merged <= ends[1] + timedelta(seconds=1)
    [(plan, status, left)] = await plans(admin, device.id)
    assert (plan, status) == (device_package.removesuffix("_month"), "canceled")
    assert left <= timedelta(0)
    assert await db.audit_problems(admin) == []


async def test_a_lapsed_account_plan_takes_the_devices(admin: asyncpg.Connection) -> None:
    """Still marked active, past its end (the expiry job has not run): the
    account has no plan to speak of, so it gets the device's plan and time."""
    account = await users.get_or_create_clerk_user("user_plan_lapsed")
    device = await users.get_or_create_device_user("device-lapsed-001", None, LIMIT)
    await add_lapsed_plan(admin, account.id)
    await paid_payment(device.id, "pro_month")
    await users.link_device(account.id, "device-lapsed-001")
    [(plan, status, left)] = await plans(admin, account.id)
    assert (plan, status) == ("pro", "active")
    assert timedelta(days=29, hours=23) < left <= timedelta(days=30)
    assert (await users.get_balance_and_plan(account.id)).plan == "pro"


async def test_a_lapsed_device_plan_stays_behind(admin: asyncpg.Connection) -> None:
    account = await users.get_or_create_clerk_user("user_plan_behind")
    device = await users.get_or_create_device_user("device-behind-001", None, LIMIT)
    await add_lapsed_plan(admin, device.id)
    await users.link_device(account.id, "device-behind-001")
    assert await plans(admin, account.id) == []
    assert [(plan, status) for plan, status, _ in await plans(admin, device.id)] == [("premium", "active")]
    assert await subscriptions.expire_ended() == 1


async def test_linking_beside_the_expiry_job_and_purchases_keeps_every_paid_day(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    """Links of devices with a plan, the expiry job, and a plan purchase by
    each account, all at once; every other account starts with a plan past
    its end that the job has yet to expire. Each account ends with one
    active plan holding both purchases' time (30 + 30 days), and no device
    keeps one."""
    pairs = []
    for n in range(10):
        account = await users.get_or_create_clerk_user(f"user_plan_race_{n}")
        device = await users.get_or_create_device_user(f"device-prace-{n:04}", None, LIMIT)
        await paid_payment(device.id, "pro_month")
        if n % 2:
            await add_lapsed_plan(admin, account.id, ended_ago=timedelta(seconds=1))
        pairs.append((account, device))

    async def expire_often() -> None:
        for _ in range(30):
            await subscriptions.expire_ended()

    await asyncio.gather(
        *(users.link_device(account.id, device.device_id or "") for account, device in pairs),
        *(paid_payment(account.id, "pro_month") for account, _ in pairs),
        expire_often(),
    )

    for account, device in pairs:
        [(plan, left)] = [
            (plan, left) for plan, status, left in await plans(admin, account.id) if status == "active"
        ]
        assert plan == "pro"
        assert timedelta(days=59, hours=23) < left <= timedelta(days=60)
        assert "active" not in [status for _, status, _ in await plans(admin, device.id)]
    assert await db.audit_problems(admin) == []


async def test_link_invalidates_both_cached_balances(admin: asyncpg.Connection) -> None:
    account = await users.get_or_create_clerk_user("user_link_cache")
    device = await users.get_or_create_device_user("device-cache-0001", None, LIMIT)
    assert (await tokens.get_cached_balance(account.id)).balance == 10
    assert (await tokens.get_cached_balance(device.id)).balance == 5
    await users.link_device(account.id, "device-cache-0001")
    assert (await tokens.get_cached_balance(account.id)).balance == 15
    assert (await tokens.get_cached_balance(device.id)).balance == 0


async def test_failed_generation_moved_in_by_linking_is_refunded(admin: asyncpg.Connection) -> None:
    """Regression: the refund of a generation spent on a device wallet and then
    moved into a Clerk account (whose total_spent is 0) was refused by the
    total_spent >= 0 CHECK, so the refund was lost."""
    from repositories import generations

    device = await users.get_or_create_device_user("device-refund-01", None, LIMIT)
    created = await generations.create_generation(device.id, "a cat", "hd", "key-1")
    clerk = await users.get_or_create_clerk_user("user_refund_after_link")
    moved = await users.link_device(clerk.id, "device-refund-01")
    assert moved.moved_tokens == 3

    failed = await generations.record_result(created.generation.id, "failed", None, "gpu lost")

    assert failed.status == "failed"
    assert await db.balance(admin, clerk.id) == 10 + 3 + 2
    assert [row["type"] for row in await db.ledger(admin, clerk.id)] == [
        "bonus",
        "transfer_in",
        "refund",
    ]
    assert await db.audit_problems(admin) == []


async def test_links_and_the_device_payments_notifications_at_once_never_deadlock(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    """Each of twenty devices is linked while YooKassa's word on its open
    payment is applied: both take the payment row and the device's wallet, in
    the same order, so they queue instead of deadlocking (a deadlock is
    retried, but it is a stall of a second and a failed attempt). Every
    payment is credited once, to the account."""
    pairs = []
    for n in range(20):
        account = await users.get_or_create_clerk_user(f"user_dl_{n}")
        device = await users.get_or_create_device_user(f"device-dl-{n:04}", None, LIMIT)
        pairs.append((account, device, await attached_payment(device.id)))
    with stats.collect() as counted:
        await side_by_side(
            (
                users.link_device(account.id, device.device_id or ""),
                payments.apply_provider_status(payment.provider_payment_id or "", "succeeded"),
            )
            for account, device, payment in pairs
        )

    # a deadlock is a failed attempt that sql() retries: none was needed
    assert counted.retries == 0
    for account, _, _ in pairs:
        assert await db.balance(admin, account.id) == 10 + 5 + 50
    assert await db.audit_problems(admin) == []


async def test_links_and_the_device_generations_failures_at_once_never_deadlock(
    admin: asyncpg.Connection, many_connections: None
) -> None:
    """Each of twenty devices is linked while the worker reports its
    generation failed: the result takes the generation, then the wallet it
    refunds; the link takes the device's generations before the wallets, so
    the two queue instead of deadlocking. Every refund lands once, wherever
    the generation is by then: the account ends with the device's 5 tokens."""
    from repositories import generations

    pairs = []
    for n in range(20):
        account = await users.get_or_create_clerk_user(f"user_gdl_{n}")
        device = await users.get_or_create_device_user(f"device-gdl-{n:04}", None, LIMIT)
        created = await generations.create_generation(device.id, "a fox", "standard", f"gdl-{n}")
        pairs.append((account, device, created.generation.id))
    await generations.claim_generations(20, 60, uuid.uuid4())
    with stats.collect() as counted:
        await side_by_side(
            (
                users.link_device(account.id, device.device_id or ""),
                generations.record_result(generation_id, "failed", None, "gpu lost"),
            )
            for account, device, generation_id in pairs
        )

    assert counted.retries == 0
    for account, device, _ in pairs:
        assert await db.balance(admin, account.id) == 10 + 5
        assert await db.balance(admin, device.id) == 0
    assert await admin.fetchval("select count(*) from token_transactions where type = 'refund'") == 20
    assert await db.audit_problems(admin) == []
