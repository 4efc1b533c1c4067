"""YooKassa (API v3): an async client, notification parsing, and the check
that a notification came from YooKassa's published networks.

Imported only by the payments functions: httpx is paid for at import.

What the provider's documentation says, and what this module does about it:

* Authentication is HTTP Basic: the shop id and the secret key.
* Every POST carries an `Idempotence-Key`; repeating a request with the same
  key and the same data returns the first result instead of doing it again.
  A payment's create call uses a key derived from our payment id, so however
  often it is retried (by us or by the client repeating its request) there
  is one provider payment per payment.
* HTTP 500 (and 202, "still processing") means the outcome is unknown: repeat
  with the same key, or GET the object. 4xx means the request failed and
  repeating it unchanged will fail again. So we retry GETs and keyed POSTs on
  connection faults, timeouts, 5xx and 202, at most 3 attempts with backoff
  and none that could end past a 27 s budget (API Gateway stops waiting at
  29 s), never a 4xx; 429 (too many requests) is the provider's capacity,
  reported as unavailable, not as the caller's bad request.
* Notifications are `{"type": "notification", "event": "<object>.<status>",
  "object": {...}}`. They carry no signature: the webhook checks the source
  IP against the published networks and re-reads the status from the API.

Configuration (shop id, secret key, API URL, return URL, trusted networks)
is read through functions/settings.py, so the secret key may come from
Secrets Manager (`YOOKASSA_SECRET_KEY_SECRET_ARN`).

A request handler calls the provider inside `time_budget(...)`: a Lambda is
stopped at its timeout, and a provider call cut short by the budget is a
ProviderUnavailable (503, the caller repeats) instead of a dead invocation.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

import httpx

from database import ConfigurationError, InvalidRequest, ProviderUnavailable
from database.model import Model
from functions import settings
from repositories.payments import Payment

log = logging.getLogger(__name__)

API_URL = settings.DEFAULT_YOOKASSA_API_URL
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 10.0
MAX_ATTEMPTS = 3
BACKOFF_SECONDS = 0.2
# no attempt starts that could end after this (API Gateway gives up at 29 s)
DEADLINE_SECONDS = 27.0
# the provider truncates nothing: longer descriptions are refused
MAX_DESCRIPTION = 128
# listing refunds: YooKassa's largest page, and a bound on one run's pages
REFUND_PAGE_SIZE = 100
MAX_REFUND_PAGES = 50

# YooKassa's published notification sources
# (https://yookassa.ru/developers/using-api/webhooks, "IP addresses")
TRUSTED_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(network) for network in settings.DEFAULT_YOOKASSA_TRUSTED_NETWORKS
)

# A Lambda's provider calls end this long before the function is stopped, so
# the database write and the response still fit; never less than MIN_BUDGET.
RESPONSE_RESERVE_SECONDS = 3.0
MIN_BUDGET_SECONDS = 1.0

HANDLED_EVENTS = frozenset(
    {"payment.succeeded", "payment.waiting_for_capture", "payment.canceled", "refund.succeeded"}
)

_EVENT = re.compile(r"^[a-z_]+\.[a-z_]+$")
# provider object ids go into URL paths: letters, digits, dashes, underscores
_PROVIDER_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_CENT = Decimal("0.01")
# minor units are stored as bigint
MAX_MINOR_UNITS = 2**63 - 1
MAX_AMOUNT_DIGITS = 17  # the most significant digit of an amount below that


# ------------------------------------------------------------------ amounts


def amount_to_minor_units(value: object) -> int:
    """'99.00' (or 99, or a JSON number such as 250.0) -> 9900, exactly.

    Parsed through Decimal(str(value)), never float arithmetic; more than two
    decimal places, negatives, NaN and non-numbers are InvalidRequest.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise InvalidRequest(f"Not an amount: {value!r}")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise InvalidRequest(f"Not an amount: {value!r}") from exc
    # an exponent like 1e999999999 is finite, but multiplying it overflows
    # the decimal context (a 500, not a refusal): bound it first
    if not amount.is_finite() or amount < 0 or amount.adjusted() > MAX_AMOUNT_DIGITS:
        raise InvalidRequest(f"Not an amount: {value!r}")
    minor = amount * 100
    if minor != minor.to_integral_value():
        raise InvalidRequest(f"An amount has at most two decimal places: {value!r}")
    if minor > MAX_MINOR_UNITS:
        raise InvalidRequest(f"Not an amount: {value!r}")
    return int(minor)


