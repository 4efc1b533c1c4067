"""Tests of repositories/ against the real PostgreSQL of tests/conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from database import config, pool
from repositories.payments import (
    Payment,
    apply_provider_status,
    attach_provider_payment,
    create_pending_payment,
)


async def side_by_side(pairs: Iterable[tuple[Awaitable[Any], Awaitable[Any]]]) -> list[Any]:
    """Every pair's two calls at once, all pairs together, each pair started in
    the other order from the one before, so that both orders race."""
    steps = [
        step
        for n, (first, second) in enumerate(pairs)
        for step in ((first, second) if n % 2 else (second, first))
    ]
    return list(await asyncio.gather(*steps))


@asynccontextmanager
async def wide_pool(size: int) -> AsyncIterator[None]:
    """A pool of `size` connections, so concurrent calls really run side by side."""
    await pool.close_pool()
    config.configure(pool_max_size=size)
    try:
        yield
    finally:
        # the next test builds its own, default-sized pool
        await pool.close_pool()


async def attached_payment(
    user_id: UUID, package_id: str = "tokens_50", provider_id: str | None = None
) -> Payment:
    """A pending payment with its provider payment attached, as after POST /api/payments."""
    payment, _ = await create_pending_payment(user_id, package_id, f"key-{uuid4()}")
    provider_id = provider_id or f"pp-{uuid4()}"
    return await attach_provider_payment(payment.id, provider_id, f"https://yoomoney.test/{provider_id}")


async def paid_payment(user_id: UUID, package_id: str = "tokens_50") -> Payment:
    """A payment YooKassa reported succeeded: its tokens credited, its plan granted."""
    payment = await attached_payment(user_id, package_id)
    assert payment.provider_payment_id is not None
    result = await apply_provider_status(payment.provider_payment_id, "succeeded")
    assert result.changed and result.payment is not None
    return result.payment


async def until_waiting_on_a_lock(admin: asyncpg.Connection, count: int = 1) -> None:
    """Until `count` of the app's backends wait on a lock the test holds."""
    waiting = (
        "select count(*) from pg_stat_activity"
        " where application_name = 'dreamlens' and wait_event_type = 'Lock'"
    )
    async with asyncio.timeout(30):
        while await admin.fetchval(waiting) < count:
            # inside a transaction the activity view is read once and kept
            await admin.execute("select pg_stat_clear_snapshot()")
            await asyncio.sleep(0.01)


async def days_pass(admin: asyncpg.Connection, user_id: UUID, days: int) -> None:
    """The user's plan time as it will be `days` from now: every period and
    every grant moved that far into the past."""
    await admin.execute(
        "update subscriptions"
        "   set current_period_start = current_period_start - make_interval(days => $2),"
        "       current_period_end = current_period_end - make_interval(days => $2)"
        " where user_id = $1;",
        user_id,
        days,
    )
    await admin.execute(
        "update plan_grants g set starts_at = g.starts_at - make_interval(days => $2),"
        "                         ends_at = g.ends_at - make_interval(days => $2)"
        "  from payments p where p.id = g.payment_id and p.user_id = $1",
        user_id,
        days,
    )
