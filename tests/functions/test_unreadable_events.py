"""Inputs that once got a 500, or no HTTP answer at all (an exception out
of handler() is a failed invocation, which API Gateway answers with a bare
500 of its own), or wrote a new user for a 404. Each is a clear 4xx JSON
error now and writes nothing (functions/lambda_entry.py, functions/http.py,
the lookups by id in functions/generations.py and functions/payments.py)."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from database import InvalidRequest
from functions import generations, payments, settings, user, worker
from functions.http import refuse_nul
from tests.functions.callers import clerk, fingerprint, use_clerk
from tests.functions.lambda_events import EVENT_BUILDERS, Invocation, invoke, v2_event

VERSIONS = sorted(EVENT_BUILDERS)
SECRET = "callback-secret-for-fuzz-findings"


async def answer(handler: Any, event: dict[str, Any]) -> Invocation:
    """The handler's HTTP answer. An exception out of handler() is a failed
    Lambda invocation: API Gateway then answers a bare 500
    `{"message": "Internal Server Error"}` (not the API's error body)."""
    try:
        return await invoke(handler, event)
    except Exception as exc:
        pytest.fail(f"handler raised {type(exc).__name__}: {exc} -> API Gateway answers a bare 500")


def assert_json_4xx(response: Invocation) -> None:
    assert 400 <= response.status < 500, (response.status, response.body)
    assert isinstance(response.body, dict) and response.body.get("error") == "invalid_request", response.body


# ------------------------------------------------------------------
# A body of ~1,000 nested arrays with an escaped NUL at the bottom: Python
# 3.12's parser (the Lambda runtime, serverless.yml) reads it, and the walk
# for NUL recursed once per level in Python frames (limit 1,000): a
# RecursionError, a 500. On 3.11, which the tests run on, the parser refuses
# first; the walk itself is tested on a deeper document below.


def test_the_walk_for_nul_goes_deeper_than_the_interpreters_frames() -> None:
    document: Any = "a\x00cat"
    for _ in range(5_000):
        document = [document]
    with pytest.raises(InvalidRequest) as refused:
        refuse_nul(b"\\u0000", {"prompt": document})
    assert refused.value.details is not None
    assert refused.value.details[0]["loc"] == ["prompt", *[0] * 5_000]


def test_the_walk_for_nul_names_the_first_field_holding_one_in_document_order() -> None:
    document = {"style": "plain", "tags": ["ok", {"x\x00": "y"}], "prompt": "a\x00cat"}
    with pytest.raises(InvalidRequest) as refused:
        refuse_nul(b"\\u0000", document)
    assert refused.value.details is not None
    assert refused.value.details[0]["loc"] == ["tags", 1, "x\x00"]


NESTED_NUL = '{"prompt": ' + "[" * 1100 + '"\\u0000"' + "]" * 1100 + "}"

READ_JSON_ENDPOINTS = {
    "create_generation": (generations.handler, "/api/generations", "device"),
    "link_device": (user.handler, "/api/user/link-device", "clerk"),
    "create_payment": (payments.handler, "/api/payments", "device"),
    "worker_claim": (worker.handler, "/api/worker/claim", "worker"),
    "worker_result": (worker.handler, f"/api/generations/{uuid.uuid4()}/result", "worker"),
}


@pytest.mark.parametrize("endpoint", sorted(READ_JSON_ENDPOINTS))
async def test_deeply_nested_body_holding_a_nul_is_a_4xx_not_a_500(
    endpoint: str, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_clerk(monkeypatch)
    monkeypatch.setenv("GENERATION_CALLBACK_SECRET", SECRET)
    settings.reset()
    handler, path, who = READ_JSON_ENDPOINTS[endpoint]
    headers = {
        "device": {"X-Device-Id": "device_fuzz_nested"},
        "clerk": clerk("user_fuzz_nested"),
        "worker": {"X-Callback-Secret": SECRET},
    }[who]
    before = await fingerprint(admin)
    response = await answer(handler, v2_event("POST", path, headers=headers, body=NESTED_NUL))
    assert_json_4xx(response)
    assert await fingerprint(admin) == before


# ------------------------------------------------------------------
# X-Forwarded-Port holding a list ("443,80": a client's own
#    X-Forwarded-Port appended to API Gateway's, Kludex/mangum#303) or a
#    non-number: Mangum's get_server_and_port() does int(port) while building
#    the scope, before the app (and its RequestLog "last line of defence")
#    runs -> ValueError out of handler() -> Lambda error -> bare 500.
#    Same for a Host whose port part is not one integer (an IPv6 literal).


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "header",
    [
        {"X-Forwarded-Port": "443,80"},
        {"X-Forwarded-Port": "https"},
        {"Host": "[::1]:443"},
        {"Host": "api.dreamlens.example:abc"},
    ],
    ids=["xfp_list", "xfp_word", "host_ipv6", "host_port_word"],
)
async def test_odd_forwarded_port_or_host_is_answered_not_a_failed_invocation(
    version: str, header: dict[str, str]
) -> None:
    event = EVENT_BUILDERS[version]("GET", "/api/packages", headers=header)
    response = await answer(payments.handler, event)
    # the request is fine otherwise: the catalogue (or at worst a 4xx JSON error)
    assert response.status < 500 and isinstance(response.body, dict), (response.status, response.body)


# ------------------------------------------------------------------
# isBase64Encoded true with a body that is not base64: Mangum's
#    maybe_encode_body() -> base64.b64decode raises binascii.Error out of
#    handler() -> bare 500 instead of 400 invalid_request.


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("body", ["abc", "not*base64!"], ids=["bad_padding", "bad_length"])
async def test_invalid_base64_body_is_a_400(version: str, body: str, admin: asyncpg.Connection) -> None:
    event = EVENT_BUILDERS[version]("POST", "/api/generations", headers={"X-Device-Id": "device_fuzz_b64"})
    event.update(body=body, isBase64Encoded=True)
    before = await fingerprint(admin)
    response = await answer(generations.handler, event)
    assert_json_4xx(response)
    assert await fingerprint(admin) == before


# ------------------------------------------------------------------
# HTTP API (v2) events missing keys the fixture happens to carry:
#    `headers: null`, no requestContext.http.sourceIp, `rawQueryString: null`
#    -> AttributeError / KeyError in Mangum's HTTPGateway.scope, out of
#    handler(). The app copes with a missing source IP (identity.source_ip
#    returns None); the adapter did not get that far.


def _no_headers(event: dict[str, Any]) -> None:
    event["headers"] = None


def _no_source_ip(event: dict[str, Any]) -> None:
    del event["requestContext"]["http"]["sourceIp"]


def _null_raw_query(event: dict[str, Any]) -> None:
    event["rawQueryString"] = None


@pytest.mark.parametrize(
    "change",
    [_no_headers, _no_source_ip, _null_raw_query],
    ids=["headers_null", "no_source_ip", "raw_query_null"],
)
async def test_v2_event_without_optional_keys_is_answered(change: Any) -> None:
    event = v2_event("GET", "/api/packages")
    change(event)
    response = await answer(payments.handler, event)
    assert response.status < 500 and isinstance(response.body, dict), (response.status, response.body)


# ------------------------------------------------------------------
# A first-seen caller asking for a generation or payment by an id
#    that is not theirs gets 404. It used to write a new user first, with
#    its wallet, the welcome-bonus ledger row and a signup usage row (which
#    counts against ANON_SIGNUPS_PER_IP_PER_HOUR); a caller never seen owns
#    nothing, so these lookups take identity.known_user().


@pytest.mark.parametrize(
    "handler, method, path",
    [
        (generations.handler, "GET", f"/api/generations/{uuid.uuid4()}"),
        (generations.handler, "POST", f"/api/generations/{uuid.uuid4()}/download"),
        (payments.handler, "GET", f"/api/payments/{uuid.uuid4()}"),
    ],
    ids=["get_generation", "download", "get_payment"],
)
async def test_a_404_for_a_first_seen_caller_writes_nothing(
    handler: Any, method: str, path: str, admin: asyncpg.Connection
) -> None:
    before = await fingerprint(admin)
    response = await answer(
        handler, v2_event(method, path, headers={"X-Device-Id": "device_fuzz_first_seen"})
    )
    assert response.status == 404 and response.body["error"] == "not_found", response.body
    assert await fingerprint(admin) == before


# ------------------------------------------------------------------
# Only the reading of an event is tried again on a repaired copy: were a
# failure after the app ran taken for an unreadable event, the app would run
# twice, and a spend sent without an Idempotency-Key would be made twice.


async def test_a_failure_after_the_app_ran_does_not_run_it_again(
    admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mangum.handlers.api_gateway import HTTPGateway

    def answer_lost(self: Any, response: Any) -> Any:
        raise ValueError("the answer could not be built")

    # Mangum failing to build the Lambda response, after the app has answered
    monkeypatch.setattr(HTTPGateway, "__call__", answer_lost)
    event = v2_event(
        "POST", "/api/generations", headers={"X-Device-Id": "device_fuzz_once"}, body={"prompt": "a fox"}
    )
    with pytest.raises(ValueError):
        await invoke(generations.handler, event)

    user_id = await admin.fetchval("select id from users where device_id = 'device_fuzz_once'")
    assert await admin.fetchval("select count(*) from generations where user_id = $1", user_id) == 1
    spends = await admin.fetchval(
        "select count(*) from token_transactions where user_id = $1 and type = 'spend'", user_id
    )
    assert spends == 1
