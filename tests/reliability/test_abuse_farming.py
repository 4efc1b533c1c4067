"""Farming welcome bonuses: a flood of new anonymous devices from one source
address, and many devices linked into one Clerk account.

The flood runs as concurrent Lambda invocations (the handlers' Mangum event
translation awaited together on one loop, on a pool wide enough for all),
from one API Gateway source address: exactly ANON_SIGNUPS_PER_IP_PER_HOUR
devices are created, every other one is a 429 with Retry-After and writes
nothing. An IPv6 client that rotates its address through its /64 (every
device from a new privacy address) is held to the same limit, and leaves the
next /64 its own. Linking ten devices into one account, one by one and all
at once, moves the welcome bonus of the first device only: the account ends
with its own 10 + 5, and every later device keeps its 5 behind (anything it
holds beyond its bonus moves).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from database import config, pool
from functions import settings
from repositories import audit
from tests import db
from tests.functions.lambda_events import LambdaRuntime
from tests.reliability.abuse_support import (
    GATEWAY_SOURCE,
    abuse_runtime,  # noqa: F401 (an autouse fixture)
    bearer,
    call,
    call_at_once,
    signed,
    use_clerk,
)

FLOOD = 30
DEVICES = 10


@pytest.fixture
async def wide_pool(admin: asyncpg.Connection) -> AsyncIterator[None]:
    """Connections for every concurrent invocation; afterwards both audits."""
    await pool.close_pool()
    config.configure(pool_max_size=20)
    yield
    assert await audit.find_violations() == []
    assert await db.audit_problems(admin) == []
    await pool.close_pool()


async def test_a_concurrent_flood_of_new_devices_from_one_address_is_limited(
    wide_pool: None, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANON_SIGNUPS_PER_IP_PER_HOUR", raising=False)
    settings.reset()
    devices = [f"device_flood_{n:04d}" for n in range(FLOOD)]

    async def first_sight(device: str, version: str) -> Any:
        return await call_at_once(
            "user", "GET", "/api/user", version=version, headers={"X-Device-Id": device}
        )

    responses = await asyncio.gather(
        *(first_sight(device, "v1" if n % 2 else "v2") for n, device in enumerate(devices))
    )
    statuses = sorted(response.status for response in responses)
    assert statuses == [200] * settings.DEFAULT_ANON_SIGNUPS_PER_IP_PER_HOUR + [429] * (
        FLOOD - settings.DEFAULT_ANON_SIGNUPS_PER_IP_PER_HOUR
    )
    for response in responses:
        if response.status == 429:
            assert response.body["error"] == "rate_limited"
            assert 1 <= int(response.headers["retry-after"]) <= 3600
        else:
            assert response.body["balance"] == 5
    created = {response.body["device_id"] for response in responses if response.status == 200}
    rows = await admin.fetch("select device_id from users")
    assert {row["device_id"] for row in rows} == created
    signups = await admin.fetch("select host(source_ip) as ip from usage_logs where action = 'signup'")
    assert [row["ip"] for row in signups] == [GATEWAY_SOURCE] * len(created)
    bonuses = await admin.fetchval("select coalesce(sum(amount), 0) from token_transactions")
    assert bonuses == 5 * len(created)

    # a second wave: the created devices are known (200), the rest still refused
    again = await asyncio.gather(*(first_sight(device, "v2") for device in devices))
    assert sorted(r.body["device_id"] for r in again if r.status == 200) == sorted(created)
    assert sum(r.status == 429 for r in again) == FLOOD - len(created)
    assert await admin.fetchval("select count(*) from users") == len(created)


async def test_a_concurrent_flood_rotating_through_one_ipv6_64_is_limited(
    wide_pool: None, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANON_SIGNUPS_PER_IP_PER_HOUR", raising=False)
    settings.reset()
    limit = settings.DEFAULT_ANON_SIGNUPS_PER_IP_PER_HOUR
    # one client's /64; every device from a new privacy address inside it
    client = ipaddress.IPv6Network("2001:db8:4a11:7::/64")
    addresses = {f"device_rotate_{n:04d}": str(client[(n + 1) * 0x0123_4567_89AB]) for n in range(FLOOD)}

    async def first_sight(device: str, version: str) -> Any:
        return await call_at_once(
            "user",
            "GET",
            "/api/user",
            version=version,
            headers={"X-Device-Id": device},
            source_ip=addresses[device],
        )

    responses = await asyncio.gather(
        *(first_sight(device, "v1" if n % 2 else "v2") for n, device in enumerate(addresses))
    )
    assert sorted(response.status for response in responses) == [200] * limit + [429] * (FLOOD - limit)
    created = {response.body["device_id"] for response in responses if response.status == 200}
    rows = await admin.fetch("select device_id, host(signup_ip) as ip from users")
    # each user keeps the exact address it came from, not the network
    assert {row["device_id"]: row["ip"] for row in rows} == {device: addresses[device] for device in created}
    signups = await admin.fetchval("select count(*) from usage_logs where action = 'signup'")
    assert signups == len(created)
    bonuses = await admin.fetchval("select coalesce(sum(amount), 0) from token_transactions")
    assert bonuses == 5 * len(created)

    # the next /64 of the same /48 is another client
    neighbour = await call_at_once(
        "user",
        "GET",
        "/api/user",
        headers={"X-Device-Id": "device_neighbour_01"},
        source_ip="2001:db8:4a11:8::1",
    )
    assert (neighbour.status, neighbour.body["balance"]) == (200, 5)


async def test_one_new_device_seen_many_times_at_once_is_one_user_and_one_signup(
    wide_pool: None, admin: asyncpg.Connection
) -> None:
    responses = await asyncio.gather(
        *(
            call_at_once("user", "GET", "/api/user", headers={"X-Device-Id": "device_same_0001"})
            for _ in range(15)
        )
    )
    assert {response.status for response in responses} == {200}
    assert len({response.body["id"] for response in responses}) == 1
    assert await admin.fetchval("select count(*) from users") == 1
    assert await admin.fetchval("select count(*) from usage_logs where action = 'signup'") == 1
    assert await admin.fetchval("select sum(amount) from token_transactions") == 5


# ------------------------------------------------------------------ linking


async def devices_from_many_addresses(count: int) -> list[str]:
    """`count` anonymous devices, each first seen from its own address (so the
    signup limit is not what stops the farm)."""
    devices = [f"device_farm_{n:04d}" for n in range(count)]
    for n, device in enumerate(devices):
        response = await call(
            "user", "GET", "/api/user", headers={"X-Device-Id": device}, source_ip=f"198.51.100.{n + 1}"
        )
        assert (response.status, response.body["balance"]) == (200, 5)
    return devices


async def balances(admin: asyncpg.Connection) -> dict[str, int]:
    rows = await admin.fetch(
        "select coalesce(u.clerk_id, u.device_id) as name, t.balance"
        "  from users u join user_tokens t on t.user_id = u.id"
    )
    return {row["name"]: row["balance"] for row in rows}


async def test_linking_ten_devices_one_by_one_moves_one_device_bonus(
    abuse_runtime: LambdaRuntime,  # noqa: F811
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_clerk(monkeypatch)
    devices = await devices_from_many_addresses(DEVICES)
    account = bearer(signed(sub="user_farmer"))
    moved = []
    for device in devices:
        response = await call(
            "user",
            "POST",
            "/api/user/link-device",
            headers={**account, "Content-Type": "application/json"},
            body={"device_id": device},
        )
        assert response.status == 200, response.body
        moved.append(response.body["moved_tokens"])
    assert moved == [5] + [0] * (DEVICES - 1)
    assert await balances(admin) == {"user_farmer": 10 + 5, devices[0]: 0} | dict.fromkeys(devices[1:], 5)
    # linking them all again moves nothing more
    for device in devices:
        again = await call(
            "user",
            "POST",
            "/api/user/link-device",
            headers={**account, "Content-Type": "application/json"},
            body={"device_id": device},
        )
        assert again.status == 200
    assert (await balances(admin))["user_farmer"] == 15
    # and a linked device cannot spend what it kept
    spent = await call(
        "generations",
        "POST",
        "/api/generations",
        headers={"X-Device-Id": devices[-1], "Content-Type": "application/json"},
        body={"prompt": "a farmed cat"},
    )
    assert (spent.status, spent.body["error"]) == (403, "device_linked")
    # on the runtime's loop, where its pool is (see tests/functions/lambda_events.py)
    assert await abuse_runtime.run(audit.find_violations) == []
    assert await db.audit_problems(admin) == []


async def test_linking_ten_devices_at_once_moves_one_device_bonus(
    wide_pool: None,
    abuse_runtime: LambdaRuntime,  # noqa: F811
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_clerk(monkeypatch)
    devices = await devices_from_many_addresses(DEVICES)
    # one device bought 50 tokens: those are its owner's, and move in full
    rich = devices[3]
    await admin.execute(
        """
        with topped as (
            update user_tokens t
               set balance = balance + 50, total_earned = total_earned + 50
              from users u
             where u.id = t.user_id and u.device_id = $1
         returning t.user_id, t.balance
        )
        insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)
        select user_id, 50, balance, 'purchase', 'test:bought' from topped
        """,
        rich,
    )
    # the account exists before the race (its own bonus: 10)
    account = bearer(signed(sub="user_farmer"))
    assert (await call("user", "GET", "/api/user", headers=account)).body["balance"] == 10
    await abuse_runtime.close_pool()  # the race runs on this loop's own pool

    responses = await asyncio.gather(
        *(
            call_at_once(
                "user",
                "POST",
                "/api/user/link-device",
                headers={**account, "Content-Type": "application/json"},
                body={"device_id": device},
            )
            for device in devices
        )
    )
    assert [response.status for response in responses] == [200] * DEVICES
    moved = [response.body["moved_tokens"] for response in responses]
    held = await balances(admin)
    # whichever device won the race moved all it held (5, or 55 for the rich
    # one); every other kept its 5 and moved the rest (the rich one's 50)
    assert sum(moved) == 5 + 50
    assert held["user_farmer"] == 10 + 5 + 50
    assert sorted(held[device] for device in devices) == [0] + [5] * (DEVICES - 1)
    assert moved[devices.index(rich)] in (50, 55)
    linked = await admin.fetchval(
        "select count(*) from users d join users a on a.id = d.linked_to_user_id"
        " where a.clerk_id = 'user_farmer'"
    )
    assert linked == DEVICES