def minor_units_to_amount(minor_units: int) -> str:
    """9900 -> '99.00', the provider's decimal string."""
    if isinstance(minor_units, bool) or not isinstance(minor_units, int) or minor_units < 0:
        raise InvalidRequest(f"Not an amount in minor units: {minor_units!r}")
    return str((Decimal(minor_units) / 100).quantize(_CENT))


def parse_amount(amount: object) -> tuple[int, str]:
    """The provider's `{"value": "99.00", "currency": "RUB"}` -> (9900, "RUB")."""
    if not isinstance(amount, Mapping):
        raise InvalidRequest("An amount is an object with value and currency")
    currency = amount.get("currency")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency):
        raise InvalidRequest(f"Not a currency: {currency!r}")
    return amount_to_minor_units(amount.get("value")), currency


# ------------------------------------------------------------ notifications


class Notification(Model):
    type: str
    event: str
    # the notification's object: the payment, the refund, a deal, a payout...
    object_id: str
    # our handle on it: the payment's id, for a refund its payment's id
    payment_id: str | None
    # minor units, for refund.succeeded
    refund_amount: int | None
    # the object's status as the notification tells it (the webhook re-reads it)
    object_status: str | None

    @property
    def ignored(self) -> bool:
        """An event this backend does not use (deal.closed, payout.succeeded,
        ...): answer 200 and change nothing."""
        return self.event not in HANDLED_EVENTS


def parse_notification(body: bytes | str | Mapping[str, Any]) -> Notification:
    """A YooKassa notification, from the raw request body or parsed JSON.

    Malformed input raises InvalidRequest. Events this backend does not use
    parse too, with `ignored` true.
    """
    if isinstance(body, bytes | str):
        try:
            data: object = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: nesting deeper than the parser goes (within 64 KiB)
            raise InvalidRequest("A notification is a JSON object") from exc
    else:
        data = body
    if not isinstance(data, Mapping):
        raise InvalidRequest("A notification is a JSON object")
    if data.get("type") != "notification":
        raise InvalidRequest("Not a notification: type must be 'notification'")
    event, obj = data.get("event"), data.get("object")
    if not isinstance(event, str) or not _EVENT.fullmatch(event):
        raise InvalidRequest("A notification names its event as '<object>.<status>'")
    if not isinstance(obj, Mapping):
        raise InvalidRequest("A notification carries its object")
    status = obj.get("status")
    object_status = status if isinstance(status, str) else None
    if event not in HANDLED_EVENTS:
        object_id = obj.get("id")
        return Notification(
            type="notification",
            event=event,
            object_id=object_id if isinstance(object_id, str) else "",
            payment_id=None,
            refund_amount=None,
            object_status=object_status,
        )
    object_id = _provider_id(obj.get("id"), "object.id")
    if event.startswith("refund."):
        payment_id = _provider_id(obj.get("payment_id"), "object.payment_id")
        refund_amount, _ = parse_amount(obj.get("amount"))
        if refund_amount <= 0:
            raise InvalidRequest("A refund's amount must be positive")
    else:
        payment_id, refund_amount = object_id, None
    return Notification(
        type="notification",
        event=event,
        object_id=object_id,
        payment_id=payment_id,
        refund_amount=refund_amount,
        object_status=object_status,
    )


def _provider_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not _PROVIDER_ID.fullmatch(value):
        raise InvalidRequest(f"{name} is not a provider id")
    return value


# --------------------------------------------------------- trusted sources

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks() -> tuple[Network, ...]:
    """YOOKASSA_TRUSTED_NETWORKS (a comma list) when set, else the published ones."""
    return settings.yookassa_trusted_networks()


