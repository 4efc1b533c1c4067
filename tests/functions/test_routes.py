"""Each function module serves exactly the routes serverless.yml gives its
function, and every one of them is described in the OpenAPI document with
the statuses its handler can answer."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from starlette.routing import Route

from functions.openapi import document, endpoint_of

SERVERLESS = Path(__file__).parent.parent.parent / "serverless.yml"
CONVERTOR = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*):[A-Za-z_]+}")


def serverless_functions() -> dict[str, Any]:
    functions: dict[str, Any] = yaml.safe_load(SERVERLESS.read_text())["functions"]
    return functions


# every function serverless.yml routes HTTP to
FUNCTIONS = sorted(
    name
    for name, function in serverless_functions().items()
    if any("httpApi" in event for event in function.get("events", []))
)


@pytest.mark.parametrize("name", sorted(serverless_functions()))
def test_every_handler_in_serverless_yml_imports(name: str) -> None:
    path, _, attribute = serverless_functions()[name]["handler"].rpartition(".")
    assert callable(getattr(importlib.import_module(path.replace("/", ".")), attribute))


def test_the_local_app_serves_exactly_the_deployed_routes() -> None:
    from functions import local

    deployed = {
        tuple(event["httpApi"].split(" ", 1))
        for function in serverless_functions().values()
        for event in function.get("events", [])
        if "httpApi" in event
    }
    assert served(SimpleNamespace(routes=local.all_routes())) == deployed


def module_of(function: dict[str, Any]) -> Any:
    path, _, attribute = function["handler"].rpartition(".")
    assert attribute == "handler"
    return importlib.import_module(path.replace("/", "."))


def served(module: Any) -> set[tuple[str, str]]:
    pairs = set()
    for route in module.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                pairs.add((method, CONVERTOR.sub(r"{\1}", route.path)))
    return pairs


@pytest.mark.parametrize("name", FUNCTIONS)
def test_module_serves_exactly_its_serverless_routes(name: str) -> None:
    function = serverless_functions()[name]
    declared = {tuple(event["httpApi"].split(" ", 1)) for event in function["events"] if "httpApi" in event}
    assert served(module_of(function)) == declared


def all_routes() -> list[Route]:
    functions = serverless_functions()
    return [route for name in FUNCTIONS for route in module_of(functions[name]).routes]


def test_every_route_is_described() -> None:
    for route in all_routes():
        assert endpoint_of(route.endpoint) is not None, route.path


def responses(doc: dict[str, Any], method: str, path: str) -> set[str]:
    return set(doc["paths"][path][method]["responses"])


def test_the_document_lists_what_the_handlers_answer() -> None:
    doc = document(all_routes())
    user = {"401", "403", "429", "503"}
    assert responses(doc, "get", "/api/user") == {"200", "422"} | user
    assert responses(doc, "post", "/api/user/link-device") == {
        "200",
        "400",
        "401",
        "404",
        "409",
        "413",
        "422",
        "503",
    }
    assert responses(doc, "get", "/api/tokens") == {"200", "422"} | user
    assert responses(doc, "get", "/api/tokens/transactions") == {"200", "422"} | user
    assert responses(doc, "get", "/api/subscription") == {"200", "422"} | user
    assert (
        responses(doc, "post", "/api/generations")
        == {
            "201",
            "400",
            "402",
            "409",
            "413",
            "422",
        }
        | user
    )
    assert responses(doc, "get", "/api/generations") == {"200", "422"} | user
    # a malformed id matches no route: 404, as another user's generation
    assert responses(doc, "get", "/api/generations/{id}") == {"200", "404", "422"} | user
    assert responses(doc, "post", "/api/generations/{id}/download") == {"200", "404", "409", "422"} | user
    assert responses(doc, "post", "/api/worker/claim") == {"200", "400", "403", "413", "422", "503"}
    assert responses(doc, "post", "/api/generations/{id}/result") == {
        "200",
        "400",
        "403",
        "404",
        "413",
        "422",
        "503",
    }
    [path_id] = doc["paths"]["/api/generations/{id}"]["get"]["parameters"]
    assert path_id["schema"] == {"type": "string", "format": "uuid"}


def test_the_document_shows_the_api_field_names() -> None:
    schemas = document(all_routes())["components"]["schemas"]
    assert set(schemas["UserAccount"]["required"]) == {
        "id",
        "clerk_id",
        "device_id",
        "email",
        "created_at",
        "balance",
        "plan",
    }
    assert set(schemas["NewGeneration"]["required"]) == {
        "id",
        "status",
        "cost",
        "balance",
        "prompt",
        "quality",
        "created_at",
    }
    assert schemas["CreateGeneration"]["properties"]["quality"]["enum"] == ["standard", "hd"]
    assert schemas["CreateGeneration"]["properties"]["prompt"]["maxLength"] == 2000
    assert schemas["Claim"]["properties"]["lease_seconds"]["minimum"] == 10
    assert set(schemas["TransactionPage"]["properties"]) == {"items", "next_before"}
    assert set(schemas["SubscriptionStatus"]["required"]) == {
        "plan",
        "status",
        "current_period_end",
        "daily_generation_limit",
        "used_today",
    }
