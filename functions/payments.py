"""Buying tokens and plans: the catalogue, creating a YooKassa payment, and
reading one back.

    GET  /api/packages        what can be bought (no sign-in)
    POST /api/payments        {package_id}, optional Idempotency-Key -> 201 with confirmation_url
    GET  /api/payments/{id}   one of the caller's payments

Creating a payment is three steps that can each fail on their own: store the
pending payment (keyed by the client's Idempotency-Key, or a key of our own
when it sends none), create it at YooKassa (its Idempotence-Key is our
payment's id), and attach YooKassa's payment to ours. Any repeat of the
request finds the stored payment; when it has no provider payment yet (the
provider was down, or its answer was lost), the repeat creates it again
under the same Idempotence-Key, which YooKassa answers with the payment it
already made. So however often a client repeats, there is one payment row and
one provider payment.

A request refused for its package writes nothing, not even a new device's
user: the package is checked first (repositories.packages.package_state: no
round trip for an id last seen on sale), and a caller never seen before is
created only after the database confirms the package is on sale now. A
retired package can only be named by a repeat of a payment made before it
was retired, whose payer exists.

Tokens are credited by the webhook (functions/webhook.py) or, when its
notification is lost, by the reconciler (functions/jobs.py), never here.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Literal
from uuid import UUID, uuid4

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database import Conflict, InvalidRequest, NotFound, ProviderUnavailable
from database.model import Model
from functions.app import build_app
from functions.http import RequestModel, idempotency_key, json_response, no_query_params, read_json
from functions.identity import current_user, known_user
from functions.lambda_entry import LambdaEntry
from functions.openapi import endpoint
from repositories import packages, payments
from repositories.payments import Payment

log = logging.getLogger("dreamlens.payments")

MINOR_UNITS = "Price in minor units of `currency` (kopecks for RUB): 9900 is 99.00 RUB"


class PackageItem(Model):
    id: str
    kind: Literal["tokens", "plan"]
    tokens: int = Field(description="Tokens credited when the payment succeeds")
    plan: str | None = Field(description="The plan a `plan` package activates or extends")
    period_days: int | None = Field(description="How long the plan lasts, for a `plan` package")
    amount: int = Field(description=MINOR_UNITS)
    currency: str = Field(description="ISO 4217 code")
    description: str


class PackageList(Model):
    items: list[PackageItem]


class CreatePayment(RequestModel):
    package_id: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9_]+$",
        description="An `id` from GET /api/packages",
        examples=["tokens_50"],
    )


class PaymentCreated(Model):
    id: UUID
    status: Literal["pending"]
    confirmation_url: str | None = Field(
        description="Where the payer pays (YooKassa's page); they come back to the app's return URL"
    )
    amount: int = Field(description=MINOR_UNITS)
    currency: str
    package_id: str


class PaymentView(Model):
    id: UUID
    package_id: str
    status: Literal["pending", "waiting_for_capture", "succeeded", "canceled", "refunded"]
    amount: int = Field(description=MINOR_UNITS)
    currency: str
    tokens: int
    refunded_amount: int = Field(description="Refunded so far, in minor units")
    confirmation_url: str | None
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None


def _created(payment: Payment) -> PaymentCreated:
    # the first response again: a repeat answers what the creation answered,
    # whatever has happened to the payment since (GET /api/payments/{id} tells)
    return PaymentCreated(
        id=payment.id,
        status="pending",
        confirmation_url=payment.confirmation_url,
        amount=payment.amount,
        currency=payment.currency,
        package_id=payment.package_id,
    )


def _view(payment: Payment) -> PaymentView:
    return PaymentView.model_validate(payment.model_dump())


def _description(payment: Payment) -> str:
    # From the stored payment only: a repeat must send YooKassa the same body
    # under the same Idempotence-Key, even if the catalogue changed meanwhile.
    return f"DreamLens {payment.package_id}: {payment.tokens} tokens"


async def _create_at_provider(request: Request, payment: Payment) -> Payment:
    # imported here: httpx is most of its import cost, and a cold start that
    # serves GET /api/packages or GET /api/payments/{id} never needs it
    from functions import yookassa

    client = yookassa.default_client()
    with yookassa.time_budget(yookassa.lambda_budget(request.scope.get("aws.context"))):
        try:
            created = await client.create_payment(payment, _description(payment))
        except InvalidRequest as exc:
            # YooKassa refusing our request is our configuration (credentials,
            # shop settings), not the caller's input: they may repeat later
            log.error("yookassa refused to create payment %s: %s", payment.id, exc.message)
            raise ProviderUnavailable("The payment provider refused the payment; try again later") from exc
    return await payments.attach_provider_payment(payment.id, created.id, created.confirmation_url)


@endpoint(auth="none", response=PackageList, errors=[422])
async def list_packages(request: Request) -> Response:
    """What can be bought: token packs and plans.

    `amount` is in minor units of `currency` (kopecks for RUB: 9900 is
    99.00 RUB), exactly as stored; show it divided by 100.
    """
    no_query_params(request)
    items = [PackageItem.model_validate(package.model_dump()) for package in await packages.list_packages()]
    return json_response(PackageList(items=items))


def _not_on_sale(package_id: str) -> InvalidRequest:
    return InvalidRequest(
        f"No package {package_id!r} can be bought",
        details=[{"loc": ["body", "package_id"], "msg": "is not a package on sale", "type": "unknown"}],
    )


@endpoint(
    auth="user", request=CreatePayment, response=PaymentCreated, status=201, errors=[409], idempotent=True
)
async def create_payment(request: Request) -> Response:
    """Create a YooKassa payment for a package.

    Send the payer to `confirmation_url`; the tokens (and the plan) arrive
    when YooKassa reports the payment succeeded. A repeat with the same
    `Idempotency-Key` answers the same payment and the same body. 503 when
    YooKassa cannot be reached: repeat with the same key. 409 when the key
    was used for another package, or when a payment left without YooKassa's
    answer for a day was abandoned: start a new one with a new key. `amount`
    is in minor units.
    """
    # the input first: a new device's first sight writes its user and bonus,
    # which a request refused for its body must not do
    no_query_params(request)
    body = await read_json(request, CreatePayment)
    client_key = idempotency_key(request)
    state = await packages.package_state(body.package_id)
    if state == "unknown":
        raise _not_on_sale(body.package_id)
    user = await known_user(request)
    if user is None:
        # a new caller is written (with its welcome bonus) only for a package
        # on sale as the database says now: this process may have seen it on
        # sale before it was retired. A retired package is answered only for
        # a repeat of a payment made before, whose payer exists.
        if state == "retired" or await packages.package_state(body.package_id, fresh=True) != "on sale":
            raise _not_on_sale(body.package_id)
        user = await current_user(request)
    key = client_key or f"auto:{uuid4()}"
    try:
        payment, _ = await payments.create_pending_payment(user.id, body.package_id, key)
    except InvalidRequest as exc:
        # the package is the only input the statement can refuse: retired
        # since this process saw it on sale
        packages.package_refused(body.package_id)
        raise _not_on_sale(body.package_id) from exc
    if payment.provider_payment_id is None:
        if payment.status != "pending":
            # abandoned by the reconciler: never create a payable payment for it
            raise Conflict(payments.ABANDONED)
        payment = await _create_at_provider(request, payment)
    return json_response(_created(payment), status=201)


@endpoint(auth="user", response=PaymentView, errors=[422])
async def get_payment(request: Request) -> Response:
    """One of the caller's payments; another user's answers 404."""
    no_query_params(request)
    payment_id: UUID = request.path_params["id"]
    # a caller never seen has no payment: not created (nor given a welcome
    # bonus) for a 404
    user = await known_user(request)
    if user is None:
        raise NotFound(f"No payment {payment_id}")
    return json_response(_view(await payments.get_payment(user.id, payment_id)))


routes = [
    Route("/api/packages", list_packages, methods=["GET"]),
    Route("/api/payments", create_payment, methods=["POST"]),
    Route("/api/payments/{id:uuid}", get_payment, methods=["GET"]),
]
app = build_app(routes)
handler = LambdaEntry(app)
