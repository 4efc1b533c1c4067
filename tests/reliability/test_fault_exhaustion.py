"""Connection exhaustion: a server with few connection slots (the dedicated
server, max_connections = 20) held busy by other clients while spends,
purchases, webhooks and the worker run over real HTTP.

With every slot taken the app cannot connect (TooManyConnectionsError,
transient: after its retries a DatabaseUnavailable): requests are answered
503 with Retry-After, quickly, and write nothing. With a few slots free some
requests get through and the rest are 503. Once the slots are given back the
same pool recovers by itself and every client's repeat is applied once."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import pytest

from database import pool
from tests.reliability.conftest import Dedicated, Served
from tests.reliability.traffic import (
    Client,
    MoneyTraffic,
    check_books,
    fake_delivery_problems,
    traffic_under_way,
)

ALL_BUSY_SECONDS = 1.5
FEW_FREE_SECONDS = 1.5
FEW_FREE_SLOTS = 3

STORED_UNDER_KEY = "select count(*) from generations where idempotency_key = $1"
APP_BACKENDS = "select count(*) from pg_stat_activity where application_name = 'dreamlens'"
# every client backend but this admin's and the hogs' ($1) is the app's,
# whatever its application_name says: a backend still starting up has none yet
TERMINATE_APP_BACKENDS = """
select count(pg_terminate_backend(pid))
  from pg_stat_activity
 where backend_type = 'client backend'
   and pid <> pg_backend_pid()
   and pid <> all($1::int[])
"""


# every slot is held, and none by the app: then it cannot connect until a
# hog lets go (the hogs are the superuser, so the reserved slots are theirs too)
SLOTS = """
select count(*) >= current_setting('max_connections')::int as full,
       count(*) filter (where pid <> pg_backend_pid() and pid <> all($1::int[])) as app
  from pg_stat_activity
 where backend_type = 'client backend'
"""
SETTLE_SECONDS = 0.05


async def take_every_slot(url: str, admin: asyncpg.Connection) -> list[asyncpg.Connection]:
    """Connections holding every slot the app's pool had or could get: its
    backends are terminated and their slots taken until every slot is held
    and none by the app. A terminated backend frees its slot only once it
    has exited, which may be after it left pg_stat_activity: the rounds go
    on until that slot is taken too, however long the machine takes. The app
    is told from the hogs by pid: a backend of the app's still starting up
    shows no application_name yet, and once counted as a hog it got through."""
    hogs: list[asyncpg.Connection] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await admin.fetchval(TERMINATE_APP_BACKENDS, [hog.get_server_pid() for hog in hogs])
        try:
            while True:
                hogs.append(await asyncpg.connect(url))
        except (asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError):
            pass
        slots = await admin.fetchrow(SLOTS, [hog.get_server_pid() for hog in hogs])
        if slots["full"] and slots["app"] == 0:
            return hogs
        await asyncio.sleep(SETTLE_SECONDS)
    raise AssertionError("the app kept its connections")


async def close_all(connections: list[asyncpg.Connection]) -> None:
    await asyncio.gather(*(connection.close() for connection in connections))


@pytest.mark.slow
async def test_exhausted_connections_answer_503_and_recover_without_restart(
    served: Served, http: httpx.AsyncClient, dedicated: Dedicated
) -> None:
    admin = dedicated.admin
    traffic = MoneyTraffic(http, served.fake)
    pools: list[object] = []
    probe: dict[str, float | int | str] = {}

    async def exhaustion() -> None:
        await traffic_under_way()
        pools.append(pool._pool)
        hogs = await take_every_slot(dedicated.url, admin)
        try:
            # every slot taken: a spend is refused at once, and writes nothing
            user = traffic.users[0]
            key = f"probe-{uuid.uuid4()}"
            started = time.perf_counter()
            refused = await Client(http, user.client.record).once(
                "POST /api/generations",
                "POST",
                "/api/generations",
                headers=user.headers(key),
                json={"prompt": "a probe", "quality": "standard"},
            )
            assert refused is not None
            probe.update(
                key=key,
                seconds=time.perf_counter() - started,
                status=refused.status_code,
                retry_after=refused.headers.get("retry-after", ""),
                error=refused.json().get("error", refused.text),
                stored=await admin.fetchval(STORED_UNDER_KEY, key),
            )
            await asyncio.sleep(ALL_BUSY_SECONDS)
            # a few slots free: some requests get through, the rest are 503
            await close_all(hogs[:FEW_FREE_SLOTS])
            del hogs[:FEW_FREE_SLOTS]
            await asyncio.sleep(FEW_FREE_SECONDS)
        finally:
            await close_all(hogs)
        pools.append(pool._pool)
        # the client that was refused repeats with the same key, once it can
        await user.spend(key=str(probe["key"]))

    await traffic.run(exhaustion)
    print(traffic.record.summary("connection exhaustion"))  # noqa: T201 - pytest -s shows it

    assert traffic.record.problems == []
    assert fake_delivery_problems(served.fake) == []
    assert await check_books(admin, traffic.books) == []
    assert (probe["status"], probe["error"], probe["stored"]) == (503, "unavailable", 0)
    assert int(probe["retry_after"]) >= 1
    assert float(probe["seconds"]) < 5
    assert (traffic.users[0].handle, probe["key"]) in traffic.books.spends
    assert traffic.record.statuses()[503] > 1
    # recovered without a restart: the pool made before the exhaustion serves after it
    assert pools[0] is not None
    assert pools == [pools[0], pools[0]]
    assert pool._pool is pools[0]
