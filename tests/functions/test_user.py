"""GET /api/user and POST /api/user/link-device through the Lambda handler,
with REST (v1) and HTTP API (v2) events, on the real database."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import pytest

from database import config
from functions.user import handler
from tests import db
from tests.functions.callers import (
    CLERK_ID,
    DEVICE,
    OTHER_DEVICE,
    capture_requests,
    clerk,
    device,
    fingerprint,
    round_trips,
    use_clerk,
    user_id_of,
)
from tests.functions.lambda_events import EVENT_BUILDERS, invoke

VERSIONS = sorted(EVENT_BUILDERS)
USER_FIELDS = {"id", "clerk_id", "device_id", "email", "created_at", "balance", "plan"}

# nothing listens on port 1: the connection is refused at once
UNREACHABLE = "postgresql://dreamlens@127.0.0.1:1/dreamlens"


@pytest.fixture(autouse=True)
def clerk_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    use_clerk(monkeypatch)


async def get_user(version: str, headers: dict[str, str], **event: Any) -> Any:
    return await invoke(handler, EVENT_BUILDERS[version]("GET", "/api/user", headers=headers, **event))


async def link(version: str, headers: dict[str, str], body: Any) -> Any:
    event = EVENT_BUILDERS[version]("POST", "/api/user/link-device", headers=headers, body=body)
    return await invoke(handler, event)


# ------------------------------------------------------------ GET /api/user


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_new_device_is_created_with_its_welcome_bonus(
    version: str, admin: asyncpg.Connection
) -> None:
    response = await get_user(version, device(DEVICE))
    assert response.status == 200
    body = response.body
    assert set(body) == USER_FIELDS
    user_id = await user_id_of(admin, device_id=DEVICE)
    assert body["id"] == str(user_id)
    assert (body["clerk_id"], body["device_id"], body["email"]) == (None, DEVICE, None)
    assert (body["balance"], body["plan"]) == (5, "free")
    created_at = await admin.fetchval("select created_at from users where id = $1", user_id)
    assert datetime.fromisoformat(body["created_at"]) == created_at
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_clerk_user_is_created_with_email_and_ten_tokens(
    version: str, admin: asyncpg.Connection
) -> None:
    response = await get_user(version, clerk(CLERK_ID, email="ann@example.com"))
    assert response.status == 200
    assert response.body["clerk_id"] == CLERK_ID
    assert response.body["device_id"] is None
    assert response.body["email"] == "ann@example.com"
    assert (response.body["balance"], response.body["plan"]) == (10, "free")
    assert response.body["id"] == str(await user_id_of(admin, clerk_id=CLERK_ID))


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_balance_is_read_fresh_and_the_plan_from_the_subscription(
    version: str, admin: asyncpg.Connection
) -> None:
    first = await get_user(version, device(DEVICE))
    assert first.body["balance"] == 5
    user_id = await user_id_of(admin, device_id=DEVICE)
    # another process spends and sells a plan: no cache of ours hears of it
    await admin.execute("update user_tokens set balance = 3, total_spent = 2 where user_id = $1", user_id)
    await admin.execute(
        "insert into subscriptions (user_id, plan, status, current_period_end)"
        " values ($1, 'pro', 'active', now() + interval '30 days')",
        user_id,
    )
    second = await get_user(version, device(DEVICE))
    assert (second.body["balance"], second.body["plan"]) == (3, "pro")


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_warm_repeat_caller_costs_one_round_trip(
    version: str, caplog: pytest.LogCaptureFixture, admin: asyncpg.Connection
) -> None:
    await db.insert_user(admin, device_id=DEVICE)
    capture_requests(caplog)
    await get_user(version, device(DEVICE))
    again = await get_user(version, device(DEVICE))
    assert again.status == 200
    # identity from the warm cache (0) + balance and plan in one statement (1)
    assert round_trips(caplog) == [db.trips(2), db.trips(1)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_malformed_device_id_is_401_and_writes_nothing(
    version: str, admin: asyncpg.Connection
) -> None:
    before = await fingerprint(admin)
    response = await get_user(version, {"X-Device-Id": "bad id!"})
    assert response.status == 401
    assert response.body["error"] == "unauthorized"
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_no_identity_is_401(version: str) -> None:
    response = await get_user(version, {})
    assert response.status == 401
    assert response.body["error"] == "unauthorized"


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_linked_device_is_403_device_linked(version: str, admin: asyncpg.Connection) -> None:
    account = await db.insert_user(admin, clerk_id=CLERK_ID)
    await db.insert_user(admin, device_id=DEVICE)
    await admin.execute(
        "update users set linked_to_user_id = $1, linked_at = now() where device_id = $2", account, DEVICE
    )
    response = await get_user(version, device(DEVICE))
    assert response.status == 403
    assert response.body == {
        "error": "device_linked",
        "message": "This device was linked into an account; sign in to that account",
    }


@pytest.mark.parametrize("version", VERSIONS)
async def test_query_parameters_are_422_and_create_nobody(version: str, admin: asyncpg.Connection) -> None:
    before = await fingerprint(admin)
    response = await get_user(version, device(DEVICE), query={"fields": "balance"})
    assert response.status == 422
    assert response.body["details"][0]["loc"] == ["query", "fields"]
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_database_that_is_down_is_503_and_the_next_request_succeeds(
    version: str, schema: str
) -> None:
    config.configure(url=UNREACHABLE)
    down = await get_user(version, device(DEVICE))
    assert down.status == 503
    assert down.body == {"error": "unavailable", "message": "Database unavailable"}
    assert int(down.headers["retry-after"]) >= 1

    config.configure(url=schema)  # the database is back: no restart
    up = await get_user(version, device(DEVICE))
    assert up.status == 200
    assert up.body["balance"] == 5


# ------------------------------------------------- POST /api/user/link-device


@pytest.mark.parametrize("version", VERSIONS)
async def test_link_moves_the_device_into_the_account(version: str, admin: asyncpg.Connection) -> None:
    await get_user(version, device(DEVICE))  # the device acts alone first (and is cached)
    response = await link(version, clerk(CLERK_ID), {"device_id": DEVICE})
    assert response.status == 200
    account_id = await user_id_of(admin, clerk_id=CLERK_ID)
    device_id = await user_id_of(admin, device_id=DEVICE)
    assert response.body["moved_tokens"] == 5
    user = response.body["user"]
    assert set(user) == USER_FIELDS
    assert (user["id"], user["clerk_id"], user["device_id"]) == (str(account_id), CLERK_ID, None)
    assert (user["balance"], user["plan"]) == (15, "free")
    assert [row["type"] for row in await db.ledger(admin, account_id)] == ["bonus", "transfer_in"]
    assert [row["type"] for row in await db.ledger(admin, device_id)] == ["bonus", "transfer_out"]
    # this process forgot the cached device at once
    alone = await get_user(version, device(DEVICE))
    assert alone.status == 403
    assert alone.body["error"] == "device_linked"
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_plan_bought_on_the_device_comes_with_it(version: str, admin: asyncpg.Connection) -> None:
    await get_user(version, device(DEVICE))
    device_id = await user_id_of(admin, device_id=DEVICE)
    await admin.execute(
        "insert into subscriptions (user_id, plan, status, current_period_end)"
        " values ($1, 'premium', 'active', now() + interval '30 days')",
        device_id,
    )
    response = await link(version, clerk(CLERK_ID), {"device_id": DEVICE})
    assert response.status == 200
    assert response.body["user"]["plan"] == "premium"
    assert (await get_user(version, clerk(CLERK_ID))).body["plan"] == "premium"
    account_id = await user_id_of(admin, clerk_id=CLERK_ID)
    owners = await admin.fetch("select user_id from subscriptions where status = 'active'")
    assert [row["user_id"] for row in owners] == [account_id]


@pytest.mark.parametrize("version", VERSIONS)
async def test_linking_again_answers_what_moved_the_first_time(
    version: str, admin: asyncpg.Connection
) -> None:
    await db.insert_user(admin, device_id=DEVICE)
    first = await link(version, clerk(CLERK_ID), {"device_id": DEVICE})
    again = await link(version, clerk(CLERK_ID), {"device_id": DEVICE})
    assert (first.status, again.status) == (200, 200)
    assert again.body == first.body
    account_id = await user_id_of(admin, clerk_id=CLERK_ID)
    assert len(await db.ledger(admin, account_id)) == 2
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_device_alone_cannot_link(version: str, admin: asyncpg.Connection) -> None:
    await db.insert_user(admin, device_id=OTHER_DEVICE)
    before = await fingerprint(admin)
    response = await link(version, device(DEVICE), {"device_id": OTHER_DEVICE})
    assert response.status == 401
    assert response.body["error"] == "unauthorized"
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_an_unknown_device_is_404(version: str) -> None:
    response = await link(version, clerk(CLERK_ID), {"device_id": "never_seen_device"})
    assert response.status == 404
    assert response.body["error"] == "not_found"


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_device_linked_into_another_account_is_409(version: str, admin: asyncpg.Connection) -> None:
    await db.insert_user(admin, device_id=DEVICE)
    await db.insert_user(admin, clerk_id=CLERK_ID)
    assert (await link(version, clerk("user_first_owner"), {"device_id": DEVICE})).status == 200
    before = await fingerprint(admin)
    response = await link(version, clerk(CLERK_ID), {"device_id": DEVICE})
    assert response.status == 409
    assert response.body["error"] == "conflict"
    assert await fingerprint(admin) == before


BAD_LINK_BODIES: dict[str, tuple[Any, int]] = {
    "not_json": ("device_id=device_test_0001", 400),
    "truncated": ('{"device_id": "device_', 400),
    "not_utf8": (b'{"device_id": "\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"}', 400),
    "array": ('["device_test_0001"]', 400),
    "empty": ("", 422),
    "wrong_type": ({"device_id": 12345678}, 422),
    "null": ({"device_id": None}, 422),
    "malformed_device_id": ({"device_id": "bad id!"}, 422),
    "too_long": ({"device_id": "d" * 129}, 422),
    "huge": ({"device_id": "d" * 70_000}, 413),
    "sql": ({"device_id": "x' or '1'='1"}, 422),
    "unknown_field": ({"device_id": DEVICE, "move_all": True}, 422),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(BAD_LINK_BODIES))
async def test_bad_link_input_is_4xx_and_writes_nothing(
    version: str, case: str, admin: asyncpg.Connection
) -> None:
    await db.insert_user(admin, device_id=DEVICE)
    before = await fingerprint(admin)
    body, status = BAD_LINK_BODIES[case]
    # a Clerk user seen for the first time: not even the account is created
    response = await link(version, clerk(CLERK_ID), body)
    assert response.status == status
    assert response.body["error"] == "invalid_request"
    assert await fingerprint(admin) == before
