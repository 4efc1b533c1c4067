"""GET /api/tokens and GET /api/tokens/transactions through the Lambda
handler, with REST (v1) and HTTP API (v2) events, on the real database."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from database import cache
from functions import generations
from functions.tokens import handler
from repositories import tokens
from tests import db
from tests.functions.callers import (
    DEVICE,
    OTHER_DEVICE,
    capture_requests,
    device,
    fingerprint,
    round_trips,
)
from tests.functions.lambda_events import EVENT_BUILDERS, Invocation, invoke

VERSIONS = sorted(EVENT_BUILDERS)
ENTRY_FIELDS = {"id", "amount", "balance_after", "type", "description", "reference", "created_at"}


async def get(version: str, path: str, headers: dict[str, str], query: Any = None) -> Invocation:
    return await invoke(handler, EVENT_BUILDERS[version]("GET", path, headers=headers, query=query))


# ----------------------------------------------------------- GET /api/tokens


@pytest.mark.parametrize("version", VERSIONS)
async def test_balance_and_totals(version: str, admin: asyncpg.Connection) -> None:
    user_id = await db.insert_user(admin, device_id=DEVICE)
    await tokens.credit(user_id, 50, "purchase", "payment:p1")
    await tokens.spend(user_id, 3, "spend:s1")
    response = await get(version, "/api/tokens", device(DEVICE))
    assert response.status == 200
    assert set(response.body) == {"balance", "total_earned", "total_spent", "updated_at"}
    assert (response.body["balance"], response.body["total_earned"], response.body["total_spent"]) == (
        52,
        55,
        3,
    )
    updated_at = await admin.fetchval("select updated_at from user_tokens where user_id = $1", user_id)
    assert response.body["updated_at"] == updated_at.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_warm_repeat_caller_costs_no_round_trip(
    version: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await db.insert_user(admin, device_id=DEVICE)
    capture_requests(caplog)
    first = await get(version, "/api/tokens", device(DEVICE))
    second = await get(version, "/api/tokens", device(DEVICE))
    assert first.body == second.body
    # identity and balance both cached on the second request
    assert round_trips(caplog) == [db.trips(2), db.trips(0)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_balance_may_be_stale_for_display_until_a_write_here(
    version: str, admin: asyncpg.Connection
) -> None:
    user_id = await db.insert_user(admin, device_id=DEVICE)
    assert (await get(version, "/api/tokens", device(DEVICE))).body["balance"] == 5
    # another process's write is not seen within the 30 s
    await admin.execute("update user_tokens set balance = 4, total_spent = 1 where user_id = $1", user_id)
    assert (await get(version, "/api/tokens", device(DEVICE))).body["balance"] == 5
    # a spend in this process drops the cached balance: the caller sees it at once
    event = EVENT_BUILDERS[version](
        "POST", "/api/generations", headers=device(DEVICE), body={"prompt": "a quiet harbour"}
    )
    assert (await invoke(generations.handler, event)).status == 201
    assert (await get(version, "/api/tokens", device(DEVICE))).body["balance"] == 3


async def test_the_cached_balance_expires_after_thirty_seconds(
    admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(cache, "clock", lambda: now[0])
    user_id = await db.insert_user(admin, device_id=DEVICE)
    await get("v2", "/api/tokens", device(DEVICE))
    await admin.execute("update user_tokens set balance = 4, total_spent = 1 where user_id = $1", user_id)
    now[0] += 31
    assert (await get("v2", "/api/tokens", device(DEVICE))).body["balance"] == 4


@pytest.mark.parametrize("version", VERSIONS)
async def test_tokens_take_no_query_parameters(version: str, admin: asyncpg.Connection) -> None:
    before = await fingerprint(admin)
    response = await get(version, "/api/tokens", device(DEVICE), query={"fresh": "1"})
    assert response.status == 422
    assert response.body["error"] == "invalid_request"
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_tokens_need_an_identity(version: str) -> None:
    response = await get(version, "/api/tokens", {})
    assert response.status == 401
    assert response.body["error"] == "unauthorized"


# ---------------------------------------------- GET /api/tokens/transactions


async def ledger_of_eight(admin: asyncpg.Connection) -> Any:
    """A user with the welcome bonus, 4 credits and 3 spends: 8 rows."""
    user_id = await db.insert_user(admin, device_id=DEVICE)
    for n in range(4):
        await tokens.credit(user_id, 10, "purchase", f"payment:p{n}", "Bought tokens", f"p{n}")
    for n in range(3):
        await tokens.spend(user_id, 2, f"spend:s{n}", "Spent", f"s{n}")
    return user_id


@pytest.mark.parametrize("version", VERSIONS)
async def test_transactions_newest_first_with_every_field(version: str, admin: asyncpg.Connection) -> None:
    user_id = await ledger_of_eight(admin)
    response = await get(version, "/api/tokens/transactions", device(DEVICE))
    assert response.status == 200
    assert set(response.body) == {"items", "next_before"}
    items = response.body["items"]
    assert response.body["next_before"] is None
    stored = list(reversed(await db.ledger(admin, user_id)))
    assert [item["id"] for item in items] == [row["id"] for row in stored]
    assert all(set(item) == ENTRY_FIELDS for item in items)
    newest = items[0]
    assert (newest["amount"], newest["balance_after"], newest["type"]) == (-2, 39, "spend")
    assert (newest["description"], newest["reference"]) == ("Spent", "s2")
    assert (items[-1]["type"], items[-1]["amount"], items[-1]["reference"]) == ("bonus", 5, None)


@pytest.mark.parametrize("version", VERSIONS)
async def test_transactions_page_with_limit_and_before(version: str, admin: asyncpg.Connection) -> None:
    await ledger_of_eight(admin)
    seen: list[int] = []
    pages = 0
    query: dict[str, str] = {"limit": "3"}
    while True:
        response = await get(version, "/api/tokens/transactions", device(DEVICE), query=query)
        assert response.status == 200
        pages += 1
        seen += [item["id"] for item in response.body["items"]]
        if response.body["next_before"] is None:
            break
        query = {"limit": "3", "before": str(response.body["next_before"])}
    assert pages == 3
    assert len(seen) == 8
    assert seen == sorted(seen, reverse=True)


@pytest.mark.parametrize("version", VERSIONS)
async def test_transactions_show_only_the_callers_own(version: str, admin: asyncpg.Connection) -> None:
    await ledger_of_eight(admin)
    response = await get(version, "/api/tokens/transactions", device(OTHER_DEVICE))
    assert response.status == 200
    assert [item["type"] for item in response.body["items"]] == ["bonus"]


BAD_PAGES: dict[str, dict[str, Any]] = {
    "limit_zero": {"limit": "0"},
    "limit_over": {"limit": "101"},
    "limit_text": {"limit": "abc"},
    "limit_negative": {"limit": "-5"},
    "limit_float": {"limit": "2.5"},
    "before_text": {"before": "abc"},
    "before_negative": {"before": "-1"},
    "before_sql": {"before": "1 or 1=1"},
    "unknown": {"offset": "10"},
    "repeated": {"limit": ["10", "20"]},
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(BAD_PAGES))
async def test_bad_page_parameters_are_422_and_write_nothing(
    version: str, case: str, admin: asyncpg.Connection
) -> None:
    before = await fingerprint(admin)
    # a device seen for the first time: the refusal comes before it is created
    response = await get(version, "/api/tokens/transactions", device(DEVICE), query=BAD_PAGES[case])
    assert response.status == 422
    assert response.body["error"] == "invalid_request"
    assert response.body["details"][0]["loc"][0] == "query"
    assert await fingerprint(admin) == before