def _address(ip: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(ip, str):
        return None
    text = ip.strip()
    try:
        if "/" in text:
            # API Gateway's sourceIp can read "203.0.113.7/32": one host only
            interface = ipaddress.ip_interface(text)
            if interface.network.prefixlen != interface.max_prefixlen:
                return None
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = interface.ip
        else:
            address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted_source(ip: str, networks: Iterable[Network | str] | None = None) -> bool:
    """Whether a caller's IP lies in YooKassa's notification networks (or the
    given ones). A `/32` (`/128`) suffix is tolerated; garbage is False."""
    address = _address(ip)
    if address is None:
        return False
    chosen = trusted_networks() if networks is None else _as_networks(networks)
    return any(address in network for network in chosen)


def _as_networks(networks: Iterable[Network | str]) -> tuple[Network, ...]:
    return tuple(n if not isinstance(n, str) else ipaddress.ip_network(n.strip()) for n in networks)


# ------------------------------------------------------------------ client


class ProviderPayment(Model):
    id: str
    status: str
    amount: int  # minor units
    currency: str
    paid: bool
    metadata: dict[str, str]
    confirmation_url: str | None


class ProviderRefund(Model):
    id: str
    payment_id: str
    status: str
    amount: int  # minor units
    currency: str


@dataclass(frozen=True)
class YooKassaSettings:
    shop_id: str
    secret_key: str
    api_url: str = API_URL
    return_url: str | None = None

    @classmethod
    def from_env(cls) -> YooKassaSettings:
        """From functions/settings.py: the environment, or Secrets Manager for
        any `<NAME>_SECRET_ARN` (read once per cold start)."""
        shop_id = settings.yookassa_shop_id()
        secret_key = settings.yookassa_secret_key()
        if shop_id is None or secret_key is None:
            missing = [
                name
                for name, value in (("YOOKASSA_SHOP_ID", shop_id), ("YOOKASSA_SECRET_KEY", secret_key))
                if value is None
            ]
            raise ConfigurationError(f"Payments need {' and '.join(missing)}")
        return cls(
            shop_id=shop_id,
            secret_key=secret_key,
            api_url=settings.yookassa_api_url(),
            return_url=settings.yookassa_return_url(),
        )


def idempotence_key(payment: Payment) -> str:
    """The create call's Idempotence-Key: our payment id (a UUID, as the
    provider recommends), so every retry names the same provider payment."""
    return str(payment.id)


# when the current request's provider calls must have ended (the loop's clock)
_budget_ends: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "yookassa_budget_ends", default=None
)


