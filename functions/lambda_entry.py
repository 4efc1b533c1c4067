"""LambdaEntry: Mangum, answering for the events Mangum itself cannot read.

Every function module ends with

    handler = LambdaEntry(app)

Mangum reads the event into an ASGI scope and body before the app runs, so
an error there is outside the app's error handling: the invocation fails and
API Gateway answers a bare 500 of its own. Mangum fails on

- an `X-Forwarded-Port` that is not one number (a client's header is
  appended to API Gateway's: `443,80`) or a `Host` with an odd port;
- `isBase64Encoded` with a body that is not base64;
- a v2 event without `headers`, `rawQueryString` or `sourceIp` (API Gateway
  sends them; another invoker may not).

The first and the last are repaired, on a copy and only once Mangum has
failed, so a well-formed event pays nothing; what cannot be repaired is the
API's 400 `invalid_request`.
"""

from __future__ import annotations

import binascii
import json
import logging
import re
from typing import Any

from mangum import Mangum
from mangum.protocols import HTTPCycle
from mangum.types import LambdaContext, LambdaEvent, LambdaHandler, Scope

from functions.errors import MalformedRequest, error_body

log = logging.getLogger(__name__)

_READABLE_HOST = re.compile(r"[^:]*(:[0-9]+)?")

# what Mangum raises on an event it cannot read (binascii.Error, from a bad
# base64 body, is a ValueError; RuntimeError: no handler fits the event)
UNREADABLE = (KeyError, TypeError, AttributeError, ValueError, RuntimeError)


class LambdaEntry(Mangum):
    def __init__(self, app: Any) -> None:
        super().__init__(app, lifespan="off")

    def __call__(self, event: LambdaEvent, context: LambdaContext) -> dict[str, Any]:
        # only the reading is tried again: the app runs once, whatever it
        # wrote, so nothing it did can be done twice
        try:
            handler, scope, body = self._read(event, context)
        except UNREADABLE:
            try:
                handler, scope, body = self._read(repaired_event(event), context)
            except UNREADABLE as exc:
                log.warning("unreadable event: %s: %s", type(exc).__name__, exc)
                return unreadable_event_response(exc)
        return handler(HTTPCycle(scope, body)(self.app))

    def _read(self, event: LambdaEvent, context: LambdaContext) -> tuple[LambdaHandler, Scope, bytes]:
        """What Mangum's own __call__ reads from the event before it runs the app."""
        handler = self.infer(event, context)
        return handler, handler.scope, handler.body


def repaired_event(event: Any) -> Any:
    """A copy of the event with what Mangum trips on and the app does not
    need put right: the headers it reads the server from, and the keys of a
    v2 event API Gateway always sends."""
    if not isinstance(event, dict):
        return event
    event = dict(event)
    headers = event.get("headers")
    event["headers"] = _server_headers_repaired(headers if isinstance(headers, dict) else {})
    if event.get("version") == "2.0":
        if not isinstance(event.get("rawQueryString"), str):
            event["rawQueryString"] = ""
        context = event.get("requestContext")
        if isinstance(context, dict) and isinstance(context.get("http"), dict):
            http = dict(context["http"])
            # no address: the app then applies no per-network signup limit,
            # as for any invoker outside API Gateway (functions/identity.py)
            http.setdefault("sourceIp", "")
            event["requestContext"] = {**context, "http": http}
    return event


def _server_headers_repaired(headers: dict[str, Any]) -> dict[str, Any]:
    """Mangum reads the server from `Host` (name:port, one colon) or else
    `X-Forwarded-Port` (one number); the app never uses it. A port list keeps
    its first port; a value that cannot be read so is left out."""
    repaired: dict[str, Any] = {}
    for name, value in headers.items():
        lowered = str(name).lower()
        if lowered == "x-forwarded-port":
            value = str(value).split(",")[0].strip()
            if not value.isdecimal():
                continue
        elif lowered == "host" and not _READABLE_HOST.fullmatch(str(value)):
            continue
        repaired[name] = value
    return repaired


def unreadable_event_response(exc: BaseException) -> dict[str, Any]:
    """The API's 400 in a shape both API Gateway payload versions accept."""
    if isinstance(exc, binascii.Error):
        message = "The request could not be read: its body is marked base64 and is not"
    else:
        message = "The request could not be read"
    return {
        "statusCode": 400,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(error_body(MalformedRequest(message))),
        "isBase64Encoded": False,
    }
