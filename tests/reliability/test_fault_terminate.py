"""Backends killed mid-transaction: while spends, purchases, webhooks and the
worker run over real HTTP, every app connection is terminated
(`pg_terminate_backend`, as an operator or a failover would) every few
milliseconds. Every request ends as a success or a 503 with Retry-After,
clients repeating with the same Idempotency-Key get exactly one
application, and the ledger holds every success exactly once."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import httpx
import pytest

from tests.reliability.conftest import Served
from tests.reliability.traffic import MoneyTraffic, check_books, fake_delivery_problems

STORM_SECONDS = 4.0

TERMINATE_APP_BACKENDS = """
select count(*) filter (where terminated)
  from (select pg_terminate_backend(pid) as terminated
          from pg_stat_activity
         where application_name = 'dreamlens'
           and pid <> pg_backend_pid()) killed
"""


@pytest.mark.slow
async def test_backends_killed_repeatedly_lose_nothing_and_apply_nothing_twice(
    served: Served, http: httpx.AsyncClient, admin: asyncpg.Connection, direct_url: str
) -> None:
    killed = 0

    async def storm() -> None:
        nonlocal killed
        killer = await asyncpg.connect(direct_url)
        try:
            await asyncio.sleep(0.3)  # the traffic gets going first
            ends = asyncio.get_running_loop().time() + STORM_SECONDS
            while asyncio.get_running_loop().time() < ends:
                killed += await killer.fetchval(TERMINATE_APP_BACKENDS)
                await asyncio.sleep(random.uniform(0.002, 0.02))
        finally:
            await killer.close()

    traffic = await MoneyTraffic(http, served.fake).run(storm)
    print(traffic.record.summary("terminated backends"))  # noqa: T201 - pytest -s shows it

    assert traffic.record.problems == []
    assert fake_delivery_problems(served.fake) == []
    assert await check_books(admin, traffic.books) == []
    # the storm did hit: connections died and requests were answered 503
    assert killed > 0
    assert traffic.record.statuses()[503] > 0
    assert len(traffic.books.spends) > 0
    assert len(traffic.books.credits) >= len(traffic.users)
