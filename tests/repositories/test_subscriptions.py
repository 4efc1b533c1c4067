"""repositories/subscriptions.py: the plan a user is on, starting and
extending plans, and the expiry job."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import asyncpg
import pytest

from database import InvalidRequest, NotFound, RateLimited, stats
from repositories import generations, subscriptions
from tests import db

DAY = timedelta(days=1)


async def db_now(admin: asyncpg.Connection) -> datetime:
    now: datetime = await admin.fetchval("select now()")
    return now


async def test_a_user_without_a_subscription_is_on_the_free_plan(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_free")
    with stats.collect() as counted:
        subscription = await subscriptions.get_subscription(user_id)
    assert counted.statements == 1
    assert subscription == subscriptions.Subscription(
        plan="free", status="none", current_period_end=None, daily_generation_limit=20, used_today=0
    )


async def test_used_today_counts_only_todays_generations(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_used")
    await generations.create_generation(user_id, "a cat", "standard", "k1")
    await generations.create_generation(user_id, "a dog", "standard", "k2")
    assert (await subscriptions.get_subscription(user_id)).used_today == 2

    tomorrow = await db_now(admin) + DAY
    assert (await subscriptions.get_subscription(user_id, now=tomorrow)).used_today == 0
    assert await db.audit_problems(admin) == []


async def test_unknown_user_is_not_found() -> None:
    with pytest.raises(NotFound):
        await subscriptions.get_subscription(uuid.uuid4())
    with pytest.raises(NotFound):
        await subscriptions.activate_plan(uuid.uuid4(), "pro", 30)


async def test_activate_then_extend_adds_to_the_end(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_extend")
    before = await db_now(admin)

    started = await subscriptions.activate_plan(user_id, "pro", 30)
    assert (started.plan, started.status, started.daily_generation_limit) == ("pro", "active", 200)
    assert started.current_period_end is not None
    assert timedelta(days=30) <= started.current_period_end - before < timedelta(days=30, minutes=1)

    extended = await subscriptions.activate_plan(user_id, "pro", 30)
    assert extended.current_period_end == started.current_period_end + timedelta(days=30)
    assert await subscriptions.get_subscription(user_id) == extended
    assert await admin.fetchval("select count(*) from subscriptions") == 1


# a day of pro is worth this much of a day of premium (the seeded prices:
# pro_month 499.00 and premium_month 1499.00 RUB for 30 days each)
PRO_IN_PREMIUM = 49900 / 149900


async def test_buying_a_higher_plan_switches_now_and_converts_the_time_left(
    admin: asyncpg.Connection,
) -> None:
    """Pro's time left becomes premium time at its worth: months of cheap pro
    bought first do not all become premium with one premium purchase."""
    user_id = await db.insert_user(admin, clerk_id="user_switch_up")
    pro = await subscriptions.activate_plan(user_id, "pro", 30)
    assert pro.current_period_end is not None
    before = await db_now(admin)
    premium = await subscriptions.activate_plan(user_id, "premium", 30)
    after = await db_now(admin)
    assert (premium.plan, premium.daily_generation_limit) == ("premium", 1000)
    assert premium.current_period_end is not None
    lowest = after + 30 * DAY + (pro.current_period_end - after) * PRO_IN_PREMIUM
    highest = before + 30 * DAY + (pro.current_period_end - before) * PRO_IN_PREMIUM
    assert lowest - timedelta(seconds=1) <= premium.current_period_end <= highest + timedelta(seconds=1)
    assert await admin.fetchval("select count(*) from subscriptions where status = 'active'") == 1


async def test_buying_a_lower_plan_keeps_the_higher_and_adds_its_worth(admin: asyncpg.Connection) -> None:
    """A premium user buying pro keeps premium (no premium day is cut down to
    pro) and gains the pro month's worth of premium days."""
    user_id = await db.insert_user(admin, clerk_id="user_switch_down")
    premium = await subscriptions.activate_plan(user_id, "premium", 30)
    assert premium.current_period_end is not None
    kept = await subscriptions.activate_plan(user_id, "pro", 30)
    assert (kept.plan, kept.daily_generation_limit) == ("premium", 1000)
    assert kept.current_period_end is not None
    gained = kept.current_period_end - premium.current_period_end
    assert abs(gained - 30 * DAY * PRO_IN_PREMIUM) < timedelta(seconds=1)


