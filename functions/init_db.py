"""POST /api/init-db: create or upgrade the schema (idempotent).

Guarded by the `X-Init-Secret` header, compared in constant time with
DB_INIT_SECRET. Without DB_INIT_SECRET the endpoint does not exist (404), so
a deployment that never set it exposes nothing. The secret travels only in
the header: never in a query string, never in a log line.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database import Forbidden, NotFound, init_database, run_with_retries
from database.model import Model
from functions import settings
from functions.app import build_app
from functions.http import json_response
from functions.lambda_entry import LambdaEntry
from functions.openapi import endpoint


class InitResult(Model):
    initialized: bool
    applied: list[str]


def check_init_secret(request: Request) -> None:
    expected = settings.db_init_secret()
    if expected is None:
        raise NotFound("Not found")
    given = request.headers.get("x-init-secret", "")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8")):
        raise Forbidden("Wrong or missing X-Init-Secret")


@endpoint(auth="init", response=InitResult, errors=[409])
async def init_db(request: Request) -> Response:
    """Create or upgrade the schema; lists the migrations applied (none when up to date).

    409 when the database was migrated by newer code than this.
    """
    check_init_secret(request)
    # init_database holds an advisory lock in one transaction and is idempotent,
    # so a retry after a dropped connection is safe
    applied = await run_with_retries(init_database)
    return json_response(InitResult(initialized=True, applied=applied))


routes = [Route("/api/init-db", init_db, methods=["POST"])]
app = build_app(routes)
handler = LambdaEntry(app)
