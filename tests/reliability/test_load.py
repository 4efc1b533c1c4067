"""A bounded load test of the whole API over real HTTP (uvicorn in-process,
httpx clients): 200 users at once, 150 devices and 50 Clerk users, each
reading its account, balance, ledger pages and generations, spending (with
repeated and concurrent duplicate Idempotency-Keys), and buying packages
that the fake YooKassa delivers to the webhook; two workers claim the queue
and report results (a quarter of them failures, refunded). The users come
from 50 loopback addresses (127.0.0.10-59, four behind each, as behind a
carrier's NAT), YooKassa's deliveries from 127.0.0.1, the webhook's trusted
network. (New devices from one address sign up one at a time, each waiting
on the address's signup lock with a pool connection held: with ten behind
each of 20 addresses the first seconds were the pool's queue, p99 ~5 s.)

It stops by itself after MAX_REQUESTS requests or MAX_SECONDS seconds,
whichever comes first. Then: zero 5xx, every answer one the endpoint
documents, and the ledger holds exactly what the clients were told (nothing
lost, nothing twice, both audits clean). Throughput and p50/p99 latency are
printed (pytest -s) and logged on `dreamlens.reliability`, with the count of
the fake YooKassa's deliveries it stopped waiting for (after 10 s, when the
machine is loaded): those are delivered again, and the books must show them
applied once.

Everything (server, clients, fake) shares one event loop on a 2-core
machine: the numbers describe this test's machine, not production, and are
reported, never asserted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tests.functions.callers import clerk, use_clerk
from tests.reliability.conftest import KEEPALIVE_SECONDS, Served
from tests.reliability.traffic import (
    Books,
    Client,
    Record,
    User,
    Worker,
    check_books,
    fake_delivery_problems,
    guarded,
    run_until,
)

DEVICE_USERS = 150
CLERK_USERS = 50
ADDRESSES = 50
MAX_REQUESTS = 4000
MAX_SECONDS = 30.0
WORKERS = 2
RAMP_UP_SECONDS = 5.0
# a request unanswered this long is a hang; slower answers are latency, which
# on a loaded 2-core machine (server, clients, fake and PostgreSQL sharing it)
# reaches seconds while the first devices sign up
CLIENT_TIMEOUT_SECONDS = 60.0
# between two steps a user reads the screen
THINK_SECONDS = (0.5, 2.5)
PACKAGES = ("tokens_50", "tokens_50", "tokens_200", "pro_month")

log = logging.getLogger("dreamlens.reliability")  # at INFO: tests/reliability/traffic.py


class Load:
    """The bound: a user takes no new step once either limit is reached."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.ends = time.perf_counter() + MAX_SECONDS

    def over(self) -> bool:
        return len(self.record.exchanges) >= MAX_REQUESTS or time.perf_counter() >= self.ends


async def duplicate_spends(user: User, rng: random.Random) -> None:
    """The same new key sent twice at once (a double tap): one generation."""
    key = f"gen-{uuid.uuid4()}"
    quality = rng.choice(("standard", "hd"))
    first, second = await asyncio.gather(
        user.spend(quality, key=key, declinable=True), user.spend(quality, key=key, declinable=True)
    )
    if first != second:
        user.client.record.problems.append(
            f"{user.handle} key {key}: concurrent answers {first} and {second}"
        )


async def browse(user: User, load: Load, seed: int) -> None:
    rng = random.Random(seed)
    # users arrive over the first seconds, not all in the same millisecond
    await asyncio.sleep(rng.uniform(0, RAMP_UP_SECONDS))
    await user.sign_in()
    if rng.random() < 0.5:
        await user.buy(rng.choice(PACKAGES))
    while not load.over():
        step = rng.random()
        if step < 0.30:
            await user.spend(rng.choice(("standard", "standard", "hd")), declinable=True)
        elif step < 0.40:
            await user.repeat_spend()
        elif step < 0.45:
            await duplicate_spends(user, rng)
        elif step < 0.55:
            await user.buy(rng.choice(PACKAGES))
        elif step < 0.70:
            await user.client.call("GET /api/tokens", "GET", "/api/tokens", headers=user.headers())
        elif step < 0.80:
            await user.client.call("GET /api/user", "GET", "/api/user", headers=user.headers())
        else:
            await user.read_around()
        await asyncio.sleep(rng.uniform(*THINK_SECONDS))


