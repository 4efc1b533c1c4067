"""`dreamlens serve`: the whole API on localhost.

On the embedded PostgreSQL (or DATABASE_URL); the schema is applied by the
first request that needs it. Without YooKassa credentials it starts the fake
YooKassa in the same process, so payments work end to end: the confirmation
URL opens the fake's checkout page, and paying there sends the webhook back
to this server as YooKassa would.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    fake_payments: bool


def _print(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - the CLI talks to a person


def server_config(app: Any, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    """How `dreamlens serve` runs uvicorn (tests serve the app with exactly
    this, passing only logging overrides)."""
    import uvicorn

    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "warning",
        # the source IP decides the webhook allowlist and the signup limit:
        # never take it from a client-supplied X-Forwarded-For, X-Real-IP or
        # Forwarded (uvicorn trusts them from 127.0.0.1 by default)
        "proxy_headers": False,
        **overrides,
    }
    return uvicorn.Config(app, **options)


async def serve(options: ServeOptions) -> int:
    import uvicorn

    from database import config
    from functions import local

    settings = config.settings()  # starts the embedded server when nothing is configured
    base_url = f"http://{options.host}:{options.port}"
    fake = None
    if options.fake_payments:
        from functions.fake_yookassa import start_fake_yookassa

        fake = await start_fake_yookassa(webhook_url=f"{base_url}/api/payments/webhook")
        os.environ.update(
            YOOKASSA_API_URL=fake.api_url,
            YOOKASSA_SHOP_ID=fake.shop_id,
            YOOKASSA_SECRET_KEY=fake.secret_key,
            YOOKASSA_TRUSTED_NETWORKS="127.0.0.1/32,::1/128",
        )
        os.environ.setdefault("YOOKASSA_RETURN_URL", f"{base_url}/api/health")
    if not os.environ.get("GENERATION_CALLBACK_SECRET"):
        os.environ["GENERATION_CALLBACK_SECRET"] = secrets.token_urlsafe(16)

    _print(f"DreamLens API on {base_url}")
    _print(f"  OpenAPI document: {base_url}/api/openapi.json")
    _print(f"  database: {'embedded PostgreSQL' if settings.embedded else 'DATABASE_URL'}")
    if fake is not None:
        _print(f"  payments: fake YooKassa at {fake.api_url} (pay on its checkout page)")
    _print(f"  worker callback secret (X-Callback-Secret): {os.environ['GENERATION_CALLBACK_SECRET']}")

    server = uvicorn.Server(server_config(local.build(), options.host, options.port))
    try:
        await server.serve()
    finally:
        if fake is not None:
            await fake.stop()
    return 0
