"""Migration 0007's record of the plan months credited before it.

Each test builds a history with today's code, moving days into the past as
it goes, takes away what 0007 adds (the database as older code left it),
applies 0007 again, and checks what a full refund of each month then takes
back: the time that month still has on the plan, no more and no less.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import pytest

from database import init_database, sql
from database import migrations as migrations_module
from repositories.payments import Payment
from tests import db

BEFORE_0007 = (
    "drop table plan_grants; drop function plan_refund;"
    " alter table payment_refunds drop column plan_taken;"
    " delete from schema_migrations where version >= 7"
)


async def days_pass_before_0007(database_url: str, days: int) -> None:
    """Everything `days` further into the past, as if that many days passed:
    plans, grants, payments and links."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            for statement in (
                "update subscriptions set current_period_start = current_period_start - {days},"
                "                         current_period_end = current_period_end - {days}",
                "update plan_grants set starts_at = starts_at - {days}, ends_at = ends_at - {days}",
                "update payments set created_at = created_at - {days}, paid_at = paid_at - {days},"
                "                    updated_at = updated_at - {days}",
                "update users set created_at = created_at - {days}, linked_at = linked_at - {days}",
                "update payment_refunds set created_at = created_at - {days}",
            ):
                await connection.execute(statement.format(days="make_interval(days => $1)"), days)
    finally:
        await connection.close()


async def link_as_older_code(account_id: uuid.UUID, device_id: str) -> None:
    """A link as older code made it: today's, then what it did besides,
    clearing the idempotency keys of the payments and generations it moved
    (0007 tells a device's month of a package without tokens by that)."""
    from repositories.users import link_device

    device_user = await sql.fetchval("select id from users where device_id = $1", device_id)
    await link_device(account_id, device_id)
    for table in ("payments", "generations"):
        await sql.execute(
            f"update {table} set idempotency_key = null"
            "  where user_id = $1 and updated_at = (select linked_at from users where id = $2)",
            account_id,
            device_user,
        )


async def migrate_to_0007(database_url: str) -> None:
    """The database as older code left it, then 0007 applied to it."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(BEFORE_0007)
    finally:
        await connection.close()
    migrations_module.forget_initialized()
    await init_database()


async def refunded_by_older_code(database_url: str, payment: Payment, amount: int) -> None:
    """A refund as code before 0007 applied it to the plan: the refunded
    share of the payment's period off the end of its payer's plan, whether
    or not the payment's time had been used."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute(
                "insert into payment_refunds"
                "       (provider_refund_id, payment_id, amount, tokens_taken, tokens_short)"
                " values ($1, $2, $3, 0, 0)",
                f"rf-older-{uuid.uuid4()}",
                payment.id,
                amount,
            )
            await connection.execute(
                "update subscriptions s"
                "   set current_period_end = s.current_period_end"
                "       - plan_time_in(p.plan, s.plan,"
                "                      make_interval(days => p.period_days) * $2::float8 / p.amount)"
                "  from payments p"
                " where p.id = $1 and s.user_id = p.user_id and s.status = 'active'",
                payment.id,
                amount,
            )
            await connection.execute(
                "update payments set refunded_amount = refunded_amount + $2 where id = $1", payment.id, amount
            )
    finally:
        await connection.close()


async def plan_days_left(user_id: uuid.UUID) -> float:
    left = await sql.fetchval(
        "select current_period_end - now() from subscriptions where user_id = $1 and status = 'active'",
        user_id,
    )
    return float(left.total_seconds()) / 86400


async def refund_takes(payment: Payment, refund_id: str, amount: int) -> float:
    """The days of plan time a refund of `payment` took back."""
    from repositories.payments import apply_refund

    assert (await apply_refund(payment.provider_payment_id or "", refund_id, amount)).changed
    taken = await sql.fetchval(
        "select plan_taken from payment_refunds where provider_refund_id = $1", refund_id
    )
    return float(taken.total_seconds()) / 86400


