"""Database round trips per request for a warm repeat caller, endpoint by
endpoint, as each request's log line counted them on the Lambda runtime's
thread (statement cache on: one round trip per statement; behind a
transaction-mode pooler with DB_STATEMENT_CACHE_SIZE=0 each costs two).

The first request of each pair warms the identity cache; the figure is the
second's."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from functions import generations, subscription, tokens, user, worker
from functions import settings as function_settings
from repositories import generations as generation_store
from tests import db
from tests.functions.callers import DEVICE, capture_requests, device, round_trips
from tests.functions.lambda_events import EVENT_BUILDERS, invoke

VERSIONS = sorted(EVENT_BUILDERS)
SECRET = "callback-secret-for-round-trips"

# endpoint -> round trips of a warm repeat caller
WARM: dict[str, int] = {
    "GET /api/user": 1,  # balance and plan in one statement
    "GET /api/tokens": 0,  # identity and balance both cached
    "GET /api/tokens/transactions": 1,
    "GET /api/subscription": 1,
    "POST /api/generations": 1,  # spend, generation, ledger and usage rows in one statement
    "GET /api/generations": 1,
    "GET /api/generations/{id}": 1,
}


async def twice(handler: Any, version: str, method: str, path: str, **event: Any) -> None:
    for _ in range(2):
        response = await invoke(handler, EVENT_BUILDERS[version](method, path, **event))
        assert response.status < 300, response.body


@pytest.mark.parametrize("version", VERSIONS)
async def test_warm_round_trips_per_endpoint(
    version: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    user_id = await db.insert_user(admin, device_id=DEVICE)
    created = await generation_store.create_generation(user_id, "a red fox", "standard", "seed")
    capture_requests(caplog)
    caller = device(DEVICE)
    calls: list[tuple[str, Any, str, str, dict[str, Any]]] = [
        ("GET /api/user", user.handler, "GET", "/api/user", {}),
        ("GET /api/tokens", tokens.handler, "GET", "/api/tokens", {}),
        ("GET /api/tokens/transactions", tokens.handler, "GET", "/api/tokens/transactions", {}),
        ("GET /api/subscription", subscription.handler, "GET", "/api/subscription", {}),
        (
            "POST /api/generations",
            generations.handler,
            "POST",
            "/api/generations",
            {"body": {"prompt": "a fox"}},
        ),
        ("GET /api/generations", generations.handler, "GET", "/api/generations", {}),
        (
            "GET /api/generations/{id}",
            generations.handler,
            "GET",
            f"/api/generations/{created.generation.id}",
            {},
        ),
    ]
    measured: dict[str, int] = {}
    for name, handler, method, path, extra in calls:
        caplog.clear()
        await twice(handler, version, method, path, headers=caller, **extra)
        measured[name] = round_trips(caplog)[-1]
    assert measured == {name: db.trips(statements) for name, statements in WARM.items()}
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_worker_claims_and_reports_in_one_round_trip_each(
    version: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENERATION_CALLBACK_SECRET", SECRET)
    function_settings.reset()
    user_id = await db.insert_user(admin, device_id=DEVICE)
    await generation_store.create_generation(user_id, "a red fox", "standard", str(uuid.uuid4()))
    capture_requests(caplog)
    headers = {"X-Callback-Secret": SECRET}
    claimed = await invoke(
        worker.handler, EVENT_BUILDERS[version]("POST", "/api/worker/claim", headers=headers, body={})
    )
    [item] = claimed.body["items"]
    path = f"/api/generations/{item['id']}/result"
    reported = await invoke(
        worker.handler, EVENT_BUILDERS[version]("POST", path, headers=headers, body={"status": "failed"})
    )
    assert reported.status == 200
    assert round_trips(caplog) == [db.trips(1), db.trips(1)]  # the refund is inside the result's statement
    assert await db.audit_problems(admin) == []
