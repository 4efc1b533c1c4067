"""GET /api/subscription through the Lambda handler, with REST (v1) and HTTP
API (v2) events, on the real database."""

from __future__ import annotations

from datetime import datetime

import asyncpg
import pytest

from functions.subscription import handler
from repositories import generations
from tests import db
from tests.functions.callers import DEVICE, capture_requests, device, fingerprint, round_trips
from tests.functions.lambda_events import EVENT_BUILDERS, Invocation, invoke

VERSIONS = sorted(EVENT_BUILDERS)


async def get(version: str, headers: dict[str, str], query: dict[str, str] | None = None) -> Invocation:
    return await invoke(
        handler, EVENT_BUILDERS[version]("GET", "/api/subscription", headers=headers, query=query)
    )


@pytest.mark.parametrize("version", VERSIONS)
async def test_free_plan_without_a_subscription(version: str) -> None:
    response = await get(version, device(DEVICE))
    assert response.status == 200
    assert response.body == {
        "plan": "free",
        "status": "none",
        "current_period_end": None,
        "daily_generation_limit": 20,
        "used_today": 0,
    }


@pytest.mark.parametrize("version", VERSIONS)
async def test_active_plan_with_its_limit_end_and_todays_use(
    version: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    user_id = await db.insert_user(admin, device_id=DEVICE)
    end: datetime = await admin.fetchval(
        "insert into subscriptions (user_id, plan, status, current_period_end)"
        " values ($1, 'pro', 'active', now() + interval '30 days') returning current_period_end",
        user_id,
    )
    await generations.create_generation(user_id, "a fox", "standard", "k1")
    await generations.create_generation(user_id, "a fox", "hd", "k2")
    capture_requests(caplog)
    response = await get(version, device(DEVICE))
    assert response.status == 200
    body = response.body
    assert (body["plan"], body["status"], body["daily_generation_limit"], body["used_today"]) == (
        "pro",
        "active",
        200,
        2,
    )
    assert datetime.fromisoformat(body["current_period_end"]) == end
    assert round_trips(caplog) == [db.trips(2)]  # identity (first sight) + the subscription


@pytest.mark.parametrize("version", VERSIONS)
async def test_subscription_takes_no_query_parameters(version: str, admin: asyncpg.Connection) -> None:
    before = await fingerprint(admin)
    response = await get(version, device(DEVICE), query={"plan": "premium"})
    assert response.status == 422
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_subscription_needs_an_identity(version: str) -> None:
    response = await get(version, {"X-Device-Id": "x"})
    assert response.status == 401
