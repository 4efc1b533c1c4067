"""POST/GET /api/generations, GET /api/generations/{id} and POST
/api/generations/{id}/download through the Lambda handler, with REST (v1)
and HTTP API (v2) events, on the real database; S3 faked with moto."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import asyncpg
import boto3
import pytest
import requests
from moto import mock_aws

from database import config
from functions import generations as generations_function
from functions import settings
from functions.generations import handler
from repositories import generations, tokens
from tests import db
from tests.functions.callers import (
    DEVICE,
    GENERATION_FIELDS,
    OTHER_DEVICE,
    capture_requests,
    device,
    fingerprint,
    metric_lines,
    metric_names,
    request_lines,
    round_trips,
)
from tests.functions.lambda_events import EVENT_BUILDERS, Invocation, LambdaRuntime, invoke

VERSIONS = sorted(EVENT_BUILDERS)
NEW_FIELDS = {"id", "status", "cost", "balance", "prompt", "quality", "created_at"}
REGION = "eu-central-1"
BUCKET = "dreamlens-test-images"


async def post(
    version: str,
    body: Any,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
) -> Invocation:
    event = EVENT_BUILDERS[version](
        "POST",
        "/api/generations",
        headers=device(DEVICE) if headers is None else headers,
        body=body,
        query=query,
    )
    return await invoke(handler, event)


async def get(version: str, path: str, headers: dict[str, str], query: Any = None) -> Invocation:
    return await invoke(handler, EVENT_BUILDERS[version]("GET", path, headers=headers, query=query))


async def download(version: str, generation_id: Any, headers: dict[str, str], **event: Any) -> Invocation:
    path = f"/api/generations/{generation_id}/download"
    return await invoke(handler, EVENT_BUILDERS[version]("POST", path, headers=headers, **event))


async def device_user(admin: asyncpg.Connection, device_id: str = DEVICE) -> UUID:
    return await db.insert_user(admin, device_id=device_id)


async def spends(admin: asyncpg.Connection, user_id: UUID) -> list[dict[str, Any]]:
    return [row for row in await db.ledger(admin, user_id) if row["type"] == "spend"]


# -------------------------------------------------------- POST /api/generations


@pytest.mark.parametrize("version", VERSIONS)
async def test_create_spends_and_queues(version: str, admin: asyncpg.Connection) -> None:
    user_id = await device_user(admin)
    response = await post(version, {"prompt": "a lighthouse at dusk", "quality": "hd"})
    assert response.status == 201
    body = response.body
    assert set(body) == NEW_FIELDS
    assert (body["status"], body["cost"], body["balance"]) == ("pending", 2, 3)
    assert (body["prompt"], body["quality"]) == ("a lighthouse at dusk", "hd")
    stored = await admin.fetchrow("select * from generations where id = $1", UUID(body["id"]))
    assert (stored["user_id"], stored["status"], stored["cost"]) == (user_id, "pending", 2)
    assert stored["created_at"].isoformat().replace("+00:00", "Z") == body["created_at"]
    [spend] = await spends(admin, user_id)
    assert (spend["amount"], spend["balance_after"], spend["reference"]) == (-2, 3, body["id"])
    assert await db.balance(admin, user_id) == 3
    usage = await admin.fetchval(
        "select count(*) from usage_logs where user_id = $1 and action = 'generation'", user_id
    )
    assert usage == 1
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_quality_defaults_to_standard(version: str, admin: asyncpg.Connection) -> None:
    await device_user(admin)
    response = await post(version, {"prompt": "a red fox"})
    assert response.status == 201
    assert (response.body["quality"], response.body["cost"], response.body["balance"]) == ("standard", 1, 4)


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_replay_returns_the_first_response_and_applies_nothing(
    version: str, admin: asyncpg.Connection
) -> None:
    user_id = await device_user(admin)
    headers = {**device(DEVICE), "Idempotency-Key": "order-42"}
    first = await post(version, {"prompt": "a red fox", "quality": "hd"}, headers)
    assert first.status == 201
    generation_id = UUID(first.body["id"])
    # the worker finishes it and the balance moves on: the replay still
    # answers with the first response (pending, the balance after its spend)
    await generations.record_result(generation_id, "succeeded", "images/fox.png", None)
    await tokens.credit(user_id, 7, "purchase", "payment:later")
    before = await fingerprint(admin)
    again = await post(version, {"prompt": "a red fox", "quality": "hd"}, headers)
    assert again.status == 201
    assert again.body == first.body
    assert await fingerprint(admin) == before
    assert len(await spends(admin, user_id)) == 1
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_without_a_key_each_request_is_its_own_generation(
    version: str, admin: asyncpg.Connection
) -> None:
    user_id = await device_user(admin)
    first = await post(version, {"prompt": "a red fox"})
    second = await post(version, {"prompt": "a red fox"})
    assert (first.status, second.status) == (201, 201)
    assert first.body["id"] != second.body["id"]
    assert second.body["balance"] == 3
    keys = await admin.fetch("select idempotency_key from generations where user_id = $1", user_id)
    assert len({row["idempotency_key"] for row in keys}) == 2  # server-made keys, both set
    assert all(row["idempotency_key"] for row in keys)
    assert len(await spends(admin, user_id)) == 2
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_key_reused_for_another_prompt_is_409(version: str, admin: asyncpg.Connection) -> None:
    await device_user(admin)
    headers = {**device(DEVICE), "Idempotency-Key": "order-43"}
    assert (await post(version, {"prompt": "a red fox"}, headers)).status == 201
    before = await fingerprint(admin)
    response = await post(version, {"prompt": "a blue fox"}, headers)
    assert response.status == 409
    assert response.body["error"] == "conflict"
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_insufficient_tokens_is_402_with_balance_and_cost(
    version: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    user_id = await device_user(admin)
    await tokens.spend(user_id, 4, "spend:elsewhere")
    before = await fingerprint(admin)
    response = await post(version, {"prompt": "a red fox", "quality": "hd"})
    assert response.status == 402
    assert response.body == {
        "error": "insufficient_tokens",
        "message": "Not enough tokens: balance 1, cost 2",
        "balance": 1,
        "cost": 2,
    }
    assert await fingerprint(admin) == before
    assert metric_names(caplog) == [["InsufficientTokensRejections"]]
    assert metric_lines(caplog)[0]["InsufficientTokensRejections"] == 1
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_daily_limit_is_429_with_retry_after(
    version: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await device_user(admin)
    await admin.execute("update plans set daily_generation_limit = 1 where id = 'free'")
    assert (await post(version, {"prompt": "a red fox"})).status == 201
    before = await fingerprint(admin)
    response = await post(version, {"prompt": "a red fox"})
    assert response.status == 429
    assert response.body == {"error": "rate_limited", "message": "Daily generation limit reached"}
    # it lifts at the next 00:00 UTC
    assert 1 <= int(response.headers["retry-after"]) <= 86_400
    assert await fingerprint(admin) == before
    assert metric_names(caplog) == [["TokensSpent"], ["RateLimitRejections"]]
    assert await db.audit_problems(admin) == []


async def test_metrics_one_line_for_a_spend_none_for_a_replay(
    admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await device_user(admin)
    headers = {**device(DEVICE), "Idempotency-Key": "order-44"}
    await post("v2", {"prompt": "a red fox", "quality": "hd"}, headers)
    await post("v2", {"prompt": "a red fox", "quality": "hd"}, headers)
    await get("v2", "/api/generations", device(DEVICE))
    # one line per request: the spend's metric rides on its request line
    assert [line["Route"] for line in request_lines(caplog)] == ["/api/generations"] * 3
    [metric] = metric_lines(caplog)
    assert (metric["TokensSpent"], metric["Status"]) == (2, "201")
    request, spent = metric["_aws"]["CloudWatchMetrics"]
    assert "Requests" in [m["Name"] for m in request["Metrics"]]
    assert spent == {
        "Namespace": "DreamLens",
        "Dimensions": [["Function"]],
        "Metrics": [{"Name": "TokensSpent", "Unit": "Count"}],
    }


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_warm_repeat_caller_creates_in_one_round_trip(
    version: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await device_user(admin)
    capture_requests(caplog)
    await post(version, {"prompt": "a red fox"})
    await post(version, {"prompt": "a red fox"})
    await post(version, {"prompt": "a red fox"}, {**device(DEVICE), "Idempotency-Key": "k-1"})
    # first: identity (1) + the spend (1); then the spend alone, keyed or not
    assert round_trips(caplog) == [db.trips(2), db.trips(1), db.trips(1)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "prompt",
    [
        "'); drop table users; --",
        "1' or '1'='1",
        "$1; select pg_sleep(10)",
        "Robert'); DELETE FROM token_transactions WHERE ('1'='1",
        "лиса в лесу 🦊 \\ \" ' %s {}",
    ],
)
async def test_sql_looking_prompts_are_stored_verbatim(
    version: str, prompt: str, admin: asyncpg.Connection
) -> None:
    user_id = await device_user(admin)
    response = await post(version, {"prompt": prompt})
    assert response.status == 201
    assert response.body["prompt"] == prompt
    assert await admin.fetchval("select prompt from generations where user_id = $1", user_id) == prompt
    assert await admin.fetchval("select count(*) from users") == 1
    assert len(await db.ledger(admin, user_id)) == 2
    assert await db.audit_problems(admin) == []


BAD_CREATES: dict[str, tuple[Any, int]] = {
    "not_json": ("prompt=a red fox", 400),
    "truncated": ('{"prompt": "a red', 400),
    "not_utf8": (b'{"prompt": "\xff\xfe a red fox"}', 400),
    "latin1": ('{"prompt": "café"}'.encode("latin-1"), 400),
    "array": ('[{"prompt": "a red fox"}]', 400),
    "nan": ('{"prompt": "a red fox", "quality": NaN}', 400),
    "empty_body": ("", 422),
    "empty_object": ({}, 422),
    "prompt_number": ({"prompt": 42}, 422),
    "prompt_null": ({"prompt": None}, 422),
    "prompt_list": ({"prompt": ["a", "fox"]}, 422),
    "prompt_empty": ({"prompt": ""}, 422),
    "prompt_blank": ({"prompt": "   \n\t"}, 422),
    "prompt_nul": ({"prompt": "a red\x00fox"}, 422),
    "prompt_too_long": ({"prompt": "x" * 2001}, 422),
    "body_too_large": ({"prompt": "x" * 70_000}, 413),
    "quality_unknown": ({"prompt": "a red fox", "quality": "ultra"}, 422),
    "quality_case": ({"prompt": "a red fox", "quality": "HD"}, 422),
    "quality_number": ({"prompt": "a red fox", "quality": 2}, 422),
    "quality_null": ({"prompt": "a red fox", "quality": None}, 422),
    "quality_sql": ({"prompt": "a red fox", "quality": "hd' or '1'='1"}, 422),
    "unknown_field": ({"prompt": "a red fox", "cost": 0}, 422),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(BAD_CREATES))
async def test_bad_input_is_4xx_and_writes_nothing(
    version: str, case: str, admin: asyncpg.Connection
) -> None:
    await device_user(admin)
    before = await fingerprint(admin)
    body, status = BAD_CREATES[case]
    response = await post(version, body)
    assert response.status == status
    assert response.body["error"] == "invalid_request"
    assert set(response.body) <= {"error", "message", "details"}
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("headers", "query"),
    [
        pytest.param({"Idempotency-Key": "k" * 201}, None, id="key_too_long"),
        pytest.param({"Idempotency-Key": "ключ"}, None, id="key_not_ascii"),
        pytest.param({"Idempotency-Key": " "}, None, id="key_blank"),
        pytest.param({}, {"quality": "hd"}, id="query_parameter"),
    ],
)
async def test_bad_headers_and_query_are_422_and_create_nobody(
    version: str, headers: dict[str, str], query: dict[str, str] | None, admin: asyncpg.Connection
) -> None:
    before = await fingerprint(admin)
    # a device seen for the first time: refused before it is created
    response = await post(version, {"prompt": "a red fox"}, {**device(DEVICE), **headers}, query)
    assert response.status == 422
    assert response.body["error"] == "invalid_request"
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_create_needs_an_identity(version: str, admin: asyncpg.Connection) -> None:
    before = await fingerprint(admin)
    for headers in ({}, {"X-Device-Id": "no"}):
        response = await post(version, {"prompt": "a red fox"}, headers)
        assert response.status == 401
    assert await fingerprint(admin) == before


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_linked_device_is_403_device_linked(version: str, admin: asyncpg.Connection) -> None:
    account = await db.insert_user(admin, clerk_id="user_owner")
    await device_user(admin)
    await admin.execute(
        "update users set linked_to_user_id = $1, linked_at = now() where device_id = $2", account, DEVICE
    )
    before = await fingerprint(admin)
    response = await post(version, {"prompt": "a red fox"})
    assert response.status == 403
    assert response.body["error"] == "device_linked"
    assert await fingerprint(admin) == before


# nothing listens on port 1: the connection is refused at once
UNREACHABLE = "postgresql://dreamlens@127.0.0.1:1/dreamlens"


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_database_that_is_down_is_503_applies_nothing_and_the_retry_succeeds(
    version: str, admin: asyncpg.Connection, schema: str, lambda_runtime: LambdaRuntime
) -> None:
    user_id = await device_user(admin)
    assert (await post(version, {"prompt": "warm up"})).status == 201  # the caller is cached
    before = await fingerprint(admin)
    config.configure(url=UNREACHABLE)
    await lambda_runtime.close_pool()  # the database went away with every connection
    headers = {**device(DEVICE), "Idempotency-Key": "retry-me"}
    down = await post(version, {"prompt": "a red fox"}, headers)
    assert down.status == 503
    assert down.body == {"error": "unavailable", "message": "Database unavailable"}
    assert int(down.headers["retry-after"]) >= 1
    assert await fingerprint(admin) == before

    config.configure(url=schema)  # back: no restart, the client retries with its key
    up = await post(version, {"prompt": "a red fox"}, headers)
    assert up.status == 201
    assert (await post(version, {"prompt": "a red fox"}, headers)).body == up.body
    assert len(await spends(admin, user_id)) == 2
    assert await db.audit_problems(admin) == []


# --------------------------------------------------------- GET /api/generations


async def five_generations(user_id: UUID) -> list[UUID]:
    made = []
    for n in range(5):
        created = await generations.create_generation(user_id, f"fox number {n}", "standard", f"key-{n}")
        made.append(created.generation.id)
    return made


@pytest.mark.parametrize("version", VERSIONS)
async def test_list_newest_first_in_pages(version: str, admin: asyncpg.Connection) -> None:
    user_id = await device_user(admin)
    made = await five_generations(user_id)
    await five_generations(await device_user(admin, OTHER_DEVICE))
    first = await get(version, "/api/generations", device(DEVICE), query={"limit": "2"})
    assert first.status == 200
    assert set(first.body) == {"items", "next_before"}
    assert all(set(item) == GENERATION_FIELDS for item in first.body["items"])
    seen = [item["id"] for item in first.body["items"]]
    cursor = first.body["next_before"]
    while cursor is not None:
        page = await get(version, "/api/generations", device(DEVICE), query={"limit": "2", "before": cursor})
        assert page.status == 200
        seen += [item["id"] for item in page.body["items"]]
        cursor = page.body["next_before"]
    assert seen == [str(generation_id) for generation_id in reversed(made)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_list_of_a_new_caller_is_empty(version: str) -> None:
    response = await get(version, "/api/generations", device(DEVICE))
    assert response.status == 200
    assert response.body == {"items": [], "next_before": None}


BAD_PAGES: dict[str, dict[str, Any]] = {
    "limit_zero": {"limit": "0"},
    "limit_over": {"limit": "101"},
    "limit_text": {"limit": "abc"},
    "before_not_uuid": {"before": "12"},
    "before_sql": {"before": "' or 1=1 --"},
    "unknown": {"status": "succeeded"},
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(BAD_PAGES))
async def test_bad_page_parameters_are_422_and_write_nothing(
    version: str, case: str, admin: asyncpg.Connection
) -> None:
    before = await fingerprint(admin)
    response = await get(version, "/api/generations", device(DEVICE), query=BAD_PAGES[case])
    assert response.status == 422
    assert response.body["error"] == "invalid_request"
    assert await fingerprint(admin) == before


# ---------------------------------------------------- GET /api/generations/{id}


@pytest.mark.parametrize("version", VERSIONS)
async def test_get_one_of_the_callers_generations(version: str, admin: asyncpg.Connection) -> None:
    user_id = await device_user(admin)
    created = await generations.create_generation(user_id, "a red fox", "hd", "key-1")
    await generations.claim_generations(1, 60, uuid.uuid4())
    await generations.record_result(created.generation.id, "failed", None, "the model fell over")
    response = await get(version, f"/api/generations/{created.generation.id}", device(DEVICE))
    assert response.status == 200
    body = response.body
    assert set(body) == GENERATION_FIELDS
    assert (body["id"], body["status"], body["cost"], body["attempt"]) == (
        str(created.generation.id),
        "failed",
        2,
        1,
    )
    assert (body["image_key"], body["error"]) == (None, "the model fell over")
    assert body["finished_at"] is not None


@pytest.mark.parametrize("version", VERSIONS)
async def test_another_users_generation_is_404(version: str, admin: asyncpg.Connection) -> None:
    owner = await device_user(admin, OTHER_DEVICE)
    created = await generations.create_generation(owner, "a red fox", "standard", "key-1")
    await device_user(admin)
    response = await get(version, f"/api/generations/{created.generation.id}", device(DEVICE))
    assert response.status == 404
    assert response.body == {"error": "not_found", "message": "Generation not found"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "generation_id",
    ["not-a-uuid", "12345", "' or 1=1 --", "0b7d3a52-6a43-4c8e-9a55", str(uuid.uuid4())],
)
async def test_a_malformed_or_unknown_id_is_404(version: str, generation_id: str) -> None:
    response = await get(version, f"/api/generations/{generation_id}", device(DEVICE))
    assert response.status == 404
    assert response.body["error"] == "not_found"


# ------------------------------------------- POST /api/generations/{id}/download

KEY = "images/2026/fox.png"


@pytest.fixture
def images(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A moto S3 with the images bucket holding one image."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("IMAGES_BUCKET", BUCKET)
    settings.reset()
    generations_function.forget_s3_client()
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        s3.put_object(Bucket=BUCKET, Key=KEY, Body=b"\x89PNG fox")
        yield s3
    generations_function.forget_s3_client()


async def succeeded(user_id: UUID, key: str = "gen-1", image_key: str = KEY) -> UUID:
    created = await generations.create_generation(user_id, "a red fox", "standard", key)
    await generations.record_result(created.generation.id, "succeeded", image_key, None)
    return created.generation.id


async def downloads(admin: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await admin.fetch(
        "select user_id, host(source_ip) as ip, reference from usage_logs where action = 'download'"
    )
    return [dict(row) for row in rows]


@pytest.mark.parametrize("version", VERSIONS)
async def test_download_gives_a_presigned_url_and_logs_it(
    version: str, images: Any, admin: asyncpg.Connection
) -> None:
    user_id = await device_user(admin)
    generation_id = await succeeded(user_id)
    response = await download(version, generation_id, device(DEVICE), source_ip="203.0.113.5/32")
    assert response.status == 200
    assert set(response.body) == {"url", "expires_in"}
    assert response.body["expires_in"] == 900
    url = urlsplit(response.body["url"])
    assert url.scheme == "https"
    assert BUCKET in url.netloc + url.path
    assert url.path.endswith("/" + KEY)
    signed = parse_qs(url.query)
    assert signed["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert signed["X-Amz-Expires"] == ["900"]
    assert signed["X-Amz-Credential"][0].endswith(f"/{REGION}/s3/aws4_request")
    # the URL fetches the image itself
    fetched = requests.get(response.body["url"], timeout=10)
    assert (fetched.status_code, fetched.content) == (200, b"\x89PNG fox")
    assert await downloads(admin) == [
        {"user_id": user_id, "ip": "203.0.113.5", "reference": str(generation_id)}
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("state", ["pending", "processing", "failed"])
async def test_download_of_an_unfinished_or_failed_generation_is_409(
    version: str, state: str, images: Any, admin: asyncpg.Connection
) -> None:
    user_id = await device_user(admin)
    created = await generations.create_generation(user_id, "a red fox", "standard", "key-1")
    if state != "pending":
        await generations.claim_generations(1, 60, uuid.uuid4())
    if state == "failed":
        await generations.record_result(created.generation.id, "failed", None, "no")
    response = await download(version, created.generation.id, device(DEVICE))
    assert response.status == 409
    assert response.body["error"] == "conflict"
    assert await downloads(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_download_of_another_users_generation_is_404(
    version: str, images: Any, admin: asyncpg.Connection
) -> None:
    generation_id = await succeeded(await device_user(admin, OTHER_DEVICE))
    await device_user(admin)
    for target in (generation_id, "not-a-uuid", uuid.uuid4()):
        response = await download(version, target, device(DEVICE))
        assert response.status == 404
        assert response.body["error"] == "not_found"
    assert await downloads(admin) == []


async def test_the_s3_client_is_built_once_per_process(
    images: Any, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    user_id = await device_user(admin)
    generation_id = await succeeded(user_id)
    capture_requests(caplog)
    assert (await download("v2", generation_id, device(DEVICE))).status == 200
    client = generations_function.s3_client()
    assert (await download("v2", generation_id, device(DEVICE))).status == 200
    assert generations_function.s3_client() is client
    assert len(await downloads(admin)) == 2
    # warm: identity cached (0), the generation (1) and the usage row (1)
    assert round_trips(caplog) == [db.trips(3), db.trips(2)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_download_repeated_with_its_key_is_logged_once(
    version: str, images: Any, admin: asyncpg.Connection
) -> None:
    user_id = await device_user(admin)
    generation_id = await succeeded(user_id)
    keyed = {**device(DEVICE), "Idempotency-Key": "download-1"}
    first = await download(version, generation_id, keyed)
    again = await download(version, generation_id, keyed)
    assert first.status == again.status == 200
    assert urlsplit(again.body["url"]).path == urlsplit(first.body["url"]).path
    assert len(await downloads(admin)) == 1
    assert (
        await download(version, generation_id, {**device(DEVICE), "Idempotency-Key": "download-2"})
    ).status == 200
    assert len(await downloads(admin)) == 2
    keys = await admin.fetch("select idempotency_key from usage_logs where action = 'download'")
    assert sorted(row["idempotency_key"] for row in keys) == ["download-1", "download-2"]


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_download_with_a_bad_key_is_422_and_logs_nothing(
    version: str, images: Any, admin: asyncpg.Connection
) -> None:
    generation_id = await succeeded(await device_user(admin))
    before = await fingerprint(admin)
    response = await download(version, generation_id, {**device(DEVICE), "Idempotency-Key": "a,b"})
    assert response.status == 422
    assert response.body["error"] == "invalid_request"
    assert await fingerprint(admin) == before


def test_boto3_is_not_imported_with_the_function() -> None:
    """Every import is paid at cold start: boto3 only on the download path."""
    code = "import sys, functions.generations; print('boto3' in sys.modules, 'botocore' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


async def test_download_without_images_bucket_is_a_logged_500(
    images: Any, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A deployment without IMAGES_BUCKET is the operator's to fix: 500, the cause logged."""
    monkeypatch.delenv("IMAGES_BUCKET")
    settings.reset()
    generation_id = await succeeded(await device_user(admin))
    response = await download("v2", generation_id, device(DEVICE))
    assert response.status == 500
    assert response.body == {"error": "internal", "message": "Internal server error"}
    assert any("IMAGES_BUCKET" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert await downloads(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_download_takes_no_query_parameters(
    version: str, images: Any, admin: asyncpg.Connection
) -> None:
    generation_id = await succeeded(await device_user(admin))
    before = await fingerprint(admin)
    response = await download(version, generation_id, device(DEVICE), query={"expires": "999999"})
    assert response.status == 422
    assert await fingerprint(admin) == before
