"""A fake of YooKassa's HTTP API v3, for tests and local development.

It is an outside service's stand-in, so nothing in production imports it.
It keeps to what the provider documents:

* `POST /v3/payments` checks Basic auth, requires an `Idempotence-Key`
  (at most 64 characters): the same key with the same body answers the first
  payment again; the same key with a different body is a 400. It validates
  the body (amount as a decimal string, currency, redirect confirmation,
  description and metadata limits) and answers a `pending` payment with a
  confirmation URL.
* `GET /v3/payments/{id}` and `GET /v3/refunds/{id}`.
* Errors are `{"type": "error", "id", "code", "description", "parameter"}`.

What the payer and the provider would do happens through control methods
(or `/_fake/...` endpoints): mark a payment waiting_for_capture, succeeded or
canceled, or refund part of it. Each change POSTs the notification, in
YooKassa's shape, to the webhook URL as the real service does. Switches make
the API slow or down (503) for fault tests; every API request is recorded.

    fake = await start_fake_yookassa(webhook_url="http://127.0.0.1:8000/api/payments/webhook")
    client = YooKassaClient(YooKassaSettings(fake.shop_id, fake.secret_key, fake.api_url, ...))
    await fake.succeed(provider_payment_id)
    await fake.stop()

Notifications come from 127.0.0.1, not YooKassa's networks: a local server
using the fake sets YOOKASSA_TRUSTED_NETWORKS=127.0.0.1/32,::1/128.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import json
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from html import escape
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

MAX_KEY_LENGTH = 64
MAX_DESCRIPTION = 128
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY = 32
MAX_METADATA_VALUE = 512
_DECIMAL = re.compile(r"^\d+(\.\d{1,2})?$")


class FakeTransitionError(ValueError):
    """The provider would not make this change (say, refund a pending payment)."""


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    idempotence_key: str | None


@dataclass
class Delivery:
    notification: dict[str, Any]
    status_code: int | None
    error: str | None = None


@dataclass
class _Replay:
    fingerprint: str
    payment_id: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _value(minor_units: int) -> str:
    return str((Decimal(minor_units) / 100).quantize(Decimal("0.01")))


def _minor(value: str) -> int:
    return int(Decimal(value) * 100)


def _error(status: int, code: str, description: str, parameter: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "error",
        "id": str(uuid.uuid4()),
        "code": code,
        "description": description,
    }
    if parameter:
        body["parameter"] = parameter
    return JSONResponse(body, status_code=status)


@dataclass
class FakeYooKassa:
    """The fake's state, its ASGI app, and (once started) its server."""

    shop_id: str = "100500"
    secret_key: str = field(default_factory=lambda: "test_" + secrets.token_urlsafe(16), repr=False)
    webhook_url: str | None = None
    base_url: str = "http://fake-yookassa.invalid"
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    down_status: int | None = None
    slow_seconds: float = 0.0
    # statuses the next API requests answer, one each, before behaving again
    failures: list[int] = field(default_factory=list)
    _replays: dict[str, _Replay] = field(default_factory=dict)
    _release: asyncio.Event | None = None
    _server: InProcessServer | None = None
    _http: httpx.AsyncClient | None = None

    def __post_init__(self) -> None:
        self.app = Starlette(
            routes=[
                Route("/v3/payments", self._create_payment, methods=["POST"]),
                Route("/v3/payments/{payment_id}", self._get_payment, methods=["GET"]),
                Route("/v3/refunds", self._list_refunds, methods=["GET"]),
                Route("/v3/refunds/{refund_id}", self._get_refund, methods=["GET"]),
                Route("/_fake/payments/{payment_id}/{action}", self._control, methods=["POST"]),
                Route("/_fake/mode", self._mode, methods=["POST"]),
                Route("/_fake/checkout/{payment_id}", self._checkout_page, methods=["GET"]),
                Route("/_fake/checkout/{payment_id}", self._checkout, methods=["POST"]),
            ]
        )

    @property
    def api_url(self) -> str:
        """What YOOKASSA_API_URL points at."""
        return f"{self.base_url}/v3"

    # ------------------------------------------------------------ faults

    def go_down(self, status: int = 503) -> None:
        """Every API request answers `status` (5xx) until recover()."""
        self.down_status = status

    def go_slow(self, seconds: float) -> None:
        """Every API request waits `seconds` (or until recover()) before answering."""
        self.slow_seconds = seconds
        self._release = asyncio.Event()

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        """The next `count` API requests answer `status`, then the API works."""
        self.failures.extend([status] * count)

    def recover(self) -> None:
        self.down_status = None
        self.slow_seconds = 0.0
        self.failures.clear()
        if self._release is not None:
            self._release.set()

    def reset(self) -> None:
        """Forget every payment, refund, key and request; healthy again."""
        self.recover()
        for collection in (self.payments, self.refunds, self._replays):
            collection.clear()
        self.requests.clear()
        self.deliveries.clear()

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # --------------------------------------------- the payer and the provider

    async def wait_for_capture(self, payment_id: str) -> dict[str, Any]:
        payment = self._payment_in(payment_id, "pending")
        payment.update(status="waiting_for_capture", paid=True, payment_method=self._card())
        return await self._notify("payment.waiting_for_capture", payment)

    async def succeed(self, payment_id: str) -> dict[str, Any]:
        payment = self._payment_in(payment_id, "pending", "waiting_for_capture")
        payment.update(status="succeeded", paid=True, refundable=True, captured_at=_now())
        payment.setdefault("payment_method", self._card())
        return await self._notify("payment.succeeded", payment)

    async def cancel(self, payment_id: str) -> dict[str, Any]:
        payment = self._payment_in(payment_id, "pending", "waiting_for_capture")
        payment.update(
            status="canceled",
            paid=False,
            cancellation_details={"party": "yoo_money", "reason": "expired_on_confirmation"},
        )
        return await self._notify("payment.canceled", payment)

    async def refund(self, payment_id: str, amount: int) -> dict[str, Any]:
        """Refund `amount` minor units of a succeeded payment; the payment keeps
        its status and gains refunded_amount, as at YooKassa."""
        payment = self._payment_in(payment_id, "succeeded")
        total = _minor(payment["amount"]["value"])
        refunded = _minor(payment.get("refunded_amount", {}).get("value", "0"))
        if not 0 < amount <= total - refunded:
            raise FakeTransitionError(f"cannot refund {amount} of {total} (already refunded {refunded})")
        currency = payment["amount"]["currency"]
        refund_id = str(uuid.uuid4())
        refund: dict[str, Any] = {
            "id": refund_id,
            "payment_id": payment_id,
            "status": "succeeded",
            "created_at": _now(),
            "amount": {"value": _value(amount), "currency": currency},
        }
        self.refunds[refund_id] = refund
        payment["refunded_amount"] = {"value": _value(refunded + amount), "currency": currency}
        payment["refundable"] = refunded + amount < total
        return await self._notify("refund.succeeded", refund)

    def _payment_in(self, payment_id: str, *statuses: str) -> dict[str, Any]:
        payment = self.payments.get(payment_id)
        if payment is None:
            raise FakeTransitionError(f"no payment {payment_id}")
        if payment["status"] not in statuses:
            raise FakeTransitionError(
                f"payment {payment_id} is {payment['status']}, not {' or '.join(statuses)}"
            )
        return payment

    @staticmethod
    def _card() -> dict[str, Any]:
        return {
            "type": "bank_card",
            "id": str(uuid.uuid4()),
            "saved": False,
            "title": "Bank card *4444",
            "card": {
                "first6": "555555",
                "last4": "4444",
                "expiry_month": "07",
                "expiry_year": "2030",
                "card_type": "MasterCard",
                "issuer_country": "RU",
            },
        }

    async def _notify(self, event: str, obj: dict[str, Any]) -> dict[str, Any]:
        notification = {"type": "notification", "event": event, "object": copy.deepcopy(obj)}
        if self.webhook_url:
            if self._http is None or self._http.is_closed:
                # a connection per notification, as a webhook sender opens
                # them: reusing a kept-alive one races the receiver closing it
                # (uvicorn closes idle connections after 5 s), a failed
                # delivery that is neither the fake's doing nor the app's
                self._http = httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0))
            try:
                response = await self._http.post(self.webhook_url, json=notification)
                self.deliveries.append(Delivery(notification, response.status_code))
            except httpx.HTTPError as exc:
                # the real service would try again later; the fake records it
                self.deliveries.append(Delivery(notification, None, type(exc).__name__))
        return notification

    # ------------------------------------------------------------------ API

    async def _api_gate(self, request: Request) -> Response | None:
        """Recording, fault switches and Basic auth, in the order a client meets them."""
        self.requests.append(
            RecordedRequest(request.method, request.url.path, request.headers.get("idempotence-key"))
        )
        if self.slow_seconds and self._release is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.slow_seconds)
        if self.down_status is not None:
            return _error(self.down_status, "internal_server_error", "The fake is down")
        if self.failures:
            status = self.failures.pop(0)
            code = "too_many_requests" if status == 429 else "internal_server_error"
            return _error(status, code, "The fake failed this request on purpose")
        if not self._authorized(request.headers.get("authorization", "")):
            return _error(
                401, "invalid_credentials", "Basic auth with the shop id and secret key is required"
            )
        return None

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, self.shop_id) and secrets.compare_digest(
            password, self.secret_key
        )

    async def _create_payment(self, request: Request) -> Response:
        refused = await self._api_gate(request)
        if refused is not None:
            return refused
        key = request.headers.get("idempotence-key")
        if not key or len(key) > MAX_KEY_LENGTH:
            return _error(
                400, "invalid_request", "Idempotence-Key of 1 to 64 characters is required", "Idempotence-Key"
            )
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "invalid_request", "The body is not JSON")
        fingerprint = json.dumps(body, sort_keys=True, separators=(",", ":"))
        replay = self._replays.get(key)
        if replay is not None:
            if replay.fingerprint != fingerprint:
                return _error(
                    400, "invalid_request", "Idempotence-Key was used with other data", "Idempotence-Key"
                )
            return JSONResponse(self.payments[replay.payment_id])
        problem = _invalid_payment_request(body)
        if problem is not None:
            return _error(400, "invalid_request", *problem)
        payment_id = str(uuid.uuid4())
        payment = {
            "id": payment_id,
            "status": "pending",
            "paid": False,
            "amount": {
                "value": _value(_minor(body["amount"]["value"])),
                "currency": body["amount"]["currency"],
            },
            "confirmation": {
                "type": "redirect",
                "return_url": body["confirmation"]["return_url"],
                "confirmation_url": f"{self.base_url}/_fake/checkout/{payment_id}",
            },
            "created_at": _now(),
            "description": body.get("description", ""),
            "metadata": body.get("metadata", {}),
            "recipient": {"account_id": self.shop_id, "gateway_id": "fake-gateway"},
            "refundable": False,
            "test": True,
        }
        self.payments[payment_id] = payment
        self._replays[key] = _Replay(fingerprint, payment_id)
        return JSONResponse(payment)

    async def _get_payment(self, request: Request) -> Response:
        refused = await self._api_gate(request)
        if refused is not None:
            return refused
        payment = self.payments.get(request.path_params["payment_id"])
        if payment is None:
            return _error(404, "not_found", "Payment not found")
        return JSONResponse(payment)

    async def _get_refund(self, request: Request) -> Response:
        refused = await self._api_gate(request)
        if refused is not None:
            return refused
        refund = self.refunds.get(request.path_params["refund_id"])
        if refund is None:
            return _error(404, "not_found", "Refund not found")
        return JSONResponse(refund)

    async def _list_refunds(self, request: Request) -> Response:
        """GET /v3/refunds as YooKassa lists: newest first, filtered by
        `created_at.gte` and `status`, `limit` (1-100, default 10) a page, and
        `next_cursor` while more follow (here the position of the next item)."""
        refused = await self._api_gate(request)
        if refused is not None:
            return refused
        query = request.query_params
        try:
            limit = int(query.get("limit", "10"))
            start = int(query.get("cursor", "0"))
            since = query.get("created_at.gte")
            since_at = datetime.fromisoformat(since.replace("Z", "+00:00")) if since else None
            if not 1 <= limit <= 100 or start < 0:
                raise ValueError("limit or cursor out of range")
        except ValueError as exc:
            return _error(400, "invalid_request", f"Invalid list parameters: {exc}")
        matching = [
            refund
            for refund in sorted(self.refunds.values(), key=lambda refund: refund["created_at"], reverse=True)
            if (
                since_at is None
                or datetime.fromisoformat(refund["created_at"].replace("Z", "+00:00")) >= since_at
            )
            and query.get("status") in (None, refund["status"])
        ]
        body: dict[str, Any] = {"type": "list", "items": matching[start : start + limit]}
        if start + limit < len(matching):
            body["next_cursor"] = str(start + limit)
        return JSONResponse(body)

    # -------------------------------------------------------------- control

    async def _control(self, request: Request) -> Response:
        payment_id, action = request.path_params["payment_id"], request.path_params["action"]
        try:
            if action == "refund":
                body = json.loads(await request.body() or b"{}")
                notification = await self.refund(payment_id, _minor(str(body["amount"])))
            elif action in ("succeed", "cancel", "wait_for_capture"):
                notification = await getattr(self, action)(payment_id)
            else:
                return _error(404, "not_found", f"No control action {action}")
        except (FakeTransitionError, ValueError, KeyError, TypeError, InvalidOperation) as exc:
            return _error(400, "invalid_request", str(exc))
        return JSONResponse(notification)

    async def _mode(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            mode = body["mode"]
            if mode == "down":
                self.go_down(int(body.get("status", 503)))
            elif mode == "slow":
                self.go_slow(float(body["seconds"]))
            elif mode == "up":
                self.recover()
            else:
                raise ValueError(f"unknown mode {mode!r}")
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, "invalid_request", str(exc))
        return JSONResponse({"mode": mode})

    async def _checkout_page(self, request: Request) -> Response:
        payment = self.payments.get(request.path_params["payment_id"])
        if payment is None:
            return HTMLResponse("<h1>No such payment</h1>", status_code=404)
        action = f"/_fake/checkout/{escape(payment['id'])}"
        return HTMLResponse(
            f"<h1>Fake YooKassa</h1><p>{escape(payment['description'])}: "
            f"{escape(payment['amount']['value'])} {escape(payment['amount']['currency'])}</p>"
            f'<form method="post" action="{action}?outcome=succeed"><button>Pay</button></form>'
            f'<form method="post" action="{action}?outcome=cancel"><button>Cancel</button></form>'
        )

    async def _checkout(self, request: Request) -> Response:
        """The payer's choice on the checkout page, then back to the shop."""
        payment_id = request.path_params["payment_id"]
        outcome = request.query_params.get("outcome")
        if outcome not in ("succeed", "cancel"):
            return HTMLResponse("<h1>Unknown outcome</h1>", status_code=400)
        try:
            await getattr(self, outcome)(payment_id)
        except FakeTransitionError as exc:
            return HTMLResponse(f"<h1>{escape(str(exc))}</h1>", status_code=409)
        return RedirectResponse(self.payments[payment_id]["confirmation"]["return_url"], status_code=303)

    # --------------------------------------------------------------- server

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> FakeYooKassa:
        """Serve the app on this loop; port 0 picks a free one. base_url is
        set once it listens."""
        self._server = await serve_in_process(self.app, port, host)
        self.base_url = self._server.base_url
        return self

    async def stop(self) -> None:
        self.recover()  # let slow requests finish
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class InProcessServer:
    """An ASGI app served by uvicorn as a task on the running loop."""

    def __init__(self, server: Any, task: asyncio.Task[None], base_url: str) -> None:
        self._server = server
        self._task = task
        self.base_url = base_url

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task