async def test_0007_records_the_months_of_running_plans_credited_before_it(fresh_database: str) -> None:
    """Three pro months credited before 0007, 35 days ago, the third half
    refunded: 75 days, 40 left. 0007 hands them out from the plan's end
    backwards, so the first month has run out and its chargeback takes
    nothing, the third's other half takes its 15 days, the second's the 25
    days left of it, and the plan ends."""
    from repositories.payments import apply_refund
    from tests.repositories import paid_payment

    await init_database()
    user_id = await sql.fetchval("insert into users (clerk_id) values ('user_before_0007') returning id")
    first, second, third = [await paid_payment(user_id, "pro_month") for _ in range(3)]
    assert (await apply_refund(third.provider_payment_id or "", "rf-0007-half", 24950)).changed
    await days_pass_before_0007(fresh_database, 35)
    await migrate_to_0007(fresh_database)
    assert await sql.fetchval("select count(*) from plan_grants") == 3

    assert await refund_takes(first, "rf-0007-first", 49900) == 0
    assert abs(await refund_takes(third, "rf-0007-third", 24950) - 15) < 0.001
    assert abs(await refund_takes(second, "rf-0007-second", 49900) - 25) < 0.001
    status = await sql.fetchval("select status from subscriptions where user_id = $1", user_id)
    assert status == "canceled"


async def test_0007_puts_a_linked_device_month_where_the_link_put_it(fresh_database: str) -> None:
    """A device buys two pro months at once and uses 40 days of them; then
    the account buys pro and links the device: the account's 30 days, then
    the device's 20. Five days on, 0007 runs. The account month has 25 days
    left, the device's second month 20 and its first none, though the
    device's were paid earlier."""
    from repositories.users import get_or_create_clerk_user, get_or_create_device_user
    from tests.repositories import paid_payment

    await init_database()
    account = await get_or_create_clerk_user("user_linking_before_0007")
    device = await get_or_create_device_user("device-linked-before-0007", None, 5)
    device_first, device_second = [await paid_payment(device.id, "pro_month") for _ in range(2)]
    await days_pass_before_0007(fresh_database, 40)
    account_month = await paid_payment(account.id, "pro_month")
    await link_as_older_code(account.id, "device-linked-before-0007")
    await days_pass_before_0007(fresh_database, 5)
    await migrate_to_0007(fresh_database)

    assert abs(await refund_takes(account_month, "rf-0007-account", 49900) - 25) < 0.001
    assert abs(await refund_takes(device_second, "rf-0007-device-second", 49900) - 20) < 0.001
    assert await refund_takes(device_first, "rf-0007-device-first", 49900) == 0
    status = await sql.fetchval("select status from subscriptions where user_id = $1", account.id)
    assert status == "canceled"
    connection = await asyncpg.connect(fresh_database)
    try:
        assert await db.audit_problems(connection) == []
    finally:
        await connection.close()


async def test_0007_gives_no_time_to_a_device_month_that_ran_out_before_its_link(
    fresh_database: str,
) -> None:
    """The account buys two pro months, the device one; 35 days on, with the
    device's plan run out, the device is linked, and 0007 runs. The device's
    month takes back nothing, the account's second month its 25 days."""
    from repositories.users import get_or_create_clerk_user, get_or_create_device_user
    from tests.repositories import paid_payment

    await init_database()
    account = await get_or_create_clerk_user("user_linking_late_before_0007")
    device = await get_or_create_device_user("device-ran-out-before-0007", None, 5)
    account_first, account_second = [await paid_payment(account.id, "pro_month") for _ in range(2)]
    device_month = await paid_payment(device.id, "pro_month")
    await days_pass_before_0007(fresh_database, 35)
    await link_as_older_code(account.id, "device-ran-out-before-0007")
    await migrate_to_0007(fresh_database)

    assert await refund_takes(device_month, "rf-0007-late-device", 49900) == 0
    assert abs(await refund_takes(account_second, "rf-0007-late-second", 49900) - 25) < 0.001
    assert await refund_takes(account_first, "rf-0007-late-first", 49900) == 0
    status = await sql.fetchval("select status from subscriptions where user_id = $1", account.id)
    assert status == "canceled"


