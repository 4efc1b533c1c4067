"""What handlers use to read a request and shape a response.

    body = await read_json(request, CreateGeneration)   # 400 unreadable, 422 invalid
    limit, before = page_params(request, cursor=UUID)   # 422 for anything else
    no_query_params(request)                            # 422 for any query parameter
    key = idempotency_key(request)                      # None, or 1-200 printable ASCII, no comma
    return json_response(generation, status=201)

Request models derive from `RequestModel`: unknown fields and over-long
strings are refused by default; read_json() also refuses NUL characters.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import to_json
from starlette.requests import Request
from starlette.responses import Response

from database import InvalidRequest
from database.model import Model
from functions.errors import MalformedRequest

M = TypeVar("M", bound=BaseModel)
C = TypeVar("C", str, int, UUID)

# a backstop for any string field that does not set its own max_length
DEFAULT_MAX_STRING = 4096

DEFAULT_PAGE_LIMIT = 50
MAX_PAGE_LIMIT = 100
PAGE_PARAMS = frozenset({"limit", "before"})
MAX_BIGINT = 2**63 - 1

IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,200}")


def _nul_at(document: Any) -> list[Any] | None:
    """Where in a JSON document the first string holding NUL is, or None.

    A loop over its own stack, not a recursion: a body nested deeper than
    the interpreter's frames allow parses on Python 3.12 (whose parser no
    longer shares the recursion limit) and must still be walked."""
    pending: list[tuple[Any, list[Any]]] = [(document, [])]
    while pending:
        value, where = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return where
        elif isinstance(value, list):
            pending.extend((item, [*where, index]) for index, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                # the key before its value, as they are read
                pending.append((item, [*where, key]))
                pending.append((key, [*where, key]))
    return None


def refuse_nul(raw: bytes, document: dict[str, Any]) -> None:
    """PostgreSQL text cannot hold NUL: refuse it as a 422, by field. JSON
    carries NUL only as the escape \\u0000 (a raw one is not valid JSON),
    so a body without that escape, nearly every body, is not walked at all."""
    if b"\\u0000" not in raw:
        return
    where = _nul_at(document)
    if where is not None:
        message = "must not contain NUL characters"
        raise InvalidRequest(
            "Request body is invalid", details=[{"loc": where, "msg": message, "type": "value_error"}]
        )


class RequestModel(Model):
    """Base of every request body: strict about what it accepts (read_json
    also refuses NUL characters, before the model sees the body)."""

    model_config = ConfigDict(extra="forbid", str_max_length=DEFAULT_MAX_STRING, allow_inf_nan=False)


# At most this many issues in an error body. One per unknown key would let a
# 64 KiB body of short keys come back as a 550 KB answer, and a raised
# MAX_BODY_BYTES as one over the 6 MB a Lambda may return (the invocation
# fails: a 5xx for bad input). The first few say what is wrong.
MAX_DETAILS = 20


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Where and why (the first MAX_DETAILS issues), never the input itself
    (it may be a prompt or a secret)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    return [
        {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
        for error in errors[:MAX_DETAILS]
    ]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}` (every field optional)."""
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRequest("Request body is not UTF-8") from exc
    try:
        # NaN and Infinity are Python's extension, not JSON
        document = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest("Request body is not valid JSON") from exc
    if not isinstance(document, dict):
        raise MalformedRequest("Request body must be a JSON object")
    return document


# A body up to this size is first given to pydantic's own JSON parser, which
# reads and validates it in one pass (about 20 µs less per request than
# json.loads and model_validate, bench/warm_overhead.py). Whatever it refuses
# takes the long way below, which says why in the API's terms; the bound
# keeps a wide object's one error per key from costing more than a few ms.
FAST_BODY_BYTES = 8192


