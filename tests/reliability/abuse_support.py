"""What the abuse tests share: the Lambda handlers of every function, a warm
Lambda runtime per test, Clerk tokens (good and forged), the local app served
over a real socket exactly as `dreamlens serve` configures uvicorn, and a
fingerprint of the database to show a refused request wrote nothing.

The function modules are imported here, not by the test modules (which
import them, and tests/functions/payment_support, only through this module):
each builds
`Mangum(app)` at import, which takes the thread's event loop (making one if
there is none). That loop is made and closed here, as tests/functions does,
so no orphan loop is collected mid-run (filterwarnings = error).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

_import_loop = asyncio.new_event_loop()
asyncio.set_event_loop(_import_loop)
atexit.register(_import_loop.close)

from functions import (  # noqa: E402 (after the loop above, on purpose)
    generations,
    init_db,
    local,
    payments,
    serve,
    settings,
    subscription,
    tokens,
    user,
    webhook,
    worker,
)
from functions.fake_yookassa import InProcessServer  # noqa: E402
from tests.functions import lambda_events  # noqa: E402
from tests.functions.callers import clerk_key  # noqa: E402
from tests.functions.payment_support import (  # noqa: E402 (imports function modules)
    configure_provider,
    payment_notification,
    running_fake,
)

HANDLERS: dict[str, Any] = {
    "user": user.handler,
    "tokens": tokens.handler,
    "generations": generations.handler,
    "worker": worker.handler,
    "payments": payments.handler,
    "webhook": webhook.handler,
    "subscription": subscription.handler,
    "init_db": init_db.handler,
}
VERSIONS = sorted(lambda_events.EVENT_BUILDERS)
# a documentation address (TEST-NET-3): only ever written into events, never dialled
GATEWAY_SOURCE = "203.0.113.50"
# in YooKassa's published networks
YOOKASSA_SOURCE = "185.71.76.1"


def build_local_app() -> Any:
    """Every function's routes plus the OpenAPI document, as `dreamlens serve` mounts them."""
    return local.build()


# ------------------------------------------------------------- the runtime


@pytest.fixture(autouse=True)
async def abuse_runtime() -> AsyncIterator[lambda_events.LambdaRuntime]:
    """A warm Lambda container per test, with fresh settings and identity cache."""
    async with lambda_events.warm_runtime() as runtime:
        yield runtime


async def call(
    function: str,
    method: str,
    path: str,
    *,
    version: str = "v2",
    headers: dict[str, str] | None = None,
    body: lambda_events.Body = None,
    source_ip: str = GATEWAY_SOURCE,
    **event: Any,
) -> lambda_events.Invocation:
    """One API Gateway event through a function's real handler."""
    built = lambda_events.EVENT_BUILDERS[version](
        method, path, headers=headers, body=body, source_ip=source_ip, **event
    )
    return await lambda_events.invoke(HANDLERS[function], built)


async def call_at_once(
    function: str,
    method: str,
    path: str,
    *,
    version: str = "v2",
    headers: dict[str, str] | None = None,
    body: lambda_events.Body = None,
    source_ip: str = GATEWAY_SOURCE,
) -> lambda_events.Invocation:
    """What the function's Mangum handler does with an event, awaited on the
    running loop instead of run to completion on its own: many of these under
    asyncio.gather are many Lambda invocations at once (one process, so the
    pool and caches are shared: size the pool first)."""
    from mangum.protocols.http import HTTPCycle

    handler = HANDLERS[function]
    event = lambda_events.EVENT_BUILDERS[version](
        method, path, headers=headers, body=body, source_ip=source_ip
    )
    inferred = handler.infer(event, lambda_events.LambdaContext())
    cycle = HTTPCycle(inferred.scope, inferred.body)
    await cycle.run(handler.app)
    response = inferred({"status": cycle.status, "headers": cycle.headers, "body": cycle.body})
    return lambda_events.parse_response(response)


# --------------------------------------------------------------- Clerk


def use_clerk(monkeypatch: pytest.MonkeyPatch, issuer: str | None = None, parties: str | None = None) -> None:
    monkeypatch.setenv("CLERK_JWT_KEY", clerk_key()[1])
    for name, value in (("CLERK_ISSUER", issuer), ("CLERK_AUTHORIZED_PARTIES", parties)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    settings.reset()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "user_abuse_1",
        "iss": "https://clerk.dreamlens.example",
        "azp": "https://app.dreamlens.example",
        "iat": now - 10,
        "nbf": now - 10,
        "exp": now + 300,
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def signed(headers: dict[str, Any] | None = None, key: Any = None, **changes: Any) -> str:
    import jwt

    return jwt.encode(claims(**changes), key or clerk_key()[0], algorithm="RS256", headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], hmac_secret: bytes | None = None) -> str:
    """A token assembled by hand: unsigned, or HMAC-SHA256 with any secret."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = b""
    if hmac_secret is not None:
        signature = hmac.new(hmac_secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------- over a real socket


@contextlib.contextmanager
def _no_signal_handlers() -> Iterator[None]:
    yield


async def serve_like_dreamlens(app: Any, **overrides: Any) -> InProcessServer:
    """`app` on 127.0.0.1 (a free port) with the uvicorn configuration
    `dreamlens serve` uses (functions/serve.py), on the running loop; only
    logging is left to pytest (and `overrides`, for a control run)."""
    import uvicorn

    options = {"log_config": None, "access_log": False, **overrides}
    config = serve.server_config(app, "127.0.0.1", 0, **options)
    server = uvicorn.Server(config)
    server.capture_signals = _no_signal_handlers  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the server stopped while starting")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return InProcessServer(server, task, f"http://127.0.0.1:{port}")


async def close_pool_on_this_loop() -> None:
    """Close the process's pool if this loop made it (a served request); one
    the Lambda runtime made is closed by the runtime, on its own loop."""
    from database import pool

    if pool._pool is not None and pool._pool_loop is asyncio.get_running_loop():
        await pool.close_pool()


@pytest.fixture
async def served() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the local app served over 127.0.0.1 as `dreamlens serve`
    runs it; the pool it makes on this loop is closed after."""
    await close_pool_on_this_loop()
    server = await serve_like_dreamlens(build_local_app())
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            yield client
    finally:
        await server.stop()
        await close_pool_on_this_loop()


async def close_provider_client(runtime: lambda_events.LambdaRuntime) -> None:
    """Close the process's YooKassa client on the loop its connections belong
    to (the Lambda runtime's, or this one's after a served request)."""
    from functions import yookassa

    client = yookassa._default
    if client is None or client._http is None:
        return
    if client._loop is runtime.loop:
        await runtime.run(yookassa.close_default_client)
    else:
        await yookassa.close_default_client()


# ------------------------------------------------------------ the database

# re-exported: equal before and after means nothing was written
from tests.functions.callers import fingerprint  # noqa: E402

__all__ = [
    "GATEWAY_SOURCE",
    "HANDLERS",
    "VERSIONS",
    "YOOKASSA_SOURCE",
    "abuse_runtime",
    "bearer",
    "build_local_app",
    "call",
    "call_at_once",
    "claims",
    "close_pool_on_this_loop",
    "close_provider_client",
    "configure_provider",
    "fingerprint",
    "generations",
    "hand_made",
    "payment_notification",
    "running_fake",
    "serve_like_dreamlens",
    "served",
    "signed",
    "use_clerk",
]
