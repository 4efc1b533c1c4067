"""The OpenAPI 3.1 document, generated from the routes and their pydantic models.

A handler declares what it takes and gives with `@endpoint`:

    @endpoint(request=CreateGeneration, response=Generation, status=201,
              auth="user", errors=[402, 429], idempotent=True)
    async def create_generation(request: Request) -> Response: ...

    @endpoint(response=TransactionPage, auth="user", paged=int)
    async def list_transactions(request: Request) -> Response: ...

The decorator only records; the handler still reads its input with
functions/http.py (read_json, page_params, idempotency_key), which produce
exactly the errors documented here. Errors every endpoint of a kind can give
are added from what it declares (a body: 400/413/422; a path parameter: 404;
`auth="user"`: 401/403/429; the database: 503), so the document stays honest
for schemathesis, which checks responses against it.

Nothing here runs at import beyond the decorator: the document is built on
the first GET /api/openapi.json (the local app only; a Lambda never builds it).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from functions.http import MAX_DETAILS

Auth = Literal["none", "user", "clerk", "callback", "init", "webhook"]
F = TypeVar("F", bound=Callable[..., Any])

OPENAPI_VERSION = "3.1.0"
DOCUMENT_PATH = "/api/openapi.json"
SCHEMA_REF = "#/components/schemas/{model}"

ERROR_CODES = [
    "invalid_request",
    "unauthorized",
    "forbidden",
    "device_linked",
    "not_found",
    "conflict",
    "insufficient_tokens",
    "rate_limited",
    "unavailable",
    "internal",
]

SECURITY_SCHEMES = {
    "clerkSession": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
    "deviceId": {"type": "apiKey", "in": "header", "name": "X-Device-Id"},
    "callbackSecret": {"type": "apiKey", "in": "header", "name": "X-Callback-Secret"},
    "initSecret": {"type": "apiKey", "in": "header", "name": "X-Init-Secret"},
}

SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "none": [],
    "user": [{"clerkSession": []}, {"deviceId": []}],
    "clerk": [{"clerkSession": []}],
    "callback": [{"callbackSecret": []}],
    "init": [{"initSecret": []}],
    # YooKassa: trusted source networks, then the status re-fetched from its API
    "webhook": [],
}

# errors implied by the kind of caller
AUTH_ERRORS: dict[str, tuple[int, ...]] = {
    "none": (),
    "user": (401, 403, 429),  # 403 device_linked; 429 new anonymous users per IP
    "clerk": (401,),
    "callback": (403,),
    "init": (403, 404),  # 404 while DB_INIT_SECRET is unset
    "webhook": (400, 403),
}


@dataclass(frozen=True)
class Endpoint:
    auth: Auth
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    summary: str | None = None
    # a list endpoint: `limit` and `before` (parsed as this type) in the query
    paged: type | None = None
    # an Idempotency-Key header: True, or what a repeat with the key answers
    # where that is not simply the first response
    idempotent: bool | str = False
    # every endpoint but the document itself may answer 503 when the database is down
    uses_database: bool = True


def endpoint(
    *,
    auth: Auth,
    request: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    status: int = 200,
    errors: Iterable[int] = (),
    summary: str | None = None,
    paged: type | None = None,
    idempotent: bool | str = False,
    uses_database: bool = True,
) -> Callable[[F], F]:
    """Record what a handler takes and gives, for the OpenAPI document."""
    spec = Endpoint(
        auth=auth,
        request=request,
        response=response,
        status=status,
        errors=tuple(errors),
        summary=summary,
        paged=paged,
        idempotent=idempotent,
        uses_database=uses_database,
    )

    def attach(handler: F) -> F:
        handler.__dict__["openapi_endpoint"] = spec
        return handler

    return attach


def endpoint_of(handler: Any) -> Endpoint | None:
    spec = getattr(handler, "openapi_endpoint", None)
    return spec if isinstance(spec, Endpoint) else None


# ------------------------------------------------------------------ document

_PATH_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::[A-Za-z_]+)?}")

_CONVERTOR_SCHEMAS: dict[str, dict[str, Any]] = {
    "StringConvertor": {"type": "string"},
    "PathConvertor": {"type": "string"},
    "IntegerConvertor": {"type": "integer", "minimum": 0},
    "FloatConvertor": {"type": "number", "minimum": 0},
    "UUIDConvertor": {"type": "string", "format": "uuid"},
}


def _cursor_schema(cursor: type) -> dict[str, Any]:
    if cursor is int:
        return {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    if cursor is UUID:
        return {"type": "string", "format": "uuid"}
    return {"type": "string", "minLength": 1, "maxLength": 200}


def _error_schemas() -> dict[str, Any]:
    return {
        "ValidationIssue": {
            "type": "object",
            "required": ["loc", "msg", "type"],
            "properties": {
                "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                "msg": {"type": "string"},
                "type": {"type": "string"},
            },
        },
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "enum": ERROR_CODES},
                "message": {"type": "string"},
                "details": {
                    "type": "array",
                    "maxItems": MAX_DETAILS,
                    "items": {"$ref": "#/components/schemas/ValidationIssue"},
                },
                "balance": {"type": "integer"},
                "cost": {"type": "integer"},
            },
        },
        "InsufficientTokensError": {
            "allOf": [
                {"$ref": "#/components/schemas/Error"},
                {"type": "object", "required": ["balance", "cost"]},
            ]
        },
    }


def _error_response(status: int) -> dict[str, Any]:
    schema = "InsufficientTokensError" if status == 402 else "Error"
    response: dict[str, Any] = {
        "description": HTTPStatus(status).phrase,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if status in (429, 503):
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}
        }
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return response


def _walk(routes: Iterable[BaseRoute], prefix: str = "") -> Iterable[tuple[str, Route]]:
    for route in routes:
        if isinstance(route, Route):
            yield prefix + route.path, route
        elif isinstance(route, Mount):
            yield from _walk(route.routes, prefix + route.path)


def _docstring(handler: Any) -> tuple[str | None, str | None]:
    text = inspect.getdoc(handler)
    if not text:
        return None, None
    first, _, rest = text.partition("\n")
    return first.strip() or None, rest.strip() or None


def _tag(path: str) -> str:
    parts = [part for part in path.split("/") if part and part != "api"]
    return parts[0] if parts else "api"


ModelUse = tuple[type[BaseModel], Literal["validation", "serialization"]]


def _model_uses(specs: Iterable[Endpoint]) -> list[ModelUse]:
    uses: list[ModelUse] = []
    for spec in specs:
        if spec.request is not None and (spec.request, "validation") not in uses:
            uses.append((spec.request, "validation"))
        if spec.response is not None and (spec.response, "serialization") not in uses:
            uses.append((spec.response, "serialization"))
    return uses


def _operation(
    path: str, route: Route, method: str, spec: Endpoint | None, refs: dict[Any, Any], operation_id: str
) -> dict[str, Any]:
    summary, description = _docstring(route.endpoint)
    operation: dict[str, Any] = {"operationId": operation_id, "tags": [_tag(path)]}
    if spec is not None and spec.summary:
        summary = spec.summary
    if summary:
        operation["summary"] = summary
    if description:
        operation["description"] = description

    parameters: list[dict[str, Any]] = []
    for name, convertor in route.param_convertors.items():
        schema = _CONVERTOR_SCHEMAS.get(type(convertor).__name__, {"type": "string"})
        parameters.append({"name": name, "in": "path", "required": True, "schema": dict(schema)})

    if spec is None:
        # a route nobody described: say only that it answers JSON
        if parameters:
            operation["parameters"] = parameters
        any_json: dict[str, Any] = {"application/json": {"schema": {}}}
        operation["responses"] = {"200": {"description": "OK", "content": any_json}}
        return operation

    errors = set(spec.errors) | set(AUTH_ERRORS[spec.auth])
    if route.param_convertors:
        errors.add(404)
    if spec.paged is not None:
        parameters.append(
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
            }
        )
        before = {"name": "before", "in": "query", "required": False, "schema": _cursor_schema(spec.paged)}
        parameters.append(before)
        errors.add(422)
    if spec.idempotent:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": spec.idempotent
                if isinstance(spec.idempotent, str)
                else "A repeated POST with the same key returns the first response",
                "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[\\x20-\\x7e]+$"},
            }
        )
        errors.add(422)
    if parameters:
        operation["parameters"] = parameters

    if spec.request is not None:
        schema = refs[(spec.request, "validation")]
        # an empty body reads as {}: it is optional when no field is required
        required = any(field.is_required() for field in spec.request.model_fields.values())
        operation["requestBody"] = {"required": required, "content": {"application/json": {"schema": schema}}}
        # the webhook answers any notification it cannot use 400 (webhook.py):
        # YooKassa retries a 4xx the same way, and it is not a client to correct
        errors.update((400, 413) if spec.auth == "webhook" else (400, 413, 422))
    if spec.uses_database:
        errors.add(503)

    operation["security"] = SECURITY[spec.auth]
    body_schema = refs[(spec.response, "serialization")] if spec.response is not None else {}
    responses: dict[str, Any] = {
        str(spec.status): {
            "description": HTTPStatus(spec.status).phrase,
            "content": {"application/json": {"schema": body_schema}},
        }
    }
    for status in sorted(errors):
        responses[str(status)] = _error_response(status)
    operation["responses"] = responses
    return operation


def document(routes: Sequence[BaseRoute], title: str = "DreamLens API", version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.1 document for these routes."""
    from pydantic.json_schema import models_json_schema

    found = list(_walk(routes))
    specs = [spec for _, route in found if (spec := endpoint_of(route.endpoint)) is not None]
    uses = _model_uses(specs)
    refs: dict[Any, Any] = {}
    schemas: dict[str, Any] = {}
    if uses:
        mapping, definitions = models_json_schema(uses, ref_template=SCHEMA_REF)
        refs = dict(mapping)
        schemas.update(definitions.get("$defs", {}))
    schemas.update(_error_schemas())

    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    for path, route in found:
        openapi_path = _PATH_PARAM.sub(r"{\1}", path)
        for method in sorted(route.methods or {"GET"}):
            if method == "HEAD":
                continue  # Starlette adds HEAD to every GET
            operation_id = route.name
            if operation_id in operation_ids:
                operation_id = f"{route.name}_{method.lower()}"
            operation_ids.add(operation_id)
            operation = _operation(path, route, method, endpoint_of(route.endpoint), refs, operation_id)
            paths.setdefault(openapi_path, {})[method.lower()] = operation

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "Every error body is {error, message} (+ details, or balance and cost).",
        },
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES},
    }


def document_route(routes: Sequence[BaseRoute]) -> Route:
    """GET /api/openapi.json describing `routes` and itself, built on first request."""
    built: dict[str, Any] = {}

    @endpoint(auth="none", summary="This OpenAPI document", uses_database=False)
    async def openapi_document(request: Request) -> Response:
        if "document" not in built:
            built["document"] = document([*routes, route])
        return JSONResponse(built["document"])

    route = Route(DOCUMENT_PATH, openapi_document, methods=["GET"])
    return route
