"""Schemathesis against the project's own OpenAPI document, on the local app.

The document is read from GET /api/openapi.json of `functions.local.build()`
(what `dreamlens serve` serves) and every operation in it is called in
process (ASGI) with generated valid and invalid input, as a known caller:
a device id or a Clerk session token, the worker's X-Callback-Secret, the
X-Init-Secret; the webhook from an address in YOOKASSA_TRUSTED_NETWORKS,
re-reading statuses from a fake YooKassa. Every answer must be no 5xx, a
status the document lists for the operation, and a body matching the
schema it gives for that status.

Schemathesis runs every ASGI call on one event loop of its own (a portal
thread), so the app's pool, the fake YooKassa and the YooKassa client live
there for the whole module and are closed there at its end. Examples are
bounded and derandomized: a failure reproduces.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from database import pool
from functions import identity
from functions import settings as function_settings
from functions.fake_yookassa import FakeYooKassa, start_fake_yookassa
from functions.yookassa import close_default_client
from tests.functions.callers import clerk_key
from tests.reliability.abuse_support import bearer, build_local_app, close_pool_on_this_loop, signed

EXAMPLES = int(os.environ.get("DREAMLENS_SCHEMATHESIS_EXAMPLES", "25"))
DEVICE = "device_schemathesis_01"
CALLBACK_SECRET = "schemathesis-callback-secret"
INIT_SECRET = "schemathesis-init-secret"
CLIENT = ("127.0.0.1", 50000)


def _as_loopback_client(app: Any) -> Any:
    """Schemathesis's in-process client calls itself "testclient", which is no
    address: give it the loopback one a local caller has, so the webhook's
    allowlist (and the signup limit) see an address."""

    async def with_address(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "client": CLIENT}
        await app(scope, receive, send)

    return with_address


APP = _as_loopback_client(build_local_app())
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all", "max-examples": EXAMPLES},
    }
)
schema = schemathesis.openapi.from_asgi("/api/openapi.json", APP, config=CONFIG)

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
async def environment() -> AsyncIterator[FakeYooKassa]:
    """Secrets, Clerk's key, and a fake YooKassa on schemathesis's loop."""
    # a pool an earlier test made on the test loop is closed there, not
    # dropped from schemathesis's loop (which would leave its sockets open)
    await close_pool_on_this_loop()
    portal = asgi._get_portal()
    fake: FakeYooKassa = portal.call(start_fake_yookassa)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLERK_JWT_KEY", clerk_key()[1])
        patch.delenv("CLERK_ISSUER", raising=False)
        patch.delenv("CLERK_AUTHORIZED_PARTIES", raising=False)
        patch.setenv("GENERATION_CALLBACK_SECRET", CALLBACK_SECRET)
        patch.setenv("DB_INIT_SECRET", INIT_SECRET)
        patch.setenv("YOOKASSA_SHOP_ID", fake.shop_id)
        patch.setenv("YOOKASSA_SECRET_KEY", fake.secret_key)
        patch.setenv("YOOKASSA_API_URL", fake.api_url)
        patch.setenv("YOOKASSA_RETURN_URL", "https://app.dreamlens.test/return")
        patch.setenv("YOOKASSA_TRUSTED_NETWORKS", f"{CLIENT[0]}/32")
        patch.setenv("ANON_SIGNUPS_PER_IP_PER_HOUR", "1000")
        function_settings.reset()
        try:
            yield fake
        finally:
            portal.call(close_default_client)
            portal.call(pool.close_pool)
            portal.call(fake.stop)
    function_settings.reset()


@pytest.fixture(autouse=True)
def fresh_identities(environment: FakeYooKassa) -> Iterator[None]:
    # the database is truncated per test: a cached caller would be a ghost
    identity.forget_all()
    yield
    identity.forget_all()


def caller(case: Any) -> dict[str, str]:
    """Who calls: what the operation's security asks for."""
    security = case.operation.definition.raw.get("security")
    names = {name for requirement in security or [] for name in requirement}
    headers: dict[str, str] = {}
    if "clerkSession" in names and (case.operation.path.endswith("link-device") or case.method == "POST"):
        headers.update(bearer(signed(sub="user_schemathesis")))
    elif "deviceId" in names:
        headers["X-Device-Id"] = DEVICE
    if "callbackSecret" in names:
        headers["X-Callback-Secret"] = CALLBACK_SECRET
    if "initSecret" in names:
        headers["X-Init-Secret"] = INIT_SECRET
    return headers


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_documented_and_never_a_server_error(case: Any) -> None:
    case.call_and_validate(headers=caller(case), checks=CHECKS)
