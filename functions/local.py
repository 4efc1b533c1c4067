"""Every function's routes in one Starlette app, for `dreamlens serve` and for
tests that talk HTTP. Lambda never imports this: each function is deployed
alone with only its own routes."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from functions import (
    generations,
    health,
    init_db,
    payments,
    subscription,
    tokens,
    user,
    webhook,
    worker,
)
from functions.app import build_local_app

FUNCTION_MODULES = (health, user, tokens, generations, worker, payments, webhook, subscription, init_db)


def all_routes() -> list[BaseRoute]:
    return [route for module in FUNCTION_MODULES for route in module.routes]


def build() -> Starlette:
    return build_local_app(all_routes())