def lambda_budget(lambda_context: object | None) -> float:
    """Seconds the provider may take in this invocation: the Lambda's remaining
    time less RESPONSE_RESERVE_SECONDS, at most DEADLINE_SECONDS (outside
    Lambda, where there is no context, DEADLINE_SECONDS)."""
    remaining = getattr(lambda_context, "get_remaining_time_in_millis", None)
    if not callable(remaining):
        return DEADLINE_SECONDS
    try:
        seconds = float(remaining()) / 1000
    except (TypeError, ValueError):
        return DEADLINE_SECONDS
    return max(MIN_BUDGET_SECONDS, min(DEADLINE_SECONDS, seconds - RESPONSE_RESERVE_SECONDS))


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Provider calls made inside the block (in this task) give up with
    ProviderUnavailable once `seconds` have passed. Database work in the block
    is not cut: only the calls to YooKassa are bounded."""
    token = _budget_ends.set(asyncio.get_running_loop().time() + seconds)
    try:
        yield
    finally:
        _budget_ends.reset(token)


class YooKassaClient:
    """One per process; its httpx.AsyncClient is made on first use and bound
    to the running loop (Mangum keeps one loop per Lambda; a test's new loop
    gets a new client), never per call."""

    def __init__(
        self,
        settings: YooKassaSettings,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        max_attempts: int = MAX_ATTEMPTS,
        backoff: float = BACKOFF_SECONDS,
        deadline: float = DEADLINE_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        # how long one attempt may take: connecting, then waiting for the answer
        self._attempt_seconds = connect_timeout + read_timeout
        self._max_attempts = max(1, max_attempts)
        self._backoff = backoff
        self._deadline = deadline
        self._sleep = sleep
        self._clock = clock
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_env(cls) -> YooKassaClient:
        return cls(YooKassaSettings.from_env())

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop or self._http.is_closed:
            # a client made on another loop holds that loop's sockets: drop it
            self._http = httpx.AsyncClient(
                base_url=self.settings.api_url.rstrip("/") + "/",
                auth=httpx.BasicAuth(self.settings.shop_id, self.settings.secret_key),
                timeout=self._timeout,
                headers={"Accept": "application/json"},
            )
            self._loop = loop
        return self._http

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is not None and self._loop is asyncio.get_running_loop():
            await http.aclose()

    async def create_payment(
        self, payment: Payment, description: str, return_url: str | None = None
    ) -> ProviderPayment:
        """POST /payments for our pending payment: its amount, captured at once,
        paid on the provider's page (confirmation redirect)."""
        return_url = return_url or self.settings.return_url
        if not return_url:
            raise ConfigurationError("Payments need YOOKASSA_RETURN_URL (where the payer comes back to)")
        body = {
            "amount": {"value": minor_units_to_amount(payment.amount), "currency": payment.currency},
            "capture": True,
            "confirmation": {"type": "redirect", "return_url": return_url},
            "description": description[:MAX_DESCRIPTION],
            "metadata": {"payment_id": str(payment.id)},
        }
        data = await self._request("POST", "payments", body=body, key=idempotence_key(payment))
        return _provider_payment(data)

    async def get_payment(self, provider_payment_id: str) -> ProviderPayment:
        path = f"payments/{quote(_provider_id(provider_payment_id, 'payment id'), safe='')}"
        return _provider_payment(await self._request("GET", path))

    async def get_refund(self, provider_refund_id: str) -> ProviderRefund:
        """GET /refunds/{id}: what the webhook re-reads before applying a refund."""
        path = f"refunds/{quote(_provider_id(provider_refund_id, 'refund id'), safe='')}"
        return _provider_refund(await self._request("GET", path))

    async def succeeded_refunds_since(
        self, since: datetime, stop_at: float | None = None
    ) -> list[ProviderRefund]:
        """GET /refunds: the succeeded refunds created at or after `since`,
        newest first, page by page: what the reconciler checks against the
        refunds it has applied. No page is asked for once `stop_at`
        (time.monotonic()) has passed, nor past MAX_REFUND_PAGES; a listed
        refund that cannot be read is logged and left out, not allowed to hide
        the others."""
        params = {
            "created_at.gte": since.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "status": "succeeded",
            "limit": str(REFUND_PAGE_SIZE),
        }
        refunds: list[ProviderRefund] = []
        for page_number in range(MAX_REFUND_PAGES):
            if page_number and stop_at is not None and time.monotonic() >= stop_at:
                log.warning("yookassa: refunds listed up to %d; out of time for the rest", len(refunds))
                return refunds
            page = await self._request("GET", "refunds", params=params)
            items = page.get("items")
            if not isinstance(items, list):
                raise ProviderUnavailable("YooKassa answered with an unexpected list of refunds")
            for item in items:
                try:
                    refunds.append(_provider_refund(item))
                except ProviderUnavailable:
                    refund_id = item.get("id") if isinstance(item, dict) else None
                    log.error("yookassa listed a refund that cannot be read (id %r): left out", refund_id)
            cursor = page.get("next_cursor")
            if not cursor:
                return refunds
            params["cursor"] = str(cursor)
        # newest first: what lies past the cap is the oldest, and no later run
        # reaches it either while this many newer ones are listed
        log.error(
            "yookassa: more than %d refunds since %s; older ones are not checked: shorten "
            "PAYMENT_REFUND_LOOKBACK_MINUTES",
            len(refunds),
            since,
        )
        return refunds

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        key: str | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        ends = _budget_ends.get()
        if ends is None:
            return await self._attempts(method, path, body, key, params)
        budget = asyncio.timeout_at(ends)
        try:
            async with budget:
                return await self._attempts(method, path, body, key, params)
        except TimeoutError as exc:
            if not budget.expired():
                raise
            log.warning("yookassa %s /%s: no answer within the request's time budget", method, path)
            raise ProviderUnavailable("YooKassa did not answer in time") from exc

    async def _attempts(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        key: str | None,
        params: dict[str, str] | None,
    ) -> dict[str, Any]:
        # repeating is safe only where the provider says so: a GET, or a POST
        # under the same Idempotence-Key
        repeatable = method == "GET" or key is not None
        headers = {"Idempotence-Key": key} if key else {}
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            cause: Exception | None = None
            try:
                response = await self._client().request(
                    method, path, json=body, headers=headers, params=params
                )
            except (httpx.TransportError, httpx.DecodingError) as exc:
                # DecodingError: the answer arrived but not whole (a body
                # marked gzip that is not), as unusable as no answer
                cause = exc
                failure = ProviderUnavailable(f"YooKassa unreachable: {type(exc).__name__}")
            else:
                status = response.status_code
                if status == 200:
                    return _json_object(response)
                if status == 429:
                    raise ProviderUnavailable("YooKassa is limiting our requests")
                if 400 <= status < 500:
                    raise _refused(response)
                failure = ProviderUnavailable(f"YooKassa answered {status}")
                if status != 202 and status < 500:
                    raise failure
            delay = self._backoff * 2 ** (attempt - 1)
            if (
                not repeatable
                or attempt >= self._max_attempts
                or self._clock() - started + delay + self._attempt_seconds > self._deadline
            ):
                log.warning("yookassa %s /%s failed after %d attempt(s): %s", method, path, attempt, failure)
                raise failure from cause
            log.info("yookassa %s /%s attempt %d failed (%s); retrying", method, path, attempt, failure)
            await self._sleep(delay)


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise ProviderUnavailable("YooKassa answered with something other than JSON") from exc
    if not isinstance(data, dict):
        raise ProviderUnavailable("YooKassa answered with something other than an object")
    return data


