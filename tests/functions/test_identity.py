"""Identity: Clerk session tokens verified locally, device ids, the caller's
source IP, and the glue that turns them into a user (with its 30 s cache).

Callers are resolved by the real users repository on the real database;
what identity adds is asserted on what the database holds and on the round
trips each request's log line counted (the warm cache costs none).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from mangum import Mangum
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database import Unauthorized
from functions import identity, settings
from functions.app import build_app
from functions.http import json_response
from repositories import users
from tests import db
from tests.functions.lambda_events import EVENT_BUILDERS, Invocation, invoke

ISSUER = "https://clerk.dreamlens.example"
VERSIONS = sorted(EVENT_BUILDERS)


def _key_pair() -> tuple[rsa.RSAPrivateKey, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, pem


@pytest.fixture(scope="module")
def clerk_key() -> tuple[rsa.RSAPrivateKey, str]:
    return _key_pair()


@pytest.fixture(scope="module")
def foreign_key() -> tuple[rsa.RSAPrivateKey, str]:
    return _key_pair()


@pytest.fixture
def clerk(monkeypatch: pytest.MonkeyPatch, clerk_key: tuple[rsa.RSAPrivateKey, str]) -> rsa.RSAPrivateKey:
    """Clerk configured with this test's key pair; returns the signing key."""
    monkeypatch.setenv("CLERK_JWT_KEY", clerk_key[1])
    monkeypatch.delenv("CLERK_ISSUER", raising=False)
    monkeypatch.delenv("CLERK_AUTHORIZED_PARTIES", raising=False)
    settings.reset()
    return clerk_key[0]


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "user_2abcDEF",
        "iss": ISSUER,
        "azp": "https://app.dreamlens.example",
        "iat": now - 10,
        "nbf": now - 10,
        "exp": now + 60,
        "sid": "sess_123",
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def sign(key: rsa.RSAPrivateKey, headers: dict[str, Any] | None = None, **changes: Any) -> str:
    return jwt.encode(claims(**changes), key, algorithm="RS256", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None = None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# ------------------------------------------------------- token verification


def test_valid_token_gives_its_claims(clerk: rsa.RSAPrivateKey) -> None:
    assert identity.verify_session_token(sign(clerk))["sub"] == "user_2abcDEF"


@pytest.mark.parametrize("form", ["escaped_newlines", "bare_base64", "surrounding_space"])
def test_pem_key_is_accepted_as_environments_carry_it(
    form: str, monkeypatch: pytest.MonkeyPatch, clerk_key: tuple[rsa.RSAPrivateKey, str]
) -> None:
    pem = clerk_key[1]
    if form == "escaped_newlines":
        value = pem.replace("\n", "\\n")
    elif form == "bare_base64":
        value = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    else:
        value = f"  {pem}  \n"
    monkeypatch.setenv("CLERK_JWT_KEY", value)
    settings.reset()
    assert identity.verify_session_token(sign(clerk_key[0]))["sub"] == "user_2abcDEF"


def test_small_clock_skew_is_tolerated(clerk: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    assert identity.verify_session_token(sign(clerk, exp=now - 2, nbf=now + 2, iat=now + 2))


def test_tampered_token_is_refused(clerk: rsa.RSAPrivateKey) -> None:
    header, payload, signature = sign(clerk).split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["sub"] = "user_someone_else"
    with pytest.raises(Unauthorized):
        identity.verify_session_token(f"{header}.{b64(json.dumps(forged).encode())}.{signature}")


# times relative to when the test runs, not to when the suite was collected:
# a whole-suite run takes minutes, and "now + 60" would be past by then
@pytest.mark.parametrize(
    "changes",
    [
        pytest.param(lambda now: {"exp": now - 60}, id="expired"),
        pytest.param(lambda now: {"nbf": now + 60}, id="not_yet_valid"),
        pytest.param(lambda now: {"exp": None}, id="no_exp"),
        pytest.param(lambda now: {"sub": None}, id="no_sub"),
        pytest.param(lambda now: {"sub": 12345}, id="sub_not_a_string"),
        pytest.param(lambda now: {"sub": ""}, id="empty_sub"),
    ],
)
def test_invalid_claims_are_refused(
    clerk: rsa.RSAPrivateKey, changes: Callable[[int], dict[str, Any]]
) -> None:
    with pytest.raises(Unauthorized):
        identity.verify_session_token(sign(clerk, **changes(int(time.time()))))


def test_issuer_is_checked_when_configured(clerk: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLERK_ISSUER", ISSUER)
    settings.reset()
    assert identity.verify_session_token(sign(clerk))
    with pytest.raises(Unauthorized):
        identity.verify_session_token(sign(clerk, iss="https://evil.example"))
    with pytest.raises(Unauthorized):
        identity.verify_session_token(sign(clerk, iss=None))


def test_authorized_parties_are_checked_when_configured(
    clerk: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLERK_AUTHORIZED_PARTIES", "https://app.dreamlens.example, http://localhost:3000")
    settings.reset()
    assert identity.verify_session_token(sign(clerk))
    assert identity.verify_session_token(sign(clerk, azp="http://localhost:3000"))
    with pytest.raises(Unauthorized):
        identity.verify_session_token(sign(clerk, azp="https://evil.example"))
    # a native app's token has no azp: Clerk's own verification lets it pass
    assert identity.verify_session_token(sign(clerk, azp=None))
    # an azp that is not a string names no party: refused, not a 500
    for odd in (["http://localhost:3000"], {"origin": "http://localhost:3000"}, 3000):
        with pytest.raises(Unauthorized):
            identity.verify_session_token(sign(clerk, azp=odd))


def test_alg_none_is_refused(clerk: rsa.RSAPrivateKey) -> None:
    token = unsigned_token({"alg": "none", "typ": "JWT"}, claims())
    with pytest.raises(Unauthorized):
        identity.verify_session_token(token)


def test_hs256_signed_with_the_public_key_is_refused(
    clerk: rsa.RSAPrivateKey, clerk_key: tuple[rsa.RSAPrivateKey, str]
) -> None:
    """The classic key-confusion attack: the public PEM used as an HMAC secret."""
    token = unsigned_token({"alg": "HS256", "typ": "JWT"}, claims(), secret=clerk_key[1].encode())
    with pytest.raises(Unauthorized):
        identity.verify_session_token(token)


def test_token_from_a_foreign_key_is_refused(
    clerk: rsa.RSAPrivateKey, foreign_key: tuple[rsa.RSAPrivateKey, str]
) -> None:
    token = sign(foreign_key[0], headers={"kid": "ins_foreign"})
    with pytest.raises(Unauthorized):
        identity.verify_session_token(token)


@pytest.mark.parametrize(
    "token",
    ["garbage", "a.b.c", "..", "eyJ.eyJ.sig", "x" * 9000, "é.é.é", "a.b", "Bearer"],
)
def test_garbage_is_refused(clerk: rsa.RSAPrivateKey, token: str) -> None:
    with pytest.raises(Unauthorized):
        identity.verify_session_token(token)


# no deadline: a scheduling stall on a loaded machine is not a failure
@hypothesis_settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    token=st.text(max_size=300)
    | st.from_regex(r"[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-]{0,60}")
)
def test_no_token_is_anything_but_valid_or_unauthorized(clerk: rsa.RSAPrivateKey, token: str) -> None:
    with pytest.raises(Unauthorized):
        identity.verify_session_token(token)


# ------------------------------------------- users (the real repository)


async def whoami(request: Request) -> Response:
    user = await identity.current_user(request)
    return json_response(
        {"id": user.id, "clerk_id": user.clerk_id, "device_id": user.device_id, "created": user.created}
    )


async def clerk_only(request: Request) -> Response:
    user = await identity.require_clerk_user(request)
    return json_response({"id": user.id})


async def caller_ip(request: Request) -> Response:
    return json_response({"ip": identity.source_ip(request)})


app = build_app(
    [
        Route("/test/whoami", whoami, methods=["GET"]),
        Route("/test/clerk-only", clerk_only, methods=["GET"]),
        Route("/test/ip", caller_ip, methods=["GET"]),
    ]
)
handler = Mangum(app, lifespan="off")

DEVICE = "device_ABC-123_xyz"


async def whoami_as(version: str, headers: dict[str, str], **event: Any) -> Invocation:
    return await invoke(handler, EVENT_BUILDERS[version]("GET", "/test/whoami", headers=headers, **event))


async def user_rows(admin: asyncpg.Connection) -> list[tuple[Any, ...]]:
    rows = await admin.fetch("select clerk_id, device_id, email from users order by created_at, id")
    return [tuple(row) for row in rows]


def request_round_trips(caplog: pytest.LogCaptureFixture) -> list[int]:
    """Round trips of each request so far, from its log line (the handler runs
    on the Lambda runtime's thread, where the line is counted and written)."""
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dreamlens.request"]
    return [line["db_round_trips"] for line in lines]


async def link_device_in_database(admin: asyncpg.Connection, device: str) -> None:
    """What link-device does in the database (the repository, not the endpoint)."""
    account = await db.insert_user(admin, clerk_id="user_owner")
    await users.link_device(account, device)


@pytest.mark.parametrize("version", VERSIONS)
async def test_valid_clerk_token_resolves_the_clerk_user(
    version: str, clerk: rsa.RSAPrivateKey, admin: asyncpg.Connection
) -> None:
    response = await whoami_as(version, {"Authorization": f"Bearer {sign(clerk, email='ann@example.com')}"})
    assert response.status == 200
    assert response.body["clerk_id"] == "user_2abcDEF"
    assert response.body["created"] is True
    assert await user_rows(admin) == [("user_2abcDEF", None, "ann@example.com")]
    assert response.body["id"] == str(await admin.fetchval("select id from users"))


@pytest.mark.parametrize("version", VERSIONS)
async def test_device_id_resolves_the_device_user_with_ip_and_limit(
    version: str, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANON_SIGNUPS_PER_IP_PER_HOUR", "7")
    settings.reset()
    response = await whoami_as(version, {"X-Device-Id": DEVICE})
    assert response.status == 200
    assert response.body["device_id"] == DEVICE
    assert await user_rows(admin) == [(None, DEVICE, None)]
    # the signup is counted against the address API Gateway saw
    ips = await admin.fetch("select host(source_ip) as ip from usage_logs where action = 'signup'")
    assert [row["ip"] for row in ips] == ["192.168.0.1"]
    # and the configured limit is the one applied: 6 more pass, the 8th is refused
    for n in range(6):
        assert (await whoami_as(version, {"X-Device-Id": f"device_more_{n:04d}"})).status == 200
    assert (await whoami_as(version, {"X-Device-Id": "device_over_the_limit"})).status == 429


async def test_default_signup_limit_is_five(admin: asyncpg.Connection) -> None:
    for n in range(5):
        assert (await whoami_as("v2", {"X-Device-Id": f"device_new_{n:04d}"})).status == 200
    assert (await whoami_as("v2", {"X-Device-Id": "device_one_too_many"})).status == 429
    assert len(await user_rows(admin)) == 5


@pytest.mark.parametrize("version", VERSIONS)
async def test_both_headers_mean_the_clerk_user(
    version: str, clerk: rsa.RSAPrivateKey, admin: asyncpg.Connection
) -> None:
    response = await whoami_as(version, {"Authorization": f"Bearer {sign(clerk)}", "X-Device-Id": DEVICE})
    assert response.body["clerk_id"] == "user_2abcDEF"
    assert await user_rows(admin) == [("user_2abcDEF", None, None)]


def bad_tokens(clerk: rsa.RSAPrivateKey, foreign: rsa.RSAPrivateKey, public_pem: str) -> dict[str, str]:
    now = int(time.time())
    valid = sign(clerk)
    header, payload, signature = valid.split(".")
    return {
        "tampered": f"{header}.{payload}x.{signature}",
        "expired": sign(clerk, exp=now - 60),
        "not_yet_valid": sign(clerk, nbf=now + 60),
        "alg_none": unsigned_token({"alg": "none"}, claims()),
        "hs256_public_key": unsigned_token({"alg": "HS256"}, claims(), secret=public_pem.encode()),
        "foreign_key": sign(foreign, headers={"kid": "ins_foreign"}),
        "garbage": "not-a-token",
    }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "case", ["tampered", "expired", "not_yet_valid", "alg_none", "hs256_public_key", "foreign_key", "garbage"]
)
async def test_bad_token_is_401_even_with_a_device_id(
    version: str,
    case: str,
    clerk: rsa.RSAPrivateKey,
    clerk_key: tuple[rsa.RSAPrivateKey, str],
    foreign_key: tuple[rsa.RSAPrivateKey, str],
    admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    token = bad_tokens(clerk, foreign_key[0], clerk_key[1])[case]
    response = await whoami_as(version, {"Authorization": f"Bearer {token}", "X-Device-Id": DEVICE})
    assert response.status == 401
    assert response.body["error"] == "unauthorized"
    assert await user_rows(admin) == []
    assert request_round_trips(caplog) == [db.trips(0)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_wrong_issuer_and_wrong_azp_are_401(
    version: str, clerk: rsa.RSAPrivateKey, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLERK_ISSUER", ISSUER)
    monkeypatch.setenv("CLERK_AUTHORIZED_PARTIES", "https://app.dreamlens.example")
    settings.reset()
    for token in (sign(clerk, iss="https://evil.example"), sign(clerk, azp="https://evil.example")):
        assert (await whoami_as(version, {"Authorization": f"Bearer {token}"})).status == 401
    assert await user_rows(admin) == []


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="neither"),
        pytest.param({"X-Device-Id": "short"}, id="device_too_short"),
        pytest.param({"X-Device-Id": "d" * 129}, id="device_too_long"),
        pytest.param({"X-Device-Id": "device id with spaces"}, id="device_spaces"),
        pytest.param({"X-Device-Id": "device/../../etc"}, id="device_slashes"),
        pytest.param({"X-Device-Id": ""}, id="device_empty"),
        pytest.param({"X-Device-Id": "device' or '1'='1"}, id="device_sql"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="basic_auth"),
        pytest.param({"Authorization": "Bearer "}, id="empty_bearer"),
        pytest.param({"Authorization": "Bearer", "X-Device-Id": DEVICE}, id="bearer_without_token"),
    ],
)
async def test_missing_or_malformed_identity_is_401(
    version: str, headers: dict[str, str], clerk: rsa.RSAPrivateKey, admin: asyncpg.Connection
) -> None:
    response = await whoami_as(version, headers)
    assert response.status == 401
    assert response.body["error"] == "unauthorized"
    assert await user_rows(admin) == []


async def test_clerk_without_a_configured_key_is_a_logged_500_not_a_pass(
    monkeypatch: pytest.MonkeyPatch,
    clerk_key: tuple[rsa.RSAPrivateKey, str],
    admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("CLERK_JWT_KEY", raising=False)
    settings.reset()
    response = await whoami_as("v2", {"Authorization": f"Bearer {sign(clerk_key[0])}"})
    assert response.status == 500
    assert any("CLERK_JWT_KEY" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert await user_rows(admin) == []


async def test_linked_device_is_403_device_linked(admin: asyncpg.Connection) -> None:
    await db.insert_user(admin, device_id=DEVICE)
    await link_device_in_database(admin, DEVICE)
    response = await whoami_as("v1", {"X-Device-Id": DEVICE})
    assert response.status == 403
    assert response.body["error"] == "device_linked"


async def test_signup_limit_is_429_with_retry_after(admin: asyncpg.Connection) -> None:
    # five signups from this address 59 minutes ago: the oldest leaves the
    # window in a minute
    await admin.execute(
        "insert into usage_logs (action, source_ip, created_at)"
        " select 'signup', '203.0.113.9', now() - interval '59 minutes' from generate_series(1, 5)"
    )
    response = await whoami_as("v2", {"X-Device-Id": DEVICE}, source_ip="203.0.113.9")
    assert response.status == 429
    assert response.body["error"] == "rate_limited"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert await user_rows(admin) == []
    # another address is not limited
    assert (await whoami_as("v2", {"X-Device-Id": DEVICE}, source_ip="203.0.113.10")).status == 200


async def test_require_clerk_user_refuses_a_device_alone(
    clerk: rsa.RSAPrivateKey, admin: asyncpg.Connection
) -> None:
    device_only = EVENT_BUILDERS["v2"]("GET", "/test/clerk-only", headers={"X-Device-Id": DEVICE})
    assert (await invoke(handler, device_only)).status == 401
    assert await user_rows(admin) == []
    signed_in = EVENT_BUILDERS["v2"](
        "GET", "/test/clerk-only", headers={"Authorization": f"Bearer {sign(clerk)}"}
    )
    assert (await invoke(handler, signed_in)).status == 200


async def test_identified_user_is_in_the_log_line_but_not_the_device_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    response = await whoami_as("v2", {"X-Device-Id": DEVICE})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dreamlens.request"]
    assert lines[0]["user_id"] == response.body["id"]
    assert DEVICE not in caplog.text


# ------------------------------------------------------------ identity cache


async def test_warm_repeat_caller_costs_no_round_trip(
    clerk: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    headers = {"Authorization": f"Bearer {sign(clerk)}"}
    first = await whoami_as("v2", headers)
    second = await whoami_as("v2", headers)
    assert first.body["id"] == second.body["id"]
    assert (first.body["created"], second.body["created"]) == (True, False)
    # get-or-create is one round trip; the warm repeat is served from the cache
    assert request_round_trips(caplog) == [db.trips(1), db.trips(0)]


async def test_cached_caller_expires_after_thirty_seconds(
    admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    await db.insert_user(admin, device_id=DEVICE)
    now = [1000.0]
    monkeypatch.setattr(identity, "clock", lambda: now[0])
    await whoami_as("v2", {"X-Device-Id": DEVICE})
    now[0] += 29
    await whoami_as("v2", {"X-Device-Id": DEVICE})
    now[0] += 2
    await whoami_as("v2", {"X-Device-Id": DEVICE})
    assert request_round_trips(caplog) == [db.trips(1), db.trips(0), db.trips(1)]


async def test_forget_identity_makes_a_linked_device_fail_at_once(admin: asyncpg.Connection) -> None:
    assert (await whoami_as("v2", {"X-Device-Id": DEVICE})).status == 200
    await link_device_in_database(admin, DEVICE)
    # the warm cache still answers for the device...
    assert (await whoami_as("v2", {"X-Device-Id": DEVICE})).status == 200
    identity.forget_identity(device_id=DEVICE)  # ...until link-device forgets it
    assert (await whoami_as("v2", {"X-Device-Id": DEVICE})).status == 403


async def test_refused_callers_are_not_cached(
    admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    await db.insert_user(admin, device_id=DEVICE)
    await link_device_in_database(admin, DEVICE)
    first = await whoami_as("v2", {"X-Device-Id": DEVICE})
    second = await whoami_as("v2", {"X-Device-Id": DEVICE})
    assert (first.status, second.status) == (403, 403)
    # each refusal asked the database again
    assert request_round_trips(caplog) == [db.trips(1), db.trips(1)]


# ----------------------------------------------------------------- source IP


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("192.168.0.1/32", "192.168.0.1"),
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::1/128", "2001:db8::1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("10.0.0.0/8", None),
        ("not-an-ip", None),
        ("", None),
    ],
)
async def test_source_ip_comes_from_the_request_context(
    version: str, source: str, expected: str | None
) -> None:
    event = EVENT_BUILDERS[version]("GET", "/test/ip", source_ip=source)
    assert (await invoke(handler, event)).body == {"ip": expected}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("header", ["X-Forwarded-For", "X-Real-Ip", "Forwarded", "True-Client-Ip"])
async def test_forged_forwarding_headers_never_change_the_source_ip(version: str, header: str) -> None:
    event = EVENT_BUILDERS[version]("GET", "/test/ip", headers={header: "6.6.6.6, 7.7.7.7"})
    assert (await invoke(handler, event)).body == {"ip": "192.168.0.1"}


def _local_request(client: tuple[str, int] | None, headers: list[tuple[bytes, bytes]]) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "client": client})


def test_outside_api_gateway_the_peer_address_is_used() -> None:
    forged = [(b"x-forwarded-for", b"6.6.6.6")]
    assert identity.source_ip(_local_request(("127.0.0.1", 50000), forged)) == "127.0.0.1"
    assert identity.source_ip(_local_request(None, forged)) is None
