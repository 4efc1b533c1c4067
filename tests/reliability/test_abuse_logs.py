"""Secrets, session tokens, device ids and prompts never reach a log.

A full walk-through runs through the real handlers with every logger at
DEBUG (root and each named logger, whatever level it set itself), captured
by a handler on the root logger (message, arguments, every record attribute
and any traceback), by caplog, and at the file descriptors (anything
printed, by any thread). It covers the happy path and the refusals a caller
can provoke with those very values (a bad token, a wrong secret, a prompt
the validator refuses). Then each secret value is searched for in all of it.
"""

from __future__ import annotations

import base64
import json
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from functions import settings
from functions.fake_yookassa import FakeYooKassa
from tests import db
from tests.functions.lambda_events import LambdaRuntime
from tests.reliability.abuse_support import (
    YOOKASSA_SOURCE,
    abuse_runtime,  # noqa: F401 (an autouse fixture)
    bearer,
    call,
    close_provider_client,
    configure_provider,
    payment_notification,
    running_fake,  # noqa: F401 (a fixture)
    signed,
    use_clerk,
)

DEVICE = "device_LEAKCHECK_7f3a9c51"
PROMPT = "a purple giraffe named Zanzibar-LEAK-4471"
FAILED_PROMPT = "an orange walrus called Quixote-LEAK-9902"
INIT_SECRET = "init-SECRET-b5e1d0c2a9"
CALLBACK_SECRET = "callback-SECRET-4c8e7f0a1b"
WRONG_SECRET = "wrong-SECRET-0f9e8d7c6b"
CLERK_ID = "user_LEAKCHECK_clerk"