async def test_time_on_a_plan_without_a_price_is_added_day_for_day(admin: asyncpg.Connection) -> None:
    """A plan no package sells (set up by hand) has no price to convert by."""
    await admin.execute("insert into plans (id, name, daily_generation_limit) values ('team', 'Team', 5000)")
    user_id = await db.insert_user(admin, clerk_id="user_switch_team")
    pro = await subscriptions.activate_plan(user_id, "pro", 30)
    assert pro.current_period_end is not None
    team = await subscriptions.activate_plan(user_id, "team", 10)
    assert team.plan == "team"
    assert team.current_period_end is not None
    assert abs(team.current_period_end - (pro.current_period_end + 10 * DAY)) < timedelta(seconds=1)


async def test_an_ended_period_counts_as_free_and_a_new_purchase_starts_from_now(
    admin: asyncpg.Connection,
) -> None:
    """An active row whose period ended before the expiry job ran is free; a
    purchase then runs from now, not from the old end."""
    user_id = await db.insert_user(admin, clerk_id="user_lapsed")
    await admin.execute(
        "insert into subscriptions (user_id, plan, status, current_period_start, current_period_end)"
        " values ($1, 'pro', 'active', now() - interval '40 days', now() - interval '10 days')",
        user_id,
    )
    assert (await subscriptions.get_subscription(user_id)).plan == "free"

    before = await db_now(admin)
    renewed = await subscriptions.activate_plan(user_id, "pro", 30)
    assert renewed.current_period_end is not None
    assert timedelta(days=30) <= renewed.current_period_end - before < timedelta(days=30, minutes=1)
    start = await admin.fetchval("select current_period_start from subscriptions")
    assert start >= before


async def test_activate_refuses_unknown_plans_and_non_positive_days(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_bad_plan")
    with pytest.raises(InvalidRequest):
        await subscriptions.activate_plan(user_id, "platinum", 30)
    with pytest.raises(InvalidRequest):
        await subscriptions.activate_plan(user_id, "pro", 0)
    assert await admin.fetchval("select count(*) from subscriptions") == 0


async def test_expire_ended_expires_only_ended_periods(admin: asyncpg.Connection) -> None:
    short = await db.insert_user(admin, clerk_id="user_short")
    long = await db.insert_user(admin, clerk_id="user_long")
    await subscriptions.activate_plan(short, "pro", 5)
    await subscriptions.activate_plan(long, "premium", 30)
    in_ten_days = await db_now(admin) + timedelta(days=10)

    assert await subscriptions.expire_ended() == 0
    assert await subscriptions.expire_ended(now=in_ten_days) == 1
    assert await subscriptions.expire_ended(now=in_ten_days) == 0

    statuses = dict(await admin.fetch("select user_id, status from subscriptions"))
    assert statuses == {short: "expired", long: "active"}
    assert (await subscriptions.get_subscription(short)).plan == "free"
    assert (await subscriptions.get_subscription(long, now=in_ten_days)).plan == "premium"
    # after expiry a new purchase starts a new row; the expired one stays as history
    await subscriptions.activate_plan(short, "pro", 30)
    assert await admin.fetchval("select count(*) from subscriptions where user_id = $1", short) == 2


async def test_the_daily_limit_follows_the_plan(admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, clerk_id="user_plan_limit")
    await admin.execute("update plans set daily_generation_limit = 1 where id = 'free'")
    await admin.execute("update plans set daily_generation_limit = 2 where id = 'pro'")

    await generations.create_generation(user_id, "one", "standard", "k1")
    with pytest.raises(RateLimited):
        await generations.create_generation(user_id, "two", "standard", "k2")

    upgraded = await subscriptions.activate_plan(user_id, "pro", 30)
    assert (upgraded.daily_generation_limit, upgraded.used_today) == (2, 1)
    await generations.create_generation(user_id, "two", "standard", "k2")
    with pytest.raises(RateLimited):
        await generations.create_generation(user_id, "three", "standard", "k3")

    in_a_year = await db_now(admin) + timedelta(days=365)
    assert (await subscriptions.get_subscription(user_id, now=in_a_year)).daily_generation_limit == 1
    assert await db.audit_problems(admin) == []


async def test_activate_plan_sql_can_be_embedded_in_a_cte(admin: asyncpg.Connection) -> None:
    """The payments repository embeds ACTIVATE_PLAN in its keyed CTE."""
    user_id = await db.insert_user(admin, clerk_id="user_embedded")
    row = await admin.fetchrow(
        "with activated as (" + subscriptions.ACTIVATE_PLAN + ") select plan, status from activated",
        user_id,
        "premium",
        30,
    )
    assert tuple(row) == ("premium", "active")


async def test_plans_come_from_the_table(admin: asyncpg.Connection) -> None:
    await admin.execute("update plans set daily_generation_limit = 25 where id = 'free'")
    plans = {plan.id: plan.daily_generation_limit for plan in await subscriptions.list_plans()}
    assert plans == {"free": 25, "pro": 200, "premium": 1000}