async def read_json(request: Request, model: type[M]) -> M:
    """The body validated by `model`: 400 when unreadable, 422 with details when invalid."""
    raw = await request.body()
    # an escaped NUL is refused below (pydantic would accept it); NaN and
    # Infinity never validate: RequestModel forbids them where a float could
    if len(raw) <= FAST_BODY_BYTES and b"\\u0000" not in raw:
        try:
            return model.model_validate_json(raw)
        except ValidationError:
            pass  # the long way gives the error
    document = parse_json_object(raw)
    refuse_nul(raw, document)
    if model.model_config.get("extra") == "forbid":
        # refuse unknown keys before pydantic: it would build one error per key,
        # and a wide object (a body of 180,000 keys) costs seconds and memory
        unknown = [key for key in document if key not in model.model_fields]
        if unknown:
            raise InvalidRequest(
                "Request body is invalid",
                details=[
                    {"loc": [key], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
                    for key in unknown[:MAX_DETAILS]
                ],
            )
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise InvalidRequest("Request body is invalid", details=validation_details(exc)) from exc


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`data` as JSON: pydantic models (anywhere inside) in JSON mode, UUIDs and
    datetimes as strings."""
    return Response(to_json(data), status_code=status, headers=headers, media_type="application/json")


class Page(NamedTuple):
    limit: int
    before: Any


def _query_error(name: str, message: str, kind: str) -> InvalidRequest:
    return InvalidRequest(
        f"Query parameter {name!r} {message}",
        details=[{"loc": ["query", name], "msg": message, "type": kind}],
    )


def _cursor(raw: str, cursor: type[C]) -> C:
    if cursor is UUID:
        try:
            return UUID(raw)  # type: ignore[return-value]
        except ValueError as exc:
            raise _query_error("before", "must be a UUID", "uuid_parsing") from exc
    if cursor is int:
        # the length first: int() refuses more than 4,300 digits with a ValueError
        if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_BIGINT:
            raise _query_error("before", "must be a positive integer id", "int_parsing")
        return int(raw)  # type: ignore[return-value]
    if not 1 <= len(raw) <= 200 or "\x00" in raw:
        raise _query_error("before", "must be 1-200 characters", "string_type")
    return raw  # type: ignore[return-value]


def page_params(request: Request, cursor: type[C] = str) -> Page:  # type: ignore[assignment]
    """`limit` (1-100, default 50) and `before` (the previous page's `next_before`,
    parsed as `cursor`); any other query parameter is a 422."""
    params = request.query_params
    for name in params:
        if name not in PAGE_PARAMS:
            raise _query_error(name, "is not accepted here", "extra_forbidden")
        if len(params.getlist(name)) > 1:
            raise _query_error(name, "is given more than once", "duplicate")
    limit = DEFAULT_PAGE_LIMIT
    raw_limit = params.get("limit")
    if raw_limit is not None:
        if not raw_limit.isascii() or not raw_limit.isdigit() or len(raw_limit) > 3:
            raise _query_error("limit", "must be an integer from 1 to 100", "int_parsing")
        limit = int(raw_limit)
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            raise _query_error("limit", "must be an integer from 1 to 100", "less_than_equal")
    raw_before = params.get("before")
    before = _cursor(raw_before, cursor) if raw_before is not None else None
    return Page(limit, before)


def no_query_params(request: Request) -> None:
    """Refuse any query parameter on an endpoint that takes none (422), as a
    list refuses anything but `limit` and `before`: `?quality=hd` on a POST
    must not pass silently as the default."""
    if not request.scope.get("query_string"):
        return  # nothing sent: no need to parse
    names = list(request.query_params)
    if names:
        raise _query_error(names[0], "is not accepted here", "extra_forbidden")


def _header_error(name: str, message: str, kind: str) -> InvalidRequest:
    return InvalidRequest(
        f"{name} {message}", details=[{"loc": ["header", name], "msg": message, "type": kind}]
    )


def idempotency_key(request: Request) -> str | None:
    """The `Idempotency-Key` header: None when absent, else 1-200 printable ASCII
    characters without a comma (422 otherwise)."""
    values = request.headers.getlist("idempotency-key")
    if not values:
        return None
    if len(values) > 1:
        raise _header_error("Idempotency-Key", "is given more than once", "duplicate")
    key = values[0]
    if "," in key:
        # API Gateway joins a repeated header's values with commas: a key sent
        # twice arrives as "k,k" and must not pass for a new key
        raise _header_error("Idempotency-Key", "is given more than once (or holds a comma)", "duplicate")
    if not IDEMPOTENCY_KEY.fullmatch(key) or not key.strip():
        raise _header_error(
            "Idempotency-Key", "must be 1-200 printable ASCII characters", "string_pattern_mismatch"
        )
    return key
