"""build_app(): the one factory every function module builds its app with.

    routes = [Route("/api/tokens", get_tokens)]
    app = build_app(routes)
    handler = LambdaEntry(app)   # Mangum, answering for events it cannot read

It adds, outermost first:

1. RequestLog: one JSON log line per request (functions/logging.py) with the
   database totals of the request, an `X-Request-Id` response header, and the
   last line of defence: an exception nothing else handled becomes 500
   `internal` (logged with its traceback, never shown). In Lambda it also
   bounds the request's database work by the invocation's remaining time
   (database_budget), so a database that stops answering is a 503 before
   Lambda stops the function, never a dead invocation.
2. BodyLimit: request bodies over MAX_BODY_BYTES are refused with 413, from
   Content-Length before the app runs and while the body streams in.
3. Exception handlers, in one place: the project's errors and Starlette's
   404/405 as the API's JSON error body (functions/errors.py).

Both middleware are plain ASGI: BaseHTTPMiddleware would add a task and
memory streams to every request.
"""

from __future__ import annotations

import gc
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from database import DreamLensError, stats, time_budget
from functions import metrics, settings
from functions.errors import (
    MalformedRequest,
    PayloadTooLarge,
    error_code,
    error_response,
    http_code,
    http_error_response,
    log_unexpected,
    status_for,
)
from functions.logging import log_request

REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.")
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9\-_=.]{1,128}")


def request_id(scope: Scope) -> str:
    """API Gateway's request id, else Lambda's, else a new one."""
    event = scope.get("aws.event")
    candidate: Any = None
    if isinstance(event, dict):
        candidate = (event.get("requestContext") or {}).get("requestId")
    if not candidate:
        candidate = getattr(scope.get("aws.context"), "aws_request_id", None)
    if isinstance(candidate, str) and candidate:
        if _SAFE_REQUEST_ID.fullmatch(candidate):
            return candidate
        # it goes into a response header: keep it to a safe alphabet and size
        cleaned = "".join(ch for ch in candidate[:128] if ch in _REQUEST_ID_CHARS)
        if cleaned:
            return cleaned
    return uuid.uuid4().hex


# what the answer needs once the database has given up: a 503 takes no
# database work, only the response and the log line
RESPONSE_RESERVE_SECONDS = 1.0
MIN_DATABASE_SECONDS = 0.5


def database_budget(scope: Scope) -> float | None:
    """Seconds the request's database work may take: the Lambda's remaining
    time less RESPONSE_RESERVE_SECONDS (at least MIN_DATABASE_SECONDS);
    None outside Lambda (the local server), where only the configured
    timeouts apply."""
    remaining = getattr(scope.get("aws.context"), "get_remaining_time_in_millis", None)
    if not callable(remaining):
        return None
    try:
        seconds = float(remaining()) / 1000
    except (TypeError, ValueError):
        return None
    return max(MIN_DATABASE_SECONDS, seconds - RESPONSE_RESERVE_SECONDS)


def _route_template(scope: Scope) -> str | None:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, rid.encode("ascii"))],
                }
            await send(message)

        with (
            stats.collect() as counted,
            metrics.gathered() as counted_by_endpoint,
            time_budget(database_budget(scope)),
        ):
            try:
                # URLs kept in Secrets Manager must reach os.environ before the first statement
                settings.load_database_secrets()
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                # Only what escaped the exception handlers gets here: a bug, or an
                # error raised by middleware (BodyLimit, the secrets above).
                state["error"] = error_code(exc)
                if not response_started:
                    await error_response(exc)(scope, receive, send_with_id)
                elif status_for(exc) == 500:
                    log_unexpected(exc)  # the client already has its status
        fields: dict[str, Any] = {
            "request_id": rid,
            "method": scope.get("method"),
            "route": _route_template(scope),
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            **counted.as_log_fields(),
        }
        user_id = state.get("user_id")
        if user_id is not None:
            fields["user_id"] = str(user_id)
        if state.get("error"):
            fields["error"] = state["error"]
        log_request(fields, counted_by_endpoint)


def _content_length(scope: Scope) -> int | None:
    # ASGI header names are lower-case bytes: read them as they are
    values = [value.decode("latin-1") for name, value in scope["headers"] if name == b"content-length"]
    if not values:
        return None
    if len(values) > 1 or not values[0].isascii() or not values[0].strip().isdigit():
        raise MalformedRequest("Content-Length is not a number")
    digits = values[0].strip().lstrip("0")
    # more digits than any body can have (int() refuses over 4,300 of them)
    return int(digits or "0") if len(digits) <= 18 else 10**18


class BodyLimit:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = settings.max_body_bytes()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise PayloadTooLarge(limit)
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # raised inside the handler's `await request.body()`: the
                    # exception handlers turn it into the 413
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, receive_within_limit, send)


async def _project_error(request: Request, exc: Exception) -> Response:
    request.state.error = error_code(exc)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    request.state.error = http_code(exc.status_code)
    if exc.status_code == 405:
        exc = HTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": _allowed(request)})
    return http_error_response(exc)


def _allowed(request: Request) -> str:
    """Every method the path answers. Starlette's 405 names those of the
    first route on the path only, and a path served by two routes (GET and
    POST /api/generations) would tell the client only one of them."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


EXCEPTION_HANDLERS = {DreamLensError: _project_error, HTTPException: _http_error}


class FunctionApp(Starlette):
    """Starlette without its outermost ServerErrorMiddleware: RequestLog is
    already the last line of defence (an unhandled exception becomes the 500
    `internal` JSON body, logged once), and a second one around it cost every
    warm request a layer of calls and wrapped sends for nothing."""

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = ExceptionMiddleware(self.router, handlers=self.exception_handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app


def build_app(routes: Sequence[BaseRoute]) -> Starlette:
    app = FunctionApp(
        routes=list(routes),
        middleware=[Middleware(RequestLog), Middleware(BodyLimit)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    # Everything imported so far (modules, model classes, the app) lives as
    # long as the process: the collector stops re-scanning it. Its
    # full collections otherwise walk every one of those objects again, a
    # cost each warm request shares (about 25 µs measured, bench/warm_overhead.py).
    gc.freeze()
    return app


def build_local_app(routes: Sequence[BaseRoute]) -> Starlette:
    """Every function's routes in one app, plus GET /api/openapi.json (`dreamlens serve`)."""
    from functions.openapi import document_route

    return build_app([*routes, document_route(routes)])
