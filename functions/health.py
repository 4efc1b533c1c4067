"""GET /api/health: liveness and database reachability.

200 `{"status": "ok", "database": "ok"}` after one `select 1`; 503
`{"status": "degraded", "database": "unavailable", "error": ..., "message": ...}`
with Retry-After when the database cannot be reached. Nothing is cached: the
next request after the database is back answers 200 (the pool is made lazily
and remade after a failed start).
"""

from __future__ import annotations

import logging
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database import DatabaseUnavailable, ping
from database.model import Model
from functions.app import build_app
from functions.errors import error_response
from functions.http import json_response
from functions.lambda_entry import LambdaEntry
from functions.openapi import endpoint

log = logging.getLogger("dreamlens.health")


class Health(Model):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unavailable"]


def _degraded() -> Response:
    down = DatabaseUnavailable(retry_after=5)
    return error_response(down, extra={"status": "degraded", "database": "unavailable"})


@endpoint(auth="none", response=Health, errors=[503])
async def health(request: Request) -> Response:
    """Liveness and database reachability."""
    try:
        await ping()
    except DatabaseUnavailable:
        return _degraded()
    except Exception:
        # a wrong password, a missing database, no configuration: the function
        # cannot serve either way; the operator needs the cause in the log
        log.exception("database check failed")
        return _degraded()
    return json_response(Health(status="ok", database="ok"))


routes = [Route("/api/health", health, methods=["GET"])]
app = build_app(routes)
handler = LambdaEntry(app)