async def test_0007_tells_a_device_month_of_a_package_without_tokens_by_its_cleared_key(
    fresh_database: str,
) -> None:
    """A plan package that grants no tokens leaves no ledger row to show
    which device paid: the link cleared the payment's idempotency key. The
    device's two months, bought 40 days before the link, brought 20 days
    after the account's month, which has 25 left."""
    from repositories.users import get_or_create_clerk_user, get_or_create_device_user
    from tests.repositories import paid_payment

    await init_database()
    await sql.execute(
        "insert into token_packages (id, kind, tokens, plan, period_days, amount, currency, description)"
        " values ('pro_only', 'plan', 0, 'pro', 30, 49900, 'RUB', 'Pro for 30 days')"
    )
    account = await get_or_create_clerk_user("user_linking_plain_before_0007")
    device = await get_or_create_device_user("device-plain-before-0007", None, 5)
    device_first, device_second = [await paid_payment(device.id, "pro_only") for _ in range(2)]
    await days_pass_before_0007(fresh_database, 40)
    account_month = await paid_payment(account.id, "pro_only")
    await link_as_older_code(account.id, "device-plain-before-0007")
    await days_pass_before_0007(fresh_database, 5)
    await migrate_to_0007(fresh_database)
    assert abs(await plan_days_left(account.id) - 45) < 0.001

    assert abs(await refund_takes(account_month, "rf-0007-plain-account", 49900) - 25) < 0.001
    assert abs(await refund_takes(device_second, "rf-0007-plain-second", 49900) - 20) < 0.001
    assert await refund_takes(device_first, "rf-0007-plain-first", 49900) == 0


async def test_0007_runs_a_devices_months_of_two_plans_in_the_plan_it_kept(fresh_database: str) -> None:
    """A device buys pro, then premium: its pro month becomes 30 * 499/1499
    premium days, the premium month follows. On day 19 the account buys
    premium; on day 20 the device is linked, with 19.987 days left, all of
    them the premium month's; 0007 runs on day 21."""
    from repositories.users import get_or_create_clerk_user, get_or_create_device_user
    from tests.repositories import paid_payment

    await init_database()
    account = await get_or_create_clerk_user("user_linking_two_plans_before_0007")
    device = await get_or_create_device_user("device-two-plans-before-0007", None, 5)
    device_pro = await paid_payment(device.id, "pro_month")
    device_premium = await paid_payment(device.id, "premium_month")
    await days_pass_before_0007(fresh_database, 19)
    account_month = await paid_payment(account.id, "premium_month")
    await days_pass_before_0007(fresh_database, 1)
    await link_as_older_code(account.id, "device-two-plans-before-0007")
    await days_pass_before_0007(fresh_database, 1)
    await migrate_to_0007(fresh_database)
    pro_as_premium = 30 * 499 / 1499

    assert await refund_takes(device_pro, "rf-0007-two-pro", 49900) == 0
    assert (
        abs(await refund_takes(device_premium, "rf-0007-two-premium", 149900) - (pro_as_premium + 10)) < 0.001
    )
    assert abs(await refund_takes(account_month, "rf-0007-two-account", 149900) - 28) < 0.001


