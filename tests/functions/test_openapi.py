"""The OpenAPI document: generated from the routes and their models, served
by the local app, and consistent with what the handlers answer."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import httpx
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from functions import health, init_db
from functions.app import build_local_app
from functions.http import RequestModel, json_response
from functions.openapi import DOCUMENT_PATH, document, endpoint


class CreateThing(RequestModel):
    name: str = Field(min_length=1, max_length=50)
    size: int = Field(default=1, ge=1, le=10)


class Thing(BaseModel):
    id: UUID
    name: str
    size: int


class ThingPage(BaseModel):
    items: list[Thing]
    next_before: UUID | None


class Options(RequestModel):
    verbose: bool = False


@endpoint(auth="user", request=CreateThing, response=Thing, status=201, errors=[402], idempotent=True)
async def create_thing(request: Request) -> Response:
    """Make a thing.

    Spends a token.
    """
    raise NotImplementedError


@endpoint(auth="user", response=ThingPage, paged=UUID)
async def list_things(request: Request) -> Response:
    raise NotImplementedError


@endpoint(auth="clerk", response=Thing)
async def get_thing(request: Request) -> Response:
    raise NotImplementedError


@endpoint(auth="callback", request=Options)
async def poke(request: Request) -> Response:
    raise NotImplementedError


async def undescribed(request: Request) -> Response:
    return json_response({})


sample_routes = [
    Route("/api/things", create_thing, methods=["POST"]),
    Route("/api/things", list_things, methods=["GET"]),
    Route("/api/things/{thing_id:uuid}", get_thing, methods=["GET"]),
    Route("/api/poke", poke, methods=["POST"]),
    Route("/api/undescribed", undescribed, methods=["GET"]),
]
ALL_ROUTES = [*health.routes, *init_db.routes, *sample_routes]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in refs(item)]
    return []


def test_document_has_the_openapi_3_1_shape() -> None:
    doc = document(ALL_ROUTES)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert set(doc["components"]) == {"schemas", "securitySchemes"}
    for operations in doc["paths"].values():
        for operation in operations.values():
            assert operation["responses"]
            for status, response in operation["responses"].items():
                assert status.isdigit() and response["description"]


def test_every_route_and_method_is_present() -> None:
    doc = document(ALL_ROUTES)
    listed = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert listed == {
        ("/api/health", "get"),
        ("/api/init-db", "post"),
        ("/api/things", "post"),
        ("/api/things", "get"),
        ("/api/things/{thing_id}", "get"),
        ("/api/poke", "post"),
        ("/api/undescribed", "get"),
    }
    operation_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))


def test_models_are_components_and_every_ref_resolves() -> None:
    doc = document(ALL_ROUTES)
    schemas = doc["components"]["schemas"]
    for name in ("Health", "InitResult", "CreateThing", "Thing", "ThingPage", "Options", "Error"):
        assert name in schemas
    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas
    # request models refuse unknown fields, and say so
    assert schemas["CreateThing"]["additionalProperties"] is False
    assert schemas["CreateThing"]["properties"]["name"]["maxLength"] == 50


def test_operation_details_follow_the_declaration() -> None:
    paths = document(ALL_ROUTES)["paths"]
    create = paths["/api/things"]["post"]
    assert create["summary"] == "Make a thing."
    assert create["description"] == "Spends a token."
    assert create["requestBody"]["required"] is True
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreateThing"
    }
    assert set(create["responses"]) == {"201", "400", "401", "402", "403", "413", "422", "429", "503"}
    assert create["responses"]["402"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/InsufficientTokensError"
    )
    assert "Retry-After" in create["responses"]["429"]["headers"]
    assert create["security"] == [{"clerkSession": []}, {"deviceId": []}]
    assert [p["name"] for p in create["parameters"]] == ["Idempotency-Key"]

    listing = paths["/api/things"]["get"]
    params = {p["name"]: p for p in listing["parameters"]}
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 50}
    assert params["before"]["schema"]["format"] == "uuid"
    assert "422" in listing["responses"]

    one = paths["/api/things/{thing_id}"]["get"]
    assert one["parameters"][0] == {
        "name": "thing_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }
    assert set(one["responses"]) == {"200", "401", "404", "503"}

    poke = paths["/api/poke"]["post"]
    assert poke["requestBody"]["required"] is False  # every field has a default
    assert poke["security"] == [{"callbackSecret": []}]

    init = paths["/api/init-db"]["post"]
    assert set(init["responses"]) == {"200", "403", "404", "409", "503"}
    assert paths["/api/health"]["get"]["security"] == []


async def test_local_app_serves_the_document_including_itself() -> None:
    app = build_local_app(ALL_ROUTES)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
        response = await client.get(DOCUMENT_PATH)
        again = await client.get(DOCUMENT_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert again.json() == doc
    assert DOCUMENT_PATH in doc["paths"]
    assert set(doc["paths"][DOCUMENT_PATH]["get"]["responses"]) == {"200"}
    assert "/api/health" in doc["paths"]


def test_the_webhook_documents_400_not_422_for_what_it_cannot_use() -> None:
    from functions.webhook import routes as webhook_routes

    operation = document(webhook_routes)["paths"]["/api/payments/webhook"]["post"]
    assert "422" not in operation["responses"]
    assert {"200", "400", "403", "413", "503"} <= set(operation["responses"])


def test_a_key_whose_repeat_is_not_the_first_response_says_what_it_is() -> None:
    from functions.generations import routes as generation_routes
    from functions.worker import routes as worker_routes

    paths = document([*generation_routes, *worker_routes])["paths"]

    def key_text(path: str) -> str:
        [header] = [p for p in paths[path]["post"]["parameters"] if p["name"] == "Idempotency-Key"]
        text: str = header["description"]
        return text

    assert key_text("/api/generations") == "A repeated POST with the same key returns the first response"
    assert "fresh URL" in key_text("/api/generations/{id}/download")
    assert "still processing" in key_text("/api/worker/claim")