@pytest.fixture
async def addresses(served: Served) -> AsyncIterator[list[httpx.AsyncClient]]:
    """A client per source address, each wide enough for its users."""
    limits = httpx.Limits(
        max_connections=50, max_keepalive_connections=50, keepalive_expiry=KEEPALIVE_SECONDS
    )
    clients = [
        httpx.AsyncClient(
            base_url=served.base_url,
            timeout=CLIENT_TIMEOUT_SECONDS,
            transport=httpx.AsyncHTTPTransport(local_address=f"127.0.0.{10 + n}", limits=limits),
        )
        for n in range(ADDRESSES)
    ]
    try:
        yield clients
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


@pytest.fixture
async def provider_http(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    """YooKassa's redeliveries, from 127.0.0.1."""
    limits = httpx.Limits(max_connections=200, keepalive_expiry=KEEPALIVE_SECONDS)
    async with httpx.AsyncClient(
        base_url=served.base_url, timeout=CLIENT_TIMEOUT_SECONDS, limits=limits
    ) as client:
        yield client


@pytest.mark.slow
async def test_mixed_traffic_from_200_users_has_no_5xx_and_loses_nothing(
    served: Served,
    provider_http: httpx.AsyncClient,
    addresses: list[httpx.AsyncClient],
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # only YooKassa (the fake, and the test redelivering for it) calls from 127.0.0.1
    monkeypatch.setenv("YOOKASSA_TRUSTED_NETWORKS", "127.0.0.1/32")
    use_clerk(monkeypatch)  # resets the settings read so far
    record, books = Record(), Books()
    load = Load(record)
    run = uuid.uuid4().hex[:8]
    yookassa = Client(provider_http, record)

    def user(number: int, handle: str, kind: str, auth: dict[str, str]) -> User:
        client = Client(addresses[number % ADDRESSES], record)
        return User(handle, kind, auth, client, books, served.fake, provider=yookassa)

    users = [
        user(n, f"load-{run}-{n:04d}", "device", {"X-Device-Id": f"load-{run}-{n:04d}"})
        for n in range(DEVICE_USERS)
    ]
    users += [
        user(n, f"user_load{run}{n:04d}", "clerk", clerk(f"user_load{run}{n:04d}"))
        for n in range(CLERK_USERS)
    ]
    users_done = asyncio.Event()

    async def everyone() -> None:
        try:
            await asyncio.gather(*(guarded(browse(u, load, seed)) for seed, u in enumerate(users)))
        finally:
            users_done.set()

    workers = [Worker(Client(provider_http, record), books) for _ in range(WORKERS)]
    await run_until(
        [everyone, *(lambda w=w: w.run(users_done, idle_pause=0.1) for w in workers)],
        record,
        MAX_SECONDS + 60,
    )
    deliveries = served.fake.deliveries
    unanswered = sum(d.status_code is None for d in deliveries)
    summary = record.summary(f"load: {len(users)} users")
    summary += f"\n  YooKassa's deliveries: {len(deliveries)}, unanswered within its 10 s: {unanswered}"
    print(summary)  # noqa: T201 - pytest -s shows it
    log.info("%s", summary)

    assert record.problems == []
    assert [status for status in record.statuses() if status is None or status >= 500] == []
    assert fake_delivery_problems(served.fake, unanswered_allowed=True) == []
    assert await check_books(admin, books) == []
    # the load was what it claims to be
    assert len(books.users) == DEVICE_USERS + CLERK_USERS
    assert len(books.spends) > 200
    assert len(books.credits) > 50
    assert "failed" in books.results.values()