async def test_0007_follows_an_older_refund_that_cut_the_plan_after_a_used_month(
    fresh_database: str,
) -> None:
    """A device's pro month A runs out (days 0..30); on day 40 it buys B
    (40..70). On day 45 older code refunds half of A, cutting 15 days off
    the plan's end (55), though A was used. On day 50 the account buys pro
    and the device is linked, bringing 5 days: B has those 5 left, the
    account's month 29 of its 30 when 0007 runs on day 51."""
    from repositories.users import get_or_create_clerk_user, get_or_create_device_user
    from tests.repositories import paid_payment

    await init_database()
    account = await get_or_create_clerk_user("user_linking_refunded_before_0007")
    device = await get_or_create_device_user("device-refunded-before-0007", None, 5)
    month_a = await paid_payment(device.id, "pro_month")
    await days_pass_before_0007(fresh_database, 40)
    month_b = await paid_payment(device.id, "pro_month")
    await days_pass_before_0007(fresh_database, 5)
    await refunded_by_older_code(fresh_database, month_a, 24950)
    await days_pass_before_0007(fresh_database, 5)
    account_month = await paid_payment(account.id, "pro_month")
    await link_as_older_code(account.id, "device-refunded-before-0007")
    await days_pass_before_0007(fresh_database, 1)
    await migrate_to_0007(fresh_database)
    assert abs(await plan_days_left(account.id) - 34) < 0.001

    assert await refund_takes(month_a, "rf-0007-refunded-a", 24950) == 0
    assert abs(await refund_takes(month_b, "rf-0007-refunded-b", 49900) - 5) < 0.001
    assert abs(await refund_takes(account_month, "rf-0007-refunded-account", 49900) - 29) < 0.001


async def test_0007_an_older_refund_of_a_running_month_takes_its_own_time_first(fresh_database: str) -> None:
    """The account buys pro months A and B (A 0..30, B 30..60). On day 10
    older code refunds A in full: 30 days off the plan's end, 20 left. Those
    20 days are B's (A's own 20 days went first, then 10 of B's): a full
    refund of B takes them and ends the plan, leaving no time with A, which
    is refunded and has no grant."""
    from tests.repositories import paid_payment

    await init_database()
    user_id = await sql.fetchval("insert into users (clerk_id) values ('review_refund_running') returning id")
    month_a = await paid_payment(user_id, "pro_month")
    month_b = await paid_payment(user_id, "pro_month")
    await days_pass_before_0007(fresh_database, 10)
    await refunded_by_older_code(fresh_database, month_a, 49900)
    await sql.execute("update payments set status = 'refunded' where id = $1", month_a.id)
    await days_pass_before_0007(fresh_database, 1)
    await migrate_to_0007(fresh_database)
    assert abs(await plan_days_left(user_id) - 19) < 0.001

    assert abs(await refund_takes(month_b, "rf-review-running-b", 49900) - 19) < 0.001


async def test_0007_an_older_half_refund_of_an_unused_month_leaves_the_next_month_whole(
    fresh_database: str,
) -> None:
    """A 0..30 and B 30..60, both pro; at once older code refunds half of A:
    the plan ends on day 45. A has 15 paid days, B all 30: a full refund of
    B takes 30 days, not the 15 that clipping B at the end would leave."""
    from tests.repositories import paid_payment

    await init_database()
    user_id = await sql.fetchval("insert into users (clerk_id) values ('review_half_refund') returning id")
    month_a = await paid_payment(user_id, "pro_month")
    month_b = await paid_payment(user_id, "pro_month")
    await refunded_by_older_code(fresh_database, month_a, 24950)
    await days_pass_before_0007(fresh_database, 1)
    await migrate_to_0007(fresh_database)
    assert abs(await plan_days_left(user_id) - 44) < 0.001

    assert abs(await refund_takes(month_b, "rf-review-half-b", 49900) - 30) < 0.001


