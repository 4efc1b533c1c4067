"""build_app(): errors as the API's JSON bodies, the body limit, input
validation and the request log line, all through `handler(event, context)`
with REST (v1) and HTTP API (v2) events."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Literal
from uuid import UUID

import pytest
from mangum import Mangum
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database import (
    ConfigurationError,
    Conflict,
    DatabaseUnavailable,
    DeviceLinked,
    Forbidden,
    InsufficientTokens,
    InvalidRequest,
    NotFound,
    ProviderUnavailable,
    RateLimited,
    Unauthorized,
    sql,
)
from functions import settings
from functions.app import build_app
from functions.http import (
    MAX_DETAILS,
    RequestModel,
    idempotency_key,
    json_response,
    page_params,
    read_json,
)
from tests.functions.lambda_events import EVENT_BUILDERS, invoke

SOME_USER = UUID("0b7d3a52-6a43-4c8e-9a55-2f9f0c1e5d11")


class Echo(RequestModel):
    prompt: str = Field(max_length=100)
    quality: Literal["standard", "hd"] = "standard"
    count: int = 1


ERRORS: dict[str, tuple[Callable[[], Exception], int, dict[str, Any]]] = {
    "unauthorized": (
        lambda: Unauthorized("Who are you?"),
        401,
        {"error": "unauthorized", "message": "Who are you?"},
    ),
    "forbidden": (lambda: Forbidden("Not yours"), 403, {"error": "forbidden", "message": "Not yours"}),
    "device_linked": (
        lambda: DeviceLinked("This device now belongs to an account"),
        403,
        {"error": "device_linked", "message": "This device now belongs to an account"},
    ),
    "not_found": (
        lambda: NotFound("No such generation"),
        404,
        {"error": "not_found", "message": "No such generation"},
    ),
    "conflict": (lambda: Conflict("Already exists"), 409, {"error": "conflict", "message": "Already exists"}),
    "invalid_request": (
        lambda: InvalidRequest(
            "Bad quality", details=[{"loc": ["quality"], "msg": "unknown", "type": "enum"}]
        ),
        422,
        {
            "error": "invalid_request",
            "message": "Bad quality",
            "details": [{"loc": ["quality"], "msg": "unknown", "type": "enum"}],
        },
    ),
    "database_refused": (
        lambda: InvalidRequest("The database refused the value"),
        422,
        {"error": "invalid_request", "message": "The database refused the value"},
    ),
    "insufficient_tokens": (
        lambda: InsufficientTokens(balance=1, cost=2),
        402,
        {
            "error": "insufficient_tokens",
            "message": "Not enough tokens: balance 1, cost 2",
            "balance": 1,
            "cost": 2,
        },
    ),
    "rate_limited": (
        lambda: RateLimited("Daily limit reached", retry_after=3600),
        429,
        {"error": "rate_limited", "message": "Daily limit reached"},
    ),
    "database_unavailable": (
        lambda: DatabaseUnavailable(),
        503,
        {"error": "unavailable", "message": "Database unavailable"},
    ),
    "provider_unavailable": (
        lambda: ProviderUnavailable(),
        503,
        {"error": "unavailable", "message": "Payment provider unavailable"},
    ),
    "configuration": (
        lambda: ConfigurationError("YOOKASSA_SECRET_KEY is not set"),
        500,
        {"error": "internal", "message": "Internal server error"},
    ),
}
RETRY_AFTER = {"rate_limited": "3600", "database_unavailable": "1", "provider_unavailable": "5"}


async def raise_error(request: Request) -> Response:
    raise ERRORS[request.path_params["name"]][0]()


async def echo(request: Request) -> Response:
    return json_response(await read_json(request, Echo), status=201)


async def ignore_body(request: Request) -> Response:
    return json_response({"ok": True})


async def boom(request: Request) -> Response:
    raise RuntimeError("connection string postgres://admin:hunter2@db")


async def page(request: Request) -> Response:
    limit, before = page_params(request, cursor=int)
    return json_response({"limit": limit, "before": before})


async def uuid_page(request: Request) -> Response:
    limit, before = page_params(request, cursor=UUID)
    return json_response({"limit": limit, "before": before})


async def idempotent(request: Request) -> Response:
    return json_response({"key": idempotency_key(request)})


async def item(request: Request) -> Response:
    request.state.user_id = SOME_USER
    await sql.fetchval("select 1")
    await sql.fetchval("select 2")
    return json_response({"id": request.path_params["item_id"]})


routes = [
    Route("/test/errors/{name}", raise_error, methods=["GET"]),
    Route("/test/echo", echo, methods=["POST"]),
    Route("/test/ignore", ignore_body, methods=["POST"]),
    Route("/test/boom", boom, methods=["GET"]),
    Route("/test/page", page, methods=["GET"]),
    Route("/test/uuid-page", uuid_page, methods=["GET"]),
    Route("/test/idempotent", idempotent, methods=["POST"]),
    Route("/test/items/{item_id:uuid}", item, methods=["GET"]),
]
app = build_app(routes)
handler = Mangum(app, lifespan="off")

VERSIONS = sorted(EVENT_BUILDERS)


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "dreamlens.request"]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(ERRORS))
async def test_every_project_error_has_its_status_and_exact_body(version: str, name: str) -> None:
    _, status, body = ERRORS[name]
    response = await invoke(handler, EVENT_BUILDERS[version]("GET", f"/test/errors/{name}"))
    assert response.status == status
    assert response.body == body
    assert response.headers["content-type"] == "application/json"
    if name in RETRY_AFTER:
        assert response.headers["retry-after"] == RETRY_AFTER[name]
    else:
        assert "retry-after" not in response.headers


@pytest.mark.parametrize("version", VERSIONS)
async def test_unauthorized_names_the_scheme(version: str) -> None:
    response = await invoke(handler, EVENT_BUILDERS[version]("GET", "/test/errors/unauthorized"))
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("version", VERSIONS)
async def test_unknown_route_is_a_json_404(version: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    response = await invoke(handler, EVENT_BUILDERS[version]("GET", "/api/nothing-here"))
    assert response.status == 404
    assert response.body == {"error": "not_found", "message": "Not Found"}
    [line] = request_lines(caplog)
    assert (line["route"], line["status"], line["error"]) == (None, 404, "not_found")


@pytest.mark.parametrize("version", VERSIONS)
async def test_wrong_method_is_a_json_405_with_allow(version: str) -> None:
    response = await invoke(handler, EVENT_BUILDERS[version]("DELETE", "/test/echo"))
    assert response.status == 405
    assert response.body == {"error": "invalid_request", "message": "Method Not Allowed"}
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_405_names_every_method_of_a_path_served_by_two_routes(version: str) -> None:
    from functions import generations

    response = await invoke(generations.handler, EVENT_BUILDERS[version]("DELETE", "/api/generations"))
    assert response.status == 405
    assert response.body == {"error": "invalid_request", "message": "Method Not Allowed"}
    assert response.headers["allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_bug_is_a_500_that_leaks_nothing_and_is_logged_once(
    version: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = await invoke(handler, EVENT_BUILDERS[version]("GET", "/test/boom"))
    assert response.status == 500
    assert response.body == {"error": "internal", "message": "Internal server error"}
    errors = [r for r in caplog.records if r.name == "dreamlens.errors"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and "hunter2" in str(errors[0].exc_info[1])
    # Mangum saw a normal response, not an exception to log again
    assert not [r for r in caplog.records if r.name.startswith("mangum") and r.levelno >= logging.ERROR]
    [line] = request_lines(caplog)
    assert (line["status"], line["error"]) == (500, "internal")


# ------------------------------------------------------------- body limit


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", ["/test/echo", "/test/ignore"])
async def test_body_over_the_limit_with_content_length_is_413(version: str, path: str) -> None:
    body = {"prompt": "x" * (settings.DEFAULT_MAX_BODY_BYTES + 1)}
    response = await invoke(handler, EVENT_BUILDERS[version]("POST", path, body=body))
    assert response.status == 413
    assert response.body == {"error": "invalid_request", "message": "Request body is larger than 65536 bytes"}


@pytest.mark.parametrize("version", VERSIONS)
async def test_body_over_the_limit_without_content_length_is_413(version: str) -> None:
    body = {"prompt": "x" * (settings.DEFAULT_MAX_BODY_BYTES + 1)}
    event = EVENT_BUILDERS[version]("POST", "/test/echo", body=body, content_length=False)
    response = await invoke(handler, event)
    assert response.status == 413
    assert response.body["error"] == "invalid_request"


async def test_body_limit_comes_from_max_body_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_BODY_BYTES", "32")
    settings.reset()
    small = await invoke(handler, EVENT_BUILDERS["v2"]("POST", "/test/echo", body={"prompt": "hi"}))
    assert small.status == 201
    large = await invoke(handler, EVENT_BUILDERS["v2"]("POST", "/test/echo", body={"prompt": "x" * 40}))
    assert large.status == 413


async def test_streamed_body_is_cut_off_while_it_is_read() -> None:
    """No Content-Length, the body in chunks (a local server): refused as soon
    as the running total passes the limit, without reading the rest."""
    chunk = b"x" * 16 * 1024
    sent: list[dict[str, Any]] = []
    chunks_read = 0

    async def receive() -> dict[str, Any]:
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/test/echo",
        "raw_path": b"/test/echo",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("localhost", 8000),
        "scheme": "http",
        "root_path": "",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"] == "invalid_request"
    assert chunks_read == 5  # 5 x 16 KiB is the first total over 64 KiB


@pytest.mark.parametrize("version", VERSIONS)
async def test_malformed_content_length_is_400(version: str) -> None:
    event = EVENT_BUILDERS[version](
        "POST", "/test/echo", body={"prompt": "hi"}, headers={"Content-Length": "ten"}
    )
    response = await invoke(handler, event)
    assert response.status == 400
    assert response.body["error"] == "invalid_request"


# ----------------------------------------------------------------- input


@pytest.mark.parametrize("version", VERSIONS)
async def test_valid_body_is_read_into_the_model(version: str) -> None:
    body = {"prompt": "a red fox", "quality": "hd"}
    response = await invoke(handler, EVENT_BUILDERS[version]("POST", "/test/echo", body=body))
    assert response.status == 201
    assert response.body == {"prompt": "a red fox", "quality": "hd", "count": 1}


UNREADABLE: dict[str, str | bytes] = {
    "not_json": "prompt=hello",
    "truncated": '{"prompt": "hel',
    "not_utf8": b'{"prompt": "\xff\xfe"}',
    "array": '["prompt"]',
    "string": '"prompt"',
    "nan": '{"prompt": "x", "count": NaN}',
    "deep": "[" * 10_000,
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(UNREADABLE))
async def test_unreadable_body_is_400(version: str, case: str) -> None:
    response = await invoke(handler, EVENT_BUILDERS[version]("POST", "/test/echo", body=UNREADABLE[case]))
    assert response.status == 400
    assert response.body["error"] == "invalid_request"
    assert set(response.body) == {"error", "message"}


INVALID: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "wrong_type": ({"prompt": 5}, ["prompt"]),
    "wrong_enum": ({"prompt": "x", "quality": "ultra"}, ["quality"]),
    "unknown_field": ({"prompt": "x", "admin": True}, ["admin"]),
    "missing": ({"quality": "hd"}, ["prompt"]),
    "nul": ({"prompt": "a\x00b"}, ["prompt"]),
    "too_long": ({"prompt": "x" * 101}, ["prompt"]),
    "not_an_int": ({"prompt": "x", "count": "many"}, ["count"]),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(INVALID))
async def test_invalid_body_is_422_with_details(version: str, case: str) -> None:
    body, loc = INVALID[case]
    response = await invoke(handler, EVENT_BUILDERS[version]("POST", "/test/echo", body=body))
    assert response.status == 422
    assert response.body["error"] == "invalid_request"
    assert [detail["loc"] for detail in response.body["details"]] == [loc]
    assert set(response.body["details"][0]) == {"loc", "msg", "type"}


async def test_validation_details_never_echo_the_input() -> None:
    body = {"prompt": "my secret prompt " * 10}
    response = await invoke(handler, EVENT_BUILDERS["v2"]("POST", "/test/echo", body=body))
    assert response.status == 422
    assert "my secret prompt" not in json.dumps(response.body)


async def test_validation_details_are_bounded_for_a_body_of_many_unknown_keys() -> None:
    """Regression: a 422 listed one issue per unknown key, so 64 KiB of short
    keys came back as a ~550 KB answer, and with a raised MAX_BODY_BYTES as
    one over the 6 MB a Lambda may return (bad input ending as a failed
    invocation). At most MAX_DETAILS issues now."""
    body = "{" + ",".join(f'"k{n}":0' for n in range(6000)) + "}"
    response = await invoke(handler, EVENT_BUILDERS["v2"]("POST", "/test/echo", body=body))
    assert response.status == 422
    assert len(response.body["details"]) == MAX_DETAILS
    assert len(json.dumps(response.body)) < 4096


async def test_empty_body_reads_as_an_empty_object() -> None:
    response = await invoke(handler, EVENT_BUILDERS["v2"]("POST", "/test/echo", body=""))
    assert response.status == 422
    assert [detail["loc"] for detail in response.body["details"]] == [["prompt"]]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, {"limit": 50, "before": None}),
        ({"limit": "1"}, {"limit": 1, "before": None}),
        ({"limit": "100", "before": "12345"}, {"limit": 100, "before": 12345}),
    ],
)
async def test_page_params(version: str, query: dict[str, str], expected: dict[str, Any]) -> None:
    response = await invoke(handler, EVENT_BUILDERS[version]("GET", "/test/page", query=query))
    assert response.status == 200
    assert response.body == expected


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"before": "abc"}, "before"),
        ({"before": "99999999999999999999"}, "before"),
        ({"before": "9" * 4301}, "before"),  # past what int() converts
        ({"offset": "10"}, "offset"),
        ({"limit": ["10", "20"]}, "limit"),
    ],
)
async def test_bad_page_params_are_422(version: str, query: dict[str, Any], loc: str) -> None:
    response = await invoke(handler, EVENT_BUILDERS[version]("GET", "/test/page", query=query))
    assert response.status == 422
    assert response.body["error"] == "invalid_request"
    assert response.body["details"][0]["loc"] == ["query", loc]


async def test_uuid_cursor() -> None:
    cursor = "0b7d3a52-6a43-4c8e-9a55-2f9f0c1e5d11"
    ok = await invoke(handler, EVENT_BUILDERS["v2"]("GET", "/test/uuid-page", query={"before": cursor}))
    assert ok.body == {"limit": 50, "before": cursor}
    bad = await invoke(handler, EVENT_BUILDERS["v2"]("GET", "/test/uuid-page", query={"before": "12"}))
    assert bad.status == 422


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("key", "status"),
    [
        (None, 200),
        ("3f0c2a8e-6d1b-4f7a-9c55-1e2d3c4b5a69", 200),
        ("order 42 / retry", 200),
        ("k" * 200, 200),
        ("k" * 201, 422),
        ("ключ", 422),
        ("tab\there", 422),
        ("   ", 422),
    ],
)
async def test_idempotency_key(version: str, key: str | None, status: int) -> None:
    headers = {"Idempotency-Key": key} if key is not None else {}
    response = await invoke(handler, EVENT_BUILDERS[version]("POST", "/test/idempotent", headers=headers))
    assert response.status == status
    if status == 200:
        assert response.body == {"key": key}
    else:
        assert response.body["details"][0]["loc"] == ["header", "Idempotency-Key"]


# ------------------------------------------------------------- request log


@pytest.mark.parametrize("version", VERSIONS)
async def test_one_json_log_line_per_request_with_its_fields(
    version: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    item_id = "5f0f5cf2-3e8a-4c4b-8d63-1f1a2b3c4d5e"
    event = EVENT_BUILDERS[version]("GET", f"/test/items/{item_id}", request_id="req-abc-123")
    response = await invoke(handler, event)
    assert response.status == 200
    assert response.headers["x-request-id"] == "req-abc-123"
    lines = request_lines(caplog)
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "req-abc-123"
    assert line["method"] == "GET"
    assert line["route"] == "/test/items/{item_id:uuid}"
    assert line["status"] == 200
    assert line["duration_ms"] >= 0
    assert line["db_statements"] == 2
    assert line["db_round_trips"] >= 2
    assert line["db_ms"] > 0
    assert line["user_id"] == str(SOME_USER)
    assert item_id not in json.dumps(line)


async def test_log_line_falls_back_to_the_lambda_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    event = EVENT_BUILDERS["v2"]("GET", "/test/page")
    del event["requestContext"]["requestId"]
    response = await invoke(handler, event)
    line = request_lines(caplog)[0]
    assert line["request_id"] == response.headers["x-request-id"]
    assert len(line["request_id"]) == 36  # the fake context's aws_request_id


@pytest.mark.parametrize("version", VERSIONS)
async def test_log_line_of_an_error_names_its_code(version: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    await invoke(handler, EVENT_BUILDERS[version]("GET", "/test/errors/insufficient_tokens"))
    await invoke(handler, EVENT_BUILDERS[version]("POST", "/test/echo", body="{"))
    first, second = request_lines(caplog)
    assert (first["status"], first["error"], first["route"]) == (
        402,
        "insufficient_tokens",
        "/test/errors/{name}",
    )
    assert (second["status"], second["error"]) == (400, "invalid_request")


@pytest.mark.parametrize("version", VERSIONS)
async def test_nothing_secret_reaches_any_log(version: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {
        "Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyXzEyMyJ9.c2lnbmF0dXJl",
        "X-Device-Id": "device-secret-0123456789",
        "X-Init-Secret": "init-secret-value-42",
        "X-Callback-Secret": "callback-secret-value-43",
    }
    body = {"prompt": "a very private prompt"}
    await invoke(handler, EVENT_BUILDERS[version]("POST", "/test/echo", headers=secrets, body=body))
    await invoke(handler, EVENT_BUILDERS[version]("GET", "/test/boom", headers=secrets))
    assert len(request_lines(caplog)) == 2
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    for value in [*secrets.values(), "eyJhbGciOiJSUzI1NiJ9", "a very private prompt"]:
        assert value not in logged


class TimeLeft:
    def __init__(self, milliseconds: int) -> None:
        self.milliseconds = milliseconds

    def get_remaining_time_in_millis(self) -> int:
        return self.milliseconds


def test_the_database_budget_is_the_invocations_time_left_less_a_reserve_for_the_answer() -> None:
    from functions.app import database_budget

    assert database_budget({"aws.context": TimeLeft(4_000)}) == 3.0
    assert database_budget({"aws.context": TimeLeft(1_200)}) == 0.5  # never below the minimum
    assert database_budget({}) is None  # not in Lambda: only the configured timeouts
