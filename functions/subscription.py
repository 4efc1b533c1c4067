"""GET /api/subscription: the caller's plan, its daily limit and today's use.

Without an active, unexpired subscription the caller is on `free` with status
`none` and no period end. `used_today` counts generations since 00:00 UTC;
the limit itself is decided by the spend (repositories/generations.py).
"""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database.model import Model
from functions.app import build_app
from functions.http import json_response, no_query_params
from functions.identity import current_user
from functions.lambda_entry import LambdaEntry
from functions.openapi import endpoint
from repositories import subscriptions


class SubscriptionStatus(Model):
    plan: str
    status: str  # "active", or "none" on the free plan
    current_period_end: datetime | None
    daily_generation_limit: int
    used_today: int


@endpoint(auth="user", response=SubscriptionStatus, errors=[422])
async def get_subscription(request: Request) -> Response:
    """The caller's plan, when it ends, its daily generation limit and today's use."""
    no_query_params(request)
    user = await current_user(request)
    subscription = await subscriptions.get_subscription(user.id)
    return json_response(SubscriptionStatus.model_validate(subscription, from_attributes=True))


routes = [Route("/api/subscription", get_subscription, methods=["GET"])]
app = build_app(routes)
handler = LambdaEntry(app)