async def test_0007_a_device_month_credited_while_its_link_waited_is_placed_after_the_accounts(
    fresh_database: str,
) -> None:
    """The account holds pro month A (0..30). A link of the device begins and
    waits for a device payment's row (a webhook about an older token
    purchase holds it); meanwhile the device buys pro month D, credited on
    the device's plan. The link then moves that plan: D lies 30..60 after A,
    but linked_at (the link's now()) is before D's paid_at. D's credit
    counts as before the link: once A is refunded, D's refund takes 30 days."""
    import asyncio

    import asyncpg

    from repositories.users import get_or_create_clerk_user, get_or_create_device_user
    from tests.repositories import paid_payment, until_waiting_on_a_lock

    await init_database()
    account = await get_or_create_clerk_user("review_link_race")
    device = await get_or_create_device_user("device-review-link-race", None, 5)
    older = await paid_payment(device.id, "tokens_50")
    month_a = await paid_payment(account.id, "pro_month")
    webhook = await asyncpg.connect(fresh_database)
    try:
        async with webhook.transaction():
            await webhook.execute("select id from payments where id = $1 for update", older.id)
            link = asyncio.ensure_future(link_as_older_code(account.id, "device-review-link-race"))
            await until_waiting_on_a_lock(webhook)
            month_d = await paid_payment(device.id, "pro_month")
        await link
    finally:
        await webhook.close()
    await days_pass_before_0007(fresh_database, 1)
    await migrate_to_0007(fresh_database)
    assert abs(await plan_days_left(account.id) - 59) < 0.01

    assert abs(await refund_takes(month_a, "rf-review-race-a", 49900) - 29) < 0.01
    assert abs(await refund_takes(month_d, "rf-review-race-d", 49900) - 30) < 0.01


async def test_0007_a_month_without_tokens_is_told_from_another_devices_linked_earlier(
    fresh_database: str,
) -> None:
    """A plan package with no tokens leaves no ledger row. Device 1 buys pro
    with tokens (Q), device 2 pro_only (P), the account pro (A), all on day
    0. Device 1 is linked on day 5 (Q's 25 days after A: 30..55), device 2 on
    day 10 (P's 20 days: 55..75); on day 12 the account buys B (75..105).
    P is device 2's (the link stamped it), not device 1's, the first linked
    after P was paid: B's full refund takes its 30 days."""
    from repositories.users import get_or_create_clerk_user, get_or_create_device_user
    from tests.repositories import paid_payment

    await init_database()
    await sql.execute(
        "insert into token_packages (id, kind, tokens, plan, period_days, amount, currency, description)"
        " values ('pro_only', 'plan', 0, 'pro', 30, 49900, 'RUB', 'Pro for 30 days')"
    )
    account = await get_or_create_clerk_user("review_two_devices_no_tokens")
    first = await get_or_create_device_user("device-review-first", None, 5)
    second = await get_or_create_device_user("device-review-second", None, 5)
    month_q = await paid_payment(first.id, "pro_month")
    month_p = await paid_payment(second.id, "pro_only")
    month_a = await paid_payment(account.id, "pro_month")
    await days_pass_before_0007(fresh_database, 5)
    await link_as_older_code(account.id, "device-review-first")
    await days_pass_before_0007(fresh_database, 5)
    await link_as_older_code(account.id, "device-review-second")
    await days_pass_before_0007(fresh_database, 2)
    month_b = await paid_payment(account.id, "pro_month")
    await days_pass_before_0007(fresh_database, 1)
    await migrate_to_0007(fresh_database)
    assert abs(await plan_days_left(account.id) - 92) < 0.001

    assert abs(await refund_takes(month_b, "rf-review-two-b", 49900) - 30) < 0.001
    assert abs(await refund_takes(month_p, "rf-review-two-p", 49900) - 20) < 0.001
    assert abs(await refund_takes(month_q, "rf-review-two-q", 49900) - 25) < 0.001
    assert abs(await refund_takes(month_a, "rf-review-two-a", 49900) - 17) < 0.001


