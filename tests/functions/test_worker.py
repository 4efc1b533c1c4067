"""POST /api/worker/claim and POST /api/generations/{id}/result through the
Lambda handler, with REST (v1) and HTTP API (v2) events, on the real database."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from functions import settings
from functions.worker import handler
from repositories import generations, tokens
from tests import db
from tests.functions.callers import DEVICE, GENERATION_FIELDS, fingerprint
from tests.functions.lambda_events import EVENT_BUILDERS, Invocation, invoke

VERSIONS = sorted(EVENT_BUILDERS)
SECRET = "callback-secret-for-tests-0123456789"
CALLER = {"X-Callback-Secret": SECRET}


@pytest.fixture(autouse=True)
def callback_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENERATION_CALLBACK_SECRET", SECRET)
    settings.reset()


async def claim(version: str, body: Any = None, headers: dict[str, str] = CALLER, **event: Any) -> Invocation:
    return await invoke(
        handler, EVENT_BUILDERS[version]("POST", "/api/worker/claim", headers=headers, body=body, **event)
    )


async def result(
    version: str, generation_id: Any, body: Any, headers: dict[str, str] = CALLER, **event: Any
) -> Invocation:
    path = f"/api/generations/{generation_id}/result"
    return await invoke(handler, EVENT_BUILDERS[version]("POST", path, headers=headers, body=body, **event))


async def queue(admin: asyncpg.Connection, count: int, quality: str = "standard") -> tuple[UUID, list[UUID]]:
    """A device user with `count` pending generations, oldest first."""
    user_id = await db.insert_user(admin, device_id=DEVICE)
    await tokens.credit(user_id, 95, "purchase", "payment:seed")
    made = []
    for n in range(count):
        created = await generations.create_generation(user_id, f"fox {n}", quality, f"key-{n}")
        made.append(created.generation.id)
    return user_id, made


async def statuses(admin: asyncpg.Connection) -> dict[UUID, str]:
    rows = await admin.fetch("select id, status from generations")
    return {row["id"]: row["status"] for row in rows}


# --------------------------------------------------------------- the secret


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"X-Callback-Secret": ""}, id="empty"),
        pytest.param({"X-Callback-Secret": SECRET[:-1]}, id="prefix"),
        pytest.param({"X-Callback-Secret": SECRET + "x"}, id="longer"),
        pytest.param({"X-Callback-Secret": SECRET.upper()}, id="case"),
        pytest.param({"X-Callback-Secret": "é" * 8}, id="not_ascii"),
        pytest.param({"X-Init-Secret": SECRET}, id="other_header"),
        pytest.param({"Authorization": f"Bearer {SECRET}"}, id="bearer"),
    ],
)
async def test_a_wrong_or_missing_secret_is_403_and_changes_nothing(
    version: str, headers: dict[str, str], admin: asyncpg.Connection
) -> None:
    _, made = await queue(admin, 2)
    before = await fingerprint(admin)
    claimed = await claim(version, {}, headers)
    assert claimed.status == 403
    assert claimed.body == {"error": "forbidden", "message": "Wrong or missing X-Callback-Secret"}
    finished = await result(version, made[0], {"status": "failed", "error": "x"}, headers)
    assert finished.status == 403
    assert finished.body["error"] == "forbidden"
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_without_a_configured_secret_every_caller_is_403(
    version: str, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GENERATION_CALLBACK_SECRET")
    settings.reset()
    _, made = await queue(admin, 1)
    before = await fingerprint(admin)
    for headers in (CALLER, {}, {"X-Callback-Secret": ""}):
        claimed = await claim(version, {}, headers)
        assert claimed.status == 403
        assert claimed.body["error"] == "forbidden"
        finished = await result(version, made[0], {"status": "failed"}, headers)
        assert finished.status == 403
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_secret_comes_before_the_body(version: str) -> None:
    """An unauthenticated caller learns nothing about what the body should be."""
    response = await claim(version, "not json", {})
    assert response.status == 403


# -------------------------------------------------------------------- claim


@pytest.mark.parametrize("version", VERSIONS)
async def test_claim_takes_the_oldest_pending_under_a_lease(version: str, admin: asyncpg.Connection) -> None:
    _, made = await queue(admin, 3, quality="hd")
    response = await claim(version, {"limit": 2, "lease_seconds": 60})
    assert response.status == 200
    assert set(response.body) == {"items"}
    items = response.body["items"]
    assert [item["id"] for item in items] == [str(made[0]), str(made[1])]
    assert set(items[0]) == {"id", "prompt", "quality", "attempt", "lease_expires_at"}
    assert (items[0]["prompt"], items[0]["quality"], items[0]["attempt"]) == ("fox 0", "hd", 1)
    stored = await admin.fetchrow(
        "select status, lease_expires_at, lease_expires_at - updated_at as lease"
        "  from generations where id = $1",
        made[0],
    )
    assert stored["status"] == "processing"
    assert stored["lease"].total_seconds() == 60
    assert datetime.fromisoformat(items[0]["lease_expires_at"]) == stored["lease_expires_at"]
    assert (await statuses(admin))[made[2]] == "pending"


@pytest.mark.parametrize("version", VERSIONS)
async def test_claim_defaults_to_ten_for_five_minutes(version: str, admin: asyncpg.Connection) -> None:
    _, made = await queue(admin, 12)
    for body in (None, {}):
        await admin.execute("update generations set status = 'pending', lease_expires_at = null")
        response = await claim(version, body)
        assert response.status == 200
        assert [item["id"] for item in response.body["items"]] == [str(g) for g in made[:10]]
    lease = await admin.fetchval(
        "select max(lease_expires_at - updated_at) from generations where status = 'processing'"
    )
    assert lease.total_seconds() == 300


@pytest.mark.parametrize("version", VERSIONS)
async def test_two_claims_never_take_the_same_generation(version: str, admin: asyncpg.Connection) -> None:
    await queue(admin, 3)
    first = await claim(version, {"limit": 2})
    second = await claim(version, {"limit": 2})
    third = await claim(version, {"limit": 2})
    ids = [item["id"] for page in (first, second) for item in page.body["items"]]
    assert len(ids) == len(set(ids)) == 3
    assert third.body == {"items": []}


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_claim_repeated_with_its_key_answers_the_same_generations(
    version: str, admin: asyncpg.Connection
) -> None:
    """The worker lost the first answer (its own timeout): asking again with the
    key gets that batch back instead of a second one, and nothing waits out a lease."""
    _, made = await queue(admin, 5)
    keyed = {**CALLER, "Idempotency-Key": "worker-7:claim-1"}
    first = await claim(version, {"limit": 2}, keyed)
    again = await claim(version, {"limit": 2}, keyed)
    assert first.status == again.status == 200
    assert [item["id"] for item in first.body["items"]] == [str(made[0]), str(made[1])]
    assert again.body == first.body
    assert list((await statuses(admin)).values()).count("processing") == 2
    # a generation of the batch that finished is not handed out again
    finished = await result(version, made[0], {"status": "succeeded", "image_key": "img/0.png"})
    assert finished.status == 200
    third = await claim(version, {"limit": 2}, keyed)
    assert [item["id"] for item in third.body["items"]] == [str(made[1])]
    # another key is another claim
    other = await claim(version, {"limit": 2}, {**CALLER, "Idempotency-Key": "worker-7:claim-2"})
    assert [item["id"] for item in other.body["items"]] == [str(made[2]), str(made[3])]
    assert await statuses(admin) == {
        made[0]: "succeeded",
        made[1]: "processing",
        made[2]: "processing",
        made[3]: "processing",
        made[4]: "pending",
    }
    attempts = await admin.fetch("select attempt from generations where status = 'processing'")
    assert [row["attempt"] for row in attempts] == [1, 1, 1]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("key", ["", "a,b", "x" * 201, "ключ"])
async def test_a_bad_claim_key_is_422_and_claims_nothing(
    version: str, key: str, admin: asyncpg.Connection
) -> None:
    await queue(admin, 2)
    before = await fingerprint(admin)
    response = await claim(version, {"limit": 1}, {**CALLER, "Idempotency-Key": key})
    assert response.status == 422
    assert response.body["error"] == "invalid_request"
    assert await fingerprint(admin) == before


BAD_CLAIMS: dict[str, tuple[Any, int]] = {
    "not_json": ("limit=5", 400),
    "not_utf8": (b'{"limit": 5, "x": "\xff"}', 400),
    "array": ("[5]", 400),
    "limit_zero": ({"limit": 0}, 422),
    "limit_over": ({"limit": 101}, 422),
    "limit_negative": ({"limit": -1}, 422),
    "limit_text": ({"limit": "5"}, 422),
    "limit_float": ({"limit": 5.0}, 422),
    "limit_bool": ({"limit": True}, 422),
    "limit_huge": ({"limit": 10**30}, 422),
    "lease_negative": ({"lease_seconds": -300}, 422),
    "lease_zero": ({"lease_seconds": 0}, 422),
    "lease_short": ({"lease_seconds": 9}, 422),
    "lease_long": ({"lease_seconds": 3601}, 422),
    "lease_null": ({"lease_seconds": None}, 422),
    "unknown_field": ({"limit": 1, "status": "pending"}, 422),
    "huge": ({"limit": 1, "padding": "x" * 70_000}, 413),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(BAD_CLAIMS))
async def test_bad_claims_are_4xx_and_claim_nothing(
    version: str, case: str, admin: asyncpg.Connection
) -> None:
    await queue(admin, 2)
    before = await fingerprint(admin)
    body, status = BAD_CLAIMS[case]
    response = await claim(version, body)
    assert response.status == status
    assert response.body["error"] == "invalid_request"
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_claim_takes_no_query_parameters(version: str, admin: asyncpg.Connection) -> None:
    await queue(admin, 1)
    before = await fingerprint(admin)
    response = await claim(version, {}, query={"limit": "1"})
    assert response.status == 422
    assert await fingerprint(admin) == before


# ------------------------------------------------------------------- result


async def claimed(admin: asyncpg.Connection, quality: str = "hd") -> tuple[UUID, UUID]:
    user_id, [generation_id] = await queue(admin, 1, quality)
    await generations.claim_generations(1, 60, uuid.uuid4())
    return user_id, generation_id


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_success_records_the_image_and_moves_no_tokens(
    version: str, admin: asyncpg.Connection
) -> None:
    user_id, generation_id = await claimed(admin)
    ledger = await db.ledger(admin, user_id)
    response = await result(version, generation_id, {"status": "succeeded", "image_key": "images/fox.png"})
    assert response.status == 200
    body = response.body
    assert set(body) == GENERATION_FIELDS
    assert (body["id"], body["status"], body["image_key"], body["error"]) == (
        str(generation_id),
        "succeeded",
        "images/fox.png",
        None,
    )
    assert body["finished_at"] is not None
    stored = await admin.fetchrow("select status, image_key from generations where id = $1", generation_id)
    assert tuple(stored) == ("succeeded", "images/fox.png")
    assert await db.ledger(admin, user_id) == ledger
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_failure_refunds_once_and_a_duplicate_changes_nothing(
    version: str, admin: asyncpg.Connection
) -> None:
    user_id, generation_id = await claimed(admin, "hd")
    balance = await db.balance(admin, user_id)
    first = await result(version, generation_id, {"status": "failed", "error": "the model fell over"})
    assert first.status == 200
    assert (first.body["status"], first.body["error"], first.body["image_key"]) == (
        "failed",
        "the model fell over",
        None,
    )
    assert await db.balance(admin, user_id) == balance + 2
    refunds = [row for row in await db.ledger(admin, user_id) if row["type"] == "refund"]
    assert [(row["amount"], row["idempotency_key"]) for row in refunds] == [(2, f"refund:{generation_id}")]

    before = await fingerprint(admin)
    for duplicate in (
        {"status": "failed", "error": "again"},
        {"status": "succeeded", "image_key": "images/late.png"},
    ):
        again = await result(version, generation_id, duplicate)
        assert again.status == 200
        assert again.body == first.body
    assert await fingerprint(admin) == before
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_result_for_a_pending_generation_is_accepted(version: str, admin: asyncpg.Connection) -> None:
    _, [generation_id] = await queue(admin, 1)
    response = await result(version, generation_id, {"status": "succeeded", "image_key": "k.png"})
    assert response.status == 200
    assert response.body["status"] == "succeeded"
    assert response.body["attempt"] == 0


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("generation_id", [str(uuid.uuid4()), "not-a-uuid", "1 or 1=1"])
async def test_a_result_for_an_unknown_or_malformed_id_is_404(
    version: str, generation_id: str, admin: asyncpg.Connection
) -> None:
    await claimed(admin)
    before = await fingerprint(admin)
    response = await result(version, generation_id, {"status": "failed"})
    assert response.status == 404
    assert response.body["error"] == "not_found"
    assert await fingerprint(admin) == before


BAD_RESULTS: dict[str, tuple[Any, int]] = {
    "not_json": ("status=failed", 400),
    "not_utf8": (b'{"status": "failed", "error": "\xff"}', 400),
    "empty": ("", 422),
    "status_unknown": ({"status": "done"}, 422),
    "status_pending": ({"status": "pending"}, 422),
    "status_number": ({"status": 1}, 422),
    "succeeded_without_image": ({"status": "succeeded"}, 422),
    "succeeded_null_image": ({"status": "succeeded", "image_key": None}, 422),
    "image_key_empty": ({"status": "succeeded", "image_key": ""}, 422),
    "image_key_too_long": ({"status": "succeeded", "image_key": "k" * 1025}, 422),
    "image_key_number": ({"status": "succeeded", "image_key": 7}, 422),
    "image_key_nul": ({"status": "succeeded", "image_key": "a\x00b"}, 422),
    "error_too_long": ({"status": "failed", "error": "e" * 2001}, 422),
    "unknown_field": ({"status": "failed", "refund": 100}, 422),
    "huge": ({"status": "failed", "error": "e" * 70_000}, 413),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
async def test_bad_results_are_4xx_and_change_nothing(
    version: str, case: str, admin: asyncpg.Connection
) -> None:
    _, generation_id = await claimed(admin)
    before = await fingerprint(admin)
    body, status = BAD_RESULTS[case]
    response = await result(version, generation_id, body)
    assert response.status == status
    assert response.body["error"] == "invalid_request"
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_sql_looking_results_are_stored_verbatim(version: str, admin: asyncpg.Connection) -> None:
    _, generation_id = await claimed(admin)
    error = "'); update user_tokens set balance = 1000000; --"
    response = await result(version, generation_id, {"status": "failed", "error": error})
    assert response.status == 200
    assert await admin.fetchval("select error from generations where id = $1", generation_id) == error
    assert await db.audit_problems(admin) == []