class Everything(logging.Handler):
    """Keeps every record, rendered every way a log sink could render it."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.format(record))
        self.texts.append(repr(record.args))
        self.texts.append(json.dumps(record.__dict__, default=repr))
        if record.exc_info and record.exc_info[1] is not None:
            self.texts.append("".join(traceback.format_exception(record.exc_info[1])))


@pytest.fixture
def every_log() -> Iterator[Everything]:
    """Root and every named logger at DEBUG, propagating to the capture."""
    capture = Everything()
    root = logging.getLogger()
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    saved = [(logger, logger.level, logger.propagate, logger.disabled) for logger in [root, *loggers]]
    root.addHandler(capture)
    for logger, _, _, _ in saved:
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
        if logger is not root:
            logger.propagate = True
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        for logger, level, propagate, disabled in saved:
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled


def json_headers(**headers: str) -> dict[str, str]:
    return {"Content-Type": "application/json", **headers}


async def walk_through(
    fake: FakeYooKassa, runtime: LambdaRuntime, token: str, stale_token: str
) -> dict[str, Any]:
    """A device user's whole life and its account's: balance, generations,
    ledger, link, payment, webhook, worker, init-db; plus the refusals."""
    device = {"X-Device-Id": DEVICE}
    account = bearer(token)
    seen: dict[str, Any] = {}

    assert (await call("user", "GET", "/api/user", headers=device)).status == 200
    assert (await call("tokens", "GET", "/api/tokens", headers=device)).status == 200
    created = await call(
        "generations",
        "POST",
        "/api/generations",
        headers=json_headers(**device, **{"Idempotency-Key": "walk-1"}),
        body={"prompt": PROMPT, "quality": "hd"},
    )
    assert created.status == 201, created.body
    failing = await call(
        "generations",
        "POST",
        "/api/generations",
        version="v1",
        headers=json_headers(**device),
        body={"prompt": FAILED_PROMPT},
    )
    assert failing.status == 201, failing.body
    assert (await call("tokens", "GET", "/api/tokens/transactions", headers=device)).status == 200
    assert (await call("generations", "GET", "/api/generations", headers=device)).status == 200

    linked = await call(
        "user", "POST", "/api/user/link-device", headers=json_headers(**account), body={"device_id": DEVICE}
    )
    assert linked.status == 200, linked.body

    payment = await call(
        "payments", "POST", "/api/payments", headers=json_headers(**account), body={"package_id": "tokens_50"}
    )
    assert payment.status == 201, payment.body
    provider_id = payment.body["confirmation_url"].rsplit("/", 1)[1]
    paid = await fake.succeed(provider_id)
    notification = payment_notification("payment.succeeded", paid["object"])
    delivered = await call(
        "webhook",
        "POST",
        "/api/payments/webhook",
        headers=json_headers(),
        body=notification,
        source_ip=YOOKASSA_SOURCE,
    )
    assert (delivered.status, delivered.body) == (200, {"outcome": "credited"})
    assert (
        await call("payments", "GET", f"/api/payments/{payment.body['id']}", headers=account)
    ).status == 200
    await close_provider_client(runtime)

    worker = json_headers(**{"X-Callback-Secret": CALLBACK_SECRET})
    claimed = await call("worker", "POST", "/api/worker/claim", headers=worker, body={"limit": 10})
    assert [item["prompt"] for item in claimed.body["items"]] == [PROMPT, FAILED_PROMPT]
    ok = await call(
        "worker",
        "POST",
        f"/api/generations/{created.body['id']}/result",
        headers=worker,
        body={"status": "succeeded", "image_key": "images/walk.png"},
    )
    assert ok.status == 200
    refunded = await call(
        "worker",
        "POST",
        f"/api/generations/{failing.body['id']}/result",
        headers=worker,
        body={"status": "failed", "error": "the model gave up"},
    )
    assert refunded.status == 200
    initialized = await call("init_db", "POST", "/api/init-db", headers={"X-Init-Secret": INIT_SECRET})
    assert initialized.status == 200
    assert (await call("user", "GET", "/api/user", headers=account)).status == 200

    # the refusals a caller provokes with the very values that must not leak
    refusals = [
        await call("user", "GET", "/api/user", headers=bearer(stale_token)),
        await call("user", "GET", "/api/user", headers=bearer(token + "x")),
        await call("user", "GET", "/api/user", headers=device),  # linked: 403
        await call("worker", "POST", "/api/worker/claim", headers={"X-Callback-Secret": WRONG_SECRET}),
        await call("init_db", "POST", "/api/init-db", headers={"X-Init-Secret": WRONG_SECRET}),
        await call(
            "generations",
            "POST",
            "/api/generations",
            headers=json_headers(**account),
            body={"prompt": PROMPT, "quality": "8k"},
        ),
        await call(
            "generations",
            "POST",
            "/api/generations",
            headers=json_headers(**account),
            body={"prompt": PROMPT + "\u0000"},
        ),
        await call(
            "user",
            "POST",
            "/api/user/link-device",
            headers=json_headers(**account),
            body={"device_id": DEVICE + "!"},
        ),
    ]
    seen["refusals"] = [response.status for response in refusals]
    return seen


async def test_no_secret_token_device_id_or_prompt_reaches_any_log(
    every_log: Everything,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    running_fake: FakeYooKassa,  # noqa: F811
    abuse_runtime: LambdaRuntime,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    admin: asyncpg.Connection,
) -> None:
    caplog.set_level(logging.DEBUG)
    running_fake.reset()
    configure_provider(monkeypatch, running_fake)
    monkeypatch.setenv("GENERATION_CALLBACK_SECRET", CALLBACK_SECRET)
    monkeypatch.setenv("DB_INIT_SECRET", INIT_SECRET)
    use_clerk(monkeypatch)
    settings.reset()
    token = signed(sub=CLERK_ID, email="leak.check@example.com")
    stale_token = signed(sub=CLERK_ID, exp=1_000_000, iat=999_000, nbf=999_000)

    seen = await walk_through(running_fake, abuse_runtime, token, stale_token)
    assert seen["refusals"] == [401, 401, 403, 403, 403, 422, 422, 422]
    logging.getLogger("tests.reliability.sentinel").debug("sentinel-debug-record")

    printed = capfd.readouterr()
    captured = "\n".join([*every_log.texts, caplog.text, printed.out, printed.err])
    # the capture is real: DEBUG records, the request lines of the walk-through
    assert "sentinel-debug-record" in captured
    for route in ("/api/generations", "/api/user/link-device", "/api/payments/webhook", "/api/init-db"):
        assert f'"route":"{route}"' in captured, route

    basic = base64.b64encode(f"{running_fake.shop_id}:{running_fake.secret_key}".encode()).decode()
    secrets = {
        "session token": token,
        "session token signature": token.rsplit(".", 1)[1],
        "stale session token": stale_token,
        "device id": DEVICE,
        "prompt": PROMPT,
        "failed prompt": FAILED_PROMPT,
        "prompt words": "Zanzibar-LEAK",
        "init secret": INIT_SECRET,
        "callback secret": CALLBACK_SECRET,
        "wrong secret": WRONG_SECRET,
        "yookassa secret key": running_fake.secret_key,
        "yookassa basic auth": basic,
        "email": "leak.check@example.com",
    }
    leaked = {name: captured.count(value) for name, value in secrets.items() if value in captured}
    assert leaked == {}, f"found in the logs: {leaked}"
    assert await db.audit_problems(admin) == []