async def test_0007_waits_for_no_link_that_holds_its_plan(fresh_database: str) -> None:
    """A link holds the account's plan (for update), then moves payments.
    0007 meanwhile holds payments and subscriptions against writers; had its
    backfill waited for the plan's row, the two would deadlock."""
    from repositories.users import get_or_create_clerk_user
    from tests.repositories import paid_payment

    await init_database()
    account = await get_or_create_clerk_user("user_linking_during_0007")
    await paid_payment(account.id, "pro_month")
    link = await asyncpg.connect(fresh_database)
    try:
        await link.execute(BEFORE_0007)
        migrations_module.forget_initialized()
        waiting = (
            "select count(*) from pg_stat_activity"
            " where application_name = 'dreamlens' and wait_event_type = 'Lock'"
        )
        async with link.transaction():
            await link.execute("select id from subscriptions where user_id = $1 for update", account.id)
            init = asyncio.ensure_future(init_database())
            async with asyncio.timeout(30):
                while not init.done() and await link.fetchval(waiting) < 1:
                    await link.execute("select pg_stat_clear_snapshot()")
                    await asyncio.sleep(0.01)
            await link.execute(
                "update payments set updated_at = now() where user_id = $1", account.id, timeout=20
            )
        await init
    finally:
        await link.close()
    assert await sql.fetchval("select count(*) from plan_grants") == 1


# What each month of a running plan has left, as the grants hold it.
MONTHS_LEFT = """
select g.payment_id, greatest(g.ends_at - greatest(g.starts_at, now()), interval '0') as time_left
  from plan_grants g
  join payments p on p.id = g.payment_id
  join subscriptions s on s.user_id = p.user_id and s.status = 'active' and s.current_period_end > now()
 where p.status = 'succeeded'
"""


async def months_left() -> dict[uuid.UUID, float]:
    return {r["payment_id"]: r["time_left"].total_seconds() / 86400 for r in await sql.fetch(MONTHS_LEFT)}


@pytest.mark.parametrize("seed", range(40))
async def test_0007_gives_every_month_what_todays_code_recorded_for_it(
    fresh_database: str, seed: int
) -> None:
    """Random purchases of both plans by accounts and their devices, days
    passing, links and expiries, all with today's code, which records every
    grant as it goes. 0007, applied to the same history without those
    records, must find for every month of a running plan the time today's
    code gave it. (Refunds are left out: older code took them off the plan's
    end, so the two histories part there; the tests above cover them.)"""
    from repositories.subscriptions import expire_ended
    from repositories.users import get_or_create_clerk_user, get_or_create_device_user
    from tests.repositories import paid_payment

    rng = random.Random(seed)
    await init_database()
    accounts = [(await get_or_create_clerk_user(f"user_history_{seed}_{n}")).id for n in range(12)]
    devices: dict[str, tuple[uuid.UUID, uuid.UUID]] = {}  # device id: (its user, its account)
    for n in range(20):
        device_id = f"device-history-{seed}-{n}"
        user = await get_or_create_device_user(device_id, None, 100)
        devices[device_id] = (user.id, rng.choice(accounts))
    log: list[str] = []
    for _ in range(80):
        step = rng.choice(["buy", "buy", "buy", "days", "link", "expire"])
        if step == "buy":
            buyer = rng.choice(accounts + [user for user, _ in devices.values()])
            package = rng.choice(["pro_month", "premium_month"])
            await paid_payment(buyer, package)
            log.append(f"{buyer} buys {package}")
        elif step == "days":
            days = rng.randint(1, 20)
            await days_pass_before_0007(fresh_database, days)
            log.append(f"{days} days pass")
        elif step == "link" and devices:
            device_id = rng.choice(sorted(devices))
            device_user, account = devices.pop(device_id)
            await link_as_older_code(account, device_id)
            log.append(f"{device_user} links into {account}")
        elif step == "expire":
            await expire_ended()
            log.append("expire")
    recorded = await months_left()
    await migrate_to_0007(fresh_database)
    found = await months_left()

    assert found.keys() == recorded.keys(), log
    wrong = {
        payment_id: (recorded[payment_id], found[payment_id])
        for payment_id in recorded
        if abs(recorded[payment_id] - found[payment_id]) > 0.001
    }
    assert wrong == {}, log
