"""Who gets in: forged session tokens, and forged forwarding headers.

Every forged or stale Clerk token is a 401 through the real handlers (API
Gateway payload 1.0 and 2.0) on the endpoints that create users and spend,
and writes nothing at all, not even with a valid device id beside it. A
client-written X-Forwarded-For, X-Real-IP or Forwarded never changes the
source address the webhook allowlist and the anonymous signup limit use:
not through API Gateway, and not over a real socket to the app served as
`dreamlens serve` serves it (uvicorn with proxy_headers off; a control run
with them on shows the test would catch the regression).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from functions import settings
from functions.fake_yookassa import FakeYooKassa
from repositories.audit import find_violations
from tests import db
from tests.functions.callers import clerk_key
from tests.functions.lambda_events import LambdaRuntime
from tests.reliability.abuse_support import (
    GATEWAY_SOURCE,
    VERSIONS,
    YOOKASSA_SOURCE,
    abuse_runtime,  # noqa: F401 (an autouse fixture)
    bearer,
    build_local_app,
    call,
    claims,
    close_pool_on_this_loop,
    close_provider_client,
    configure_provider,
    fingerprint,
    hand_made,
    payment_notification,
    running_fake,  # noqa: F401 (a fixture)
    serve_like_dreamlens,
    served,  # noqa: F401 (a fixture)
    signed,
    use_clerk,
)

ISSUER = "https://clerk.dreamlens.example"
PARTY = "https://app.dreamlens.example"
DEVICE = "device_abuse_0001"


@pytest.fixture(scope="module")
def foreign_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    import jwt

    public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**public, "kid": "ins_attacker"}


def forged_tokens(foreign: rsa.RSAPrivateKey) -> dict[str, str]:
    import time

    now = int(time.time())
    public_pem = clerk_key()[1]
    foreign_pem = (
        foreign.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return {
        "alg_none": hand_made({"alg": "none", "typ": "JWT"}, claims()),
        "alg_none_uppercase": hand_made({"alg": "None", "typ": "JWT"}, claims()),
        "hs256_with_public_key": hand_made({"alg": "HS256", "typ": "JWT"}, claims(), public_pem.encode()),
        "hs256_with_public_key_stripped": hand_made(
            {"alg": "HS256", "typ": "JWT"}, claims(), public_pem.strip().encode()
        ),
        "expired": signed(exp=now - 60, iat=now - 400, nbf=now - 400),
        "not_yet_valid": signed(nbf=now + 120),
        "no_expiry": signed(exp=None),
        "wrong_issuer": signed(iss="https://clerk.evil.example"),
        "no_issuer": signed(iss=None),
        "wrong_azp": signed(azp="https://evil.example"),
        # a key id (and key locations) that are not ours: never followed
        "foreign_kid": signed(headers={"kid": "ins_attacker"}, key=foreign),
        "foreign_jku": signed(
            headers={"kid": "ins_attacker", "jku": "https://evil.example/.well-known/jwks.json"}, key=foreign
        ),
        "foreign_embedded_jwk": signed(headers={"jwk": _jwk(foreign)}, key=foreign),
        "foreign_x5u": signed(headers={"x5u": "https://evil.example/cert.pem"}, key=foreign),
        "hs256_with_foreign_public_key": hand_made({"alg": "HS256"}, claims(), foreign_pem.encode()),
        "garbage": "not-a-token",
        "three_dots": "a.b.c",
        "empty_segments": "..",
        "truncated": signed().rsplit(".", 1)[0],
        "huge": "eyJ" + "A" * 20_000,
    }


CASES = [
    "alg_none",
    "alg_none_uppercase",
    "empty_segments",
    "expired",
    "foreign_embedded_jwk",
    "foreign_jku",
    "foreign_kid",
    "foreign_x5u",
    "garbage",
    "hs256_with_foreign_public_key",
    "hs256_with_public_key",
    "hs256_with_public_key_stripped",
    "huge",
    "no_expiry",
    "no_issuer",
    "not_yet_valid",
    "three_dots",
    "truncated",
    "wrong_azp",
    "wrong_issuer",
]

# (function, method, path, body): what a session token opens
ENDPOINTS = {
    "get_user": ("user", "GET", "/api/user", None),
    "create_generation": ("generations", "POST", "/api/generations", {"prompt": "a forged cat"}),
    "link_device": ("user", "POST", "/api/user/link-device", {"device_id": DEVICE}),
}


@pytest.fixture
def strict_clerk(monkeypatch: pytest.MonkeyPatch) -> None:
    use_clerk(monkeypatch, issuer=ISSUER, parties=PARTY)


async def test_the_valid_token_these_are_forged_from_is_accepted(
    strict_clerk: None, admin: asyncpg.Connection
) -> None:
    """The control: every refusal below is the token's, not the setup's."""
    response = await call("user", "GET", "/api/user", headers=bearer(signed()))
    assert response.status == 200
    assert response.body["clerk_id"] == "user_abuse_1"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
async def test_a_forged_or_stale_token_is_401_and_writes_nothing(
    version: str,
    endpoint: str,
    strict_clerk: None,
    foreign_key: rsa.RSAPrivateKey,
    admin: asyncpg.Connection,
) -> None:
    # the device exists (link-device could move it), and is sent alongside
    await db.insert_user(admin, device_id=DEVICE)
    before = await fingerprint(admin)
    function, method, path, body = ENDPOINTS[endpoint]
    tokens = forged_tokens(foreign_key)
    assert sorted(tokens) == CASES
    answered = {}
    for case, token in tokens.items():
        headers = {**bearer(token), "X-Device-Id": DEVICE, "Content-Type": "application/json"}
        response = await call(function, method, path, version=version, headers=headers, body=body)
        answered[case] = (
            response.status,
            response.body["error"],
            sorted(response.body),
            response.headers.get("www-authenticate"),
        )
    expected = (401, "unauthorized", ["error", "message"], "Bearer")
    assert answered == dict.fromkeys(CASES, expected)
    assert await fingerprint(admin) == before


# ------------------------------------------------------ forwarding headers

FORGED_FORWARDING = {
    "x_forwarded_for": {"X-Forwarded-For": f"{YOOKASSA_SOURCE}"},
    "x_forwarded_for_chain": {"X-Forwarded-For": f"{YOOKASSA_SOURCE}, 10.0.0.1"},
    "x_real_ip": {"X-Real-IP": YOOKASSA_SOURCE},
    "forwarded": {"Forwarded": f"for={YOOKASSA_SOURCE};proto=https"},
    "all_of_them": {
        "X-Forwarded-For": YOOKASSA_SOURCE,
        "X-Real-IP": YOOKASSA_SOURCE,
        "Forwarded": f"for={YOOKASSA_SOURCE}",
        "True-Client-IP": YOOKASSA_SOURCE,
        "X-Client-IP": YOOKASSA_SOURCE,
    },
}


@pytest.fixture
async def paid_at_provider(
    running_fake: FakeYooKassa,  # noqa: F811
    abuse_runtime: LambdaRuntime,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    admin: asyncpg.Connection,
) -> AsyncIterator[dict[str, Any]]:
    """A pending payment of ours that YooKassa says succeeded: a notification
    for it, once accepted, would credit 50 tokens."""
    running_fake.reset()
    configure_provider(monkeypatch, running_fake)
    buyer = await db.insert_user(admin, device_id=DEVICE)
    created = await call(
        "payments",
        "POST",
        "/api/payments",
        headers={"X-Device-Id": DEVICE, "Content-Type": "application/json"},
        body={"package_id": "tokens_50"},
    )
    assert created.status == 201, created.body
    provider_id = created.body["confirmation_url"].rsplit("/", 1)[1]
    provider_payment = await running_fake.succeed(provider_id)
    await close_provider_client(abuse_runtime)
    # the runtime's connections are closed on its own loop before a served
    # request on this one would need the pool (a pool dropped from another
    # loop leaves its sockets open)
    await abuse_runtime.close_pool()
    yield {
        "buyer": buyer,
        "notification": payment_notification("payment.succeeded", provider_payment["object"]),
        "fake": running_fake,
    }
    await close_provider_client(abuse_runtime)
    assert await db.audit_problems(admin) == []
    assert await abuse_runtime.run(find_violations) == []


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("forged", sorted(FORGED_FORWARDING))
async def test_forged_forwarding_headers_do_not_open_the_webhook(
    version: str, forged: str, paid_at_provider: dict[str, Any], admin: asyncpg.Connection
) -> None:
    before = await fingerprint(admin)
    fake: FakeYooKassa = paid_at_provider["fake"]
    asked_before = len(fake.requests)
    response = await call(
        "webhook",
        "POST",
        "/api/payments/webhook",
        version=version,
        headers={"Content-Type": "application/json", **FORGED_FORWARDING[forged]},
        body=paid_at_provider["notification"],
        source_ip=f"{GATEWAY_SOURCE}/32",
    )
    assert response.status == 403
    assert response.body["error"] == "forbidden"
    assert await fingerprint(admin) == before
    assert len(fake.requests) == asked_before  # YooKassa was not even asked
    # the same notification from YooKassa's address is applied: the refusal was the address's
    accepted = await call(
        "webhook",
        "POST",
        "/api/payments/webhook",
        version=version,
        headers={"Content-Type": "application/json"},
        body=paid_at_provider["notification"],
        source_ip=YOOKASSA_SOURCE,
    )
    assert (accepted.status, accepted.body) == (200, {"outcome": "credited"})
    assert await db.balance(admin, paid_at_provider["buyer"]) == 5 + 50


def rotating_forgeries(count: int) -> list[dict[str, str]]:
    """A different forged client address on every request, in every header."""
    forged = []
    for n in range(count):
        address = f"198.51.100.{n + 1}"
        forged.append(
            {
                "X-Forwarded-For": f"{address}, 10.0.{n}.1",
                "X-Real-IP": address,
                "Forwarded": f"for={address}",
            }
        )
    return forged


@pytest.mark.parametrize("version", VERSIONS)
async def test_rotating_forged_addresses_do_not_lift_the_signup_limit(
    version: str, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANON_SIGNUPS_PER_IP_PER_HOUR", raising=False)
    settings.reset()
    statuses = []
    for n, forged in enumerate(rotating_forgeries(12)):
        response = await call(
            "user",
            "GET",
            "/api/user",
            version=version,
            headers={"X-Device-Id": f"device_flood_{n:04d}", **forged},
        )
        statuses.append(response.status)
    assert statuses == [200] * 5 + [429] * 7
    assert await admin.fetchval("select count(*) from users") == 5
    # every signup was counted against the address API Gateway saw
    addresses = await admin.fetch("select distinct host(source_ip) as ip from usage_logs")
    assert [row["ip"] for row in addresses] == [GATEWAY_SOURCE]


# ------------------------------------------------------ over a real socket


async def test_over_http_forged_headers_do_not_open_the_webhook(
    served: httpx.AsyncClient,  # noqa: F811
    paid_at_provider: dict[str, Any],
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # YooKassa's own networks only: the peer, 127.0.0.1, is not in them
    monkeypatch.delenv("YOOKASSA_TRUSTED_NETWORKS", raising=False)
    settings.reset()
    before = await fingerprint(admin)
    for forged in FORGED_FORWARDING.values():
        response = await served.post(
            "/api/payments/webhook", json=paid_at_provider["notification"], headers=forged
        )
        assert response.status_code == 403, forged
    assert await fingerprint(admin) == before
    # trusting the loopback peer itself is what lets a local delivery in
    monkeypatch.setenv("YOOKASSA_TRUSTED_NETWORKS", "127.0.0.1/32")
    settings.reset()
    accepted = await served.post("/api/payments/webhook", json=paid_at_provider["notification"])
    assert (accepted.status_code, accepted.json()) == (200, {"outcome": "credited"})


async def test_over_http_rotating_forged_addresses_do_not_lift_the_signup_limit(
    served: httpx.AsyncClient,  # noqa: F811
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ANON_SIGNUPS_PER_IP_PER_HOUR", raising=False)
    settings.reset()
    statuses = []
    for n, forged in enumerate(rotating_forgeries(8)):
        response = await served.get("/api/user", headers={"X-Device-Id": f"device_http_{n:04d}", **forged})
        statuses.append(response.status_code)
    assert statuses == [200] * 5 + [429] * 3
    addresses = await admin.fetch("select distinct host(source_ip) as ip from usage_logs")
    assert [row["ip"] for row in addresses] == ["127.0.0.1"]


async def test_the_socket_test_would_catch_a_server_that_trusts_forwarding_headers(
    admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the two tests above: uvicorn with proxy_headers on (its
    default) takes X-Forwarded-For from a loopback peer, and the limit is then
    counted against whatever the client wrote."""
    monkeypatch.delenv("ANON_SIGNUPS_PER_IP_PER_HOUR", raising=False)
    settings.reset()
    await close_pool_on_this_loop()
    trusting = await serve_like_dreamlens(build_local_app(), proxy_headers=True)
    try:
        async with httpx.AsyncClient(base_url=trusting.base_url, timeout=30) as client:
            for n, forged in enumerate(rotating_forgeries(8)):
                response = await client.get(
                    "/api/user", headers={"X-Device-Id": f"device_trust_{n:04d}", **forged}
                )
                assert response.status_code == 200
    finally:
        await trusting.stop()
        await close_pool_on_this_loop()
    addresses = await admin.fetch("select distinct host(source_ip) as ip from usage_logs")
    assert len(addresses) == 8  # each forged address counted as its own source
