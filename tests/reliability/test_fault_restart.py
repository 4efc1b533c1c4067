"""Database restart under load: while spends, purchases, webhooks and the
worker run over real HTTP, the app's PostgreSQL is stopped fast (every
backend terminated, in-flight transactions rolled back) and started again,
then killed outright (`-m immediate`, as in a crash: the start recovers
from WAL) and started again. Every request ends as a success or a 503 with
Retry-After, clients repeating with the same Idempotency-Key get exactly
one application, the ledger holds every success exactly once, and the
app's pool recovers by itself: the same pool serves before and after, no
restart of the app."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from database import pool
from tests.reliability.conftest import Dedicated, Served
from tests.reliability.traffic import MoneyTraffic, check_books, fake_delivery_problems, traffic_under_way

# a clean fast shutdown, then a crash
STOP_MODES = ("fast", "immediate")
DOWN_SECONDS = 1.0
UP_SECONDS = 1.0


@pytest.mark.slow
async def test_a_database_restart_under_load_loses_nothing_and_applies_nothing_twice(
    served: Served, http: httpx.AsyncClient, dedicated: Dedicated
) -> None:
    pools = []

    async def restarts() -> None:
        await traffic_under_way()
        for mode in STOP_MODES:
            pools.append(pool._pool)
            await dedicated.postgres.stop(mode)
            await asyncio.sleep(DOWN_SECONDS)
            await dedicated.postgres.start()
            await asyncio.sleep(UP_SECONDS)

    traffic = await MoneyTraffic(http, served.fake).run(restarts)
    print(traffic.record.summary("database restarts"))  # noqa: T201 - pytest -s shows it

    assert traffic.record.problems == []
    assert fake_delivery_problems(served.fake) == []
    admin = await dedicated.reconnect()
    assert await check_books(admin, traffic.books) == []
    # the restarts did hit, and the pool made before them served after them
    assert traffic.record.statuses()[503] > 0
    assert pools[0] is not None
    assert all(made is pools[0] for made in pools)
    assert pool._pool is pools[0]
    assert len(traffic.books.credits) >= len(traffic.users)