def _refused(response: httpx.Response) -> InvalidRequest:
    try:
        error = response.json()
    except ValueError:
        error = {}
    if not isinstance(error, dict):
        error = {}
    code, description = error.get("code"), error.get("description")
    if response.status_code in (401, 403):
        # our credentials, not the payer's input: the operator must know
        log.error("yookassa refused our credentials (%s %s)", response.status_code, code)
    return InvalidRequest(
        f"YooKassa refused the request: {description or code or response.status_code}",
        details={
            "provider_status": response.status_code,
            "provider_code": code,
            "parameter": error.get("parameter"),
        },
    )


def _provider_refund(data: object) -> ProviderRefund:
    if not isinstance(data, dict):
        raise ProviderUnavailable("YooKassa answered with an unexpected refund")
    try:
        amount, currency = parse_amount(data.get("amount"))
        return ProviderRefund(
            id=data["id"],
            payment_id=data["payment_id"],
            status=data["status"],
            amount=amount,
            currency=currency,
        )
    except (KeyError, TypeError, ValueError, InvalidRequest) as exc:
        raise ProviderUnavailable("YooKassa answered with an unexpected refund") from exc


def _provider_payment(data: dict[str, Any]) -> ProviderPayment:
    try:
        amount, currency = parse_amount(data.get("amount"))
        confirmation = data.get("confirmation") or {}
        metadata = data.get("metadata") or {}
        return ProviderPayment(
            id=data["id"],
            status=data["status"],
            amount=amount,
            currency=currency,
            paid=bool(data.get("paid", False)),
            metadata={str(k): str(v) for k, v in metadata.items()},
            confirmation_url=confirmation.get("confirmation_url"),
        )
    except (KeyError, TypeError, ValueError, AttributeError, InvalidRequest) as exc:
        raise ProviderUnavailable("YooKassa answered with an unexpected payment") from exc


_default: YooKassaClient | None = None
# closings of replaced clients still running (a task nobody holds may be collected)
_retiring: set[asyncio.Task[None]] = set()


def _retire(client: YooKassaClient) -> None:
    """Close a replaced client's connections on their loop, in the background."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if client._http is not None and client._loop is loop:
        task = loop.create_task(client.aclose())
        _retiring.add(task)
        task.add_done_callback(_retiring.discard)


def default_client() -> YooKassaClient:
    """The process's client, built on first use from the settings; built anew
    only when the settings changed (a test, or settings.reset())."""
    global _default
    wanted = YooKassaSettings.from_env()
    if _default is None or _default.settings != wanted:
        if _default is not None:
            _retire(_default)
        _default = YooKassaClient(wanted)
    return _default


async def close_default_client() -> None:
    """Close the process client's connections (on the loop that opened them)."""
    if _default is not None:
        await _default.aclose()