async def serve_in_process(app: Any, port: int = 0, host: str = "127.0.0.1") -> InProcessServer:
    """uvicorn (a dev dependency, imported here only) on this loop, leaving
    signals and logging configuration to the host process (pytest, or
    `dreamlens serve`)."""
    import uvicorn

    class _Embedded(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
        ws="none",
        http="h11",
        timeout_graceful_shutdown=1,
        # uvicorn would otherwise take X-Forwarded-For from a localhost peer as
        # the client's address, and the webhook trusts callers by address
        proxy_headers=False,
    )
    server = _Embedded(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the startup failure
            raise RuntimeError("the server stopped while starting")
        await asyncio.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    return InProcessServer(server, task, f"http://{host}:{bound_port}")


def _invalid_payment_request(body: object) -> tuple[str, str] | None:
    """(description, parameter) of the first thing YooKassa would refuse."""
    if not isinstance(body, dict):
        return "The body must be a JSON object", "body"
    amount = body.get("amount")
    if not isinstance(amount, dict) or not isinstance(amount.get("value"), str):
        return "amount.value must be a decimal string", "amount.value"
    if not _DECIMAL.fullmatch(amount["value"]) or Decimal(amount["value"]) <= 0:
        return "amount.value must be a positive amount with at most two decimals", "amount.value"
    if not isinstance(amount.get("currency"), str) or not re.fullmatch(r"[A-Z]{3}", amount["currency"]):
        return "amount.currency must be a currency code", "amount.currency"
    if "capture" in body and not isinstance(body["capture"], bool):
        return "capture must be a boolean", "capture"
    confirmation = body.get("confirmation")
    if not isinstance(confirmation, dict) or confirmation.get("type") != "redirect":
        return "The fake supports confirmation of type redirect", "confirmation.type"
    if not isinstance(confirmation.get("return_url"), str) or not confirmation["return_url"]:
        return "confirmation.return_url is required for a redirect", "confirmation.return_url"
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        return f"description is a string of at most {MAX_DESCRIPTION} characters", "description"
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_KEYS:
        return f"metadata is an object of at most {MAX_METADATA_KEYS} keys", "metadata"
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            return "metadata keys are at most 32 characters, values strings of at most 512", "metadata"
    return None


async def start_fake_yookassa(
    port: int = 0, webhook_url: str | None = None, *, shop_id: str = "100500", secret_key: str | None = None
) -> FakeYooKassa:
    """A started fake on 127.0.0.1: `.api_url` for the client, `.shop_id` and
    `.secret_key` for its auth, control methods, and `await .stop()`."""
    fake = FakeYooKassa(shop_id=shop_id, webhook_url=webhook_url)
    if secret_key is not None:
        fake.secret_key = secret_key
    return await fake.start(port)
