"""Smoke test of the unzipped artifact: each function of serverless.yml, in a
process of its own with a plain interpreter and nothing but the artifact on
sys.path, imports its handler and answers an event against a real PostgreSQL.
As on Lambda, the code directory is read-only: every module of the artifact
the function imports must load from the bytecode the zip ships, and no
bytecode may be written.

An HTTP function answers an API Gateway HTTP API (payload 2.0) event, the
shared fixture adapted to the function's first route; a scheduled job
answers an EventBridge scheduled event. A missing module, a dependency
left out of the zip, or one imported from outside it fails here.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.functions.callers import clerk, clerk_key
from tests.packaging.conftest import REPORT, Function, SmokeRuntime, functions_of, load_service

pytestmark = pytest.mark.packaging

CHILD = Path(__file__).with_name("lambda_child.py")
V2_EVENT = json.loads((Path(__file__).parent / "events" / "apiGatewayProxyV2Event.json").read_text())

INIT_SECRET = "smoke-init-secret"
CALLBACK_SECRET = "smoke-callback-secret"
DEVICE_ID = "smoke-test-device-0001"
PATH_ID = "5b0f2f6e-8d2a-4c55-9a57-0f4d1c1e2a3b"


def http_event(route: str) -> dict[str, Any]:
    """The shared HTTP API fixture, as API Gateway would send it for `route`."""
    method, template = route.split(" ", 1)
    path = template.replace("{id}", PATH_ID)
    event = copy.deepcopy(V2_EVENT)
    event["routeKey"] = route
    event["rawPath"] = path
    event["rawQueryString"] = ""
    event.pop("queryStringParameters", None)
    event.pop("cookies", None)
    event["headers"] = {
        **event["headers"],
        "content-type": "application/json",
        "x-device-id": DEVICE_ID,
        "x-init-secret": INIT_SECRET,
        "x-callback-secret": CALLBACK_SECRET,
    }
    if "{id}" in template:
        event["pathParameters"] = {"id": PATH_ID}
    else:
        event.pop("pathParameters", None)
    if method == "GET":
        event.pop("body", None)
    context = event["requestContext"]
    context["routeKey"] = route
    context["http"] = {**context["http"], "method": method, "path": path}
    context["requestId"] = uuid.uuid4().hex
    context["timeEpoch"] = int(time.time() * 1000)
    return event


def scheduled_event(schedule: str) -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": "eu-central-1",
        "resources": [f"arn:aws:events:eu-central-1:123456789012:rule/smoke-{schedule}"],
        "detail": {},
    }


def function_environment(template: dict[str, Any], function: Function) -> dict[str, str]:
    """The environment the template gives the function, made runnable here."""
    (properties,) = [
        body["Properties"]
        for body in template["Resources"].values()
        if body["Type"] == "AWS::Lambda::Function"
        and body["Properties"]["FunctionName"].endswith("-" + function.name)
    ]
    variables: dict[str, Any] = properties.get("Environment", {}).get("Variables", {})
    # a value CloudFormation computes (a Ref, Fn::Sub) has no stand-in here
    return {name: value for name, value in variables.items() if isinstance(value, str)}


def cold_start(
    runtime: SmokeRuntime,
    task_root: Path,
    function: Function,
    events: list[dict[str, Any]],
    environment: dict[str, str],
    scratch: Path,
) -> dict[str, Any]:
    """Run one cold start of `function` in a fresh process; return what it reported."""
    result = scratch / f"{function.name}-{uuid.uuid4().hex}.json"
    spec = {
        "artifact": str(task_root),
        "handler": function.handler,
        "function_name": f"dreamlens-ci-{function.name}",
        "timeout": function.timeout,
        "events": events,
        "result": str(result),
    }
    env = {
        # no virtualenv, no user site: a bare process as the runtime starts one
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TZ": "UTC",
        "HOME": str(scratch),
        "LAMBDA_TASK_ROOT": str(task_root),
        "AWS_LAMBDA_FUNCTION_NAME": spec["function_name"],
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
        "AWS_REGION": "eu-central-1",
        "AWS_DEFAULT_REGION": "eu-central-1",
        **environment,
    }
    bytecode_before = sorted(task_root.rglob("*.pyc"))
    completed = subprocess.run(
        # -B: PYTHONDONTWRITEBYTECODE=1, which -I would ignore (lambda_child.py)
        [runtime.python, "-I", "-S", "-B", str(CHILD)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=env,
        cwd=scratch,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, f"{function.name} failed:\n{completed.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(result.read_text())
    assert report["foreign_modules"] == [], f"{function.name} imported from outside the artifact"
    assert str(task_root) == report["sys_path"][0]
    # the shipped bytecode is the interpreter's own, and what every import loaded
    assert report["cache_tag"] == "cpython-" + runtime.version.replace(".", "")
    assert report["not_from_bytecode"] == [], f"{function.name} compiled at its cold start"
    assert report["artifact_modules"] > 0
    assert sorted(task_root.rglob("*.pyc")) == bytecode_before, "a cold start wrote bytecode"
    return report


@pytest.fixture(scope="module")
def smoke_environment(smoke_database_url: str) -> dict[str, str]:
    return {
        "POSTGRES_URL": smoke_database_url,
        "DB_INIT_SECRET": INIT_SECRET,
        "GENERATION_CALLBACK_SECRET": CALLBACK_SECRET,
        # payments configured, pointed at a closed loopback port: no smoke
        # request may reach a provider (a fresh database has no open payment)
        "YOOKASSA_SHOP_ID": "smoke-shop",
        "YOOKASSA_SECRET_KEY": "smoke-key",
        "YOOKASSA_API_URL": "http://127.0.0.1:9/v3",
    }


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # one test per function of serverless.yml, whatever functions it names
    functions = functions_of(load_service())
    http = [function.name for function in functions if function.routes]
    scheduled = [function.name for function in functions if function.schedules and not function.routes]
    if "http_function" in metafunc.fixturenames:
        # the operator's first call after a deploy goes first; any order works
        metafunc.parametrize("http_function", sorted(http, key=lambda name: name != "initDb"))
    if "scheduled_function" in metafunc.fixturenames:
        metafunc.parametrize("scheduled_function", scheduled)


def by_name(functions: list[Function], name: str) -> Function:
    return next(function for function in functions if function.name == name)


def test_http_function_answers_its_first_route(
    http_function: str,
    functions: list[Function],
    template: dict[str, Any],
    smoke_runtime: SmokeRuntime,
    unzipped: Path,
    smoke_environment: dict[str, str],
    tmp_path: Path,
) -> None:
    function = by_name(functions, http_function)
    route = function.routes[0]
    environment = {**function_environment(template, function), **smoke_environment}
    report = cold_start(smoke_runtime, unzipped, function, [http_event(route)], environment, tmp_path)

    (invocation,) = report["invocations"]
    response = invocation["response"]
    status = response["statusCode"]
    body = json.loads(response["body"]) if response.get("body") else None
    assert status < 500, f"{route} answered {status}: {body}"
    if status >= 400:
        assert isinstance(body, dict) and "error" in body, body
    if route == "GET /api/health":
        assert (status, body) == (200, {"status": "ok", "database": "ok"})
    if route == "POST /api/init-db":
        assert status == 200 and body["initialized"] is True, body
    REPORT[f"{function.name:<12} {route}"] = (
        f"{status}; import {report['import_seconds'] * 1000:.0f} ms, "
        f"first event {invocation['seconds'] * 1000:.0f} ms"
    )


def test_scheduled_function_runs_its_job(
    scheduled_function: str,
    functions: list[Function],
    template: dict[str, Any],
    smoke_runtime: SmokeRuntime,
    unzipped: Path,
    smoke_environment: dict[str, str],
    tmp_path: Path,
) -> None:
    function = by_name(functions, scheduled_function)
    (schedule,) = function.schedules
    environment = {**function_environment(template, function), **smoke_environment}
    report = cold_start(smoke_runtime, unzipped, function, [scheduled_event(schedule)], environment, tmp_path)

    (invocation,) = report["invocations"]
    assert isinstance(invocation["response"], dict), invocation
    REPORT[f"{function.name:<12} {schedule}"] = (
        f"{invocation['response']}; import {report['import_seconds'] * 1000:.0f} ms, "
        f"run {invocation['seconds'] * 1000:.0f} ms"
    )


def test_health_handler_imports_alone(
    functions: list[Function], smoke_runtime: SmokeRuntime, unzipped: Path, tmp_path: Path
) -> None:
    """A bare import, no event, no database: nothing the module runs at import
    needs more than the artifact. Its time is reported, not asserted (the
    median of 5 fresh processes, each loading the artifact's shipped bytecode
    from its read-only directory, as on Lambda)."""
    function = by_name(functions, "health")
    reports = [cold_start(smoke_runtime, unzipped, function, [], {}, tmp_path) for _ in range(5)]
    assert not any(report["boto3_imported"] for report in reports)
    median = statistics.median(report["import_seconds"] for report in reports)
    REPORT["import functions.health (cold, shipped bytecode, median of 5)"] = (
        f"{median * 1000:.0f} ms on CPython {smoke_runtime.version}, "
        f"{reports[0]['artifact_modules']} modules of the artifact, all from their pyc"
    )


def test_a_clerk_caller_is_verified_by_the_shipped_cryptography(
    functions: list[Function],
    template: dict[str, Any],
    smoke_runtime: SmokeRuntime,
    unzipped: Path,
    smoke_environment: dict[str, str],
    tmp_path: Path,
) -> None:
    """GET /api/user with a Clerk session token (RS256): PyJWT and the native
    code of cryptography, as the zip ships them (stripped), verify it, and the
    caller is created. The key is given directly (the template's points at
    Secrets Manager), with no issuer or party to match."""
    function = by_name(functions, "user")
    event = http_event("GET /api/user")
    headers = {name: value for name, value in event["headers"].items() if name != "x-device-id"}
    event["headers"] = {**headers, "authorization": clerk("user_smoke_clerk")["Authorization"]}
    environment = {
        **{
            name: value
            for name, value in function_environment(template, function).items()
            if not name.startswith("CLERK_")
        },
        **smoke_environment,
        "CLERK_JWT_KEY": clerk_key()[1],
    }
    report = cold_start(smoke_runtime, unzipped, function, [event], environment, tmp_path)

    (invocation,) = report["invocations"]
    response = invocation["response"]
    body = json.loads(response["body"])
    assert response["statusCode"] == 200, body
    assert (body["clerk_id"], body["device_id"]) == ("user_smoke_clerk", None)


def elf_section_names(path: Path) -> set[str]:
    """The section names of a 64-bit little-endian ELF file (what x86_64 and
    arm64 Lambdas load), read from its section header table."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4:6] == b"\x02\x01", f"{path.name}: not 64-bit little-endian ELF"
    table = int.from_bytes(data[0x28:0x30], "little")
    entry_size = int.from_bytes(data[0x3A:0x3C], "little")
    count = int.from_bytes(data[0x3C:0x3E], "little")
    names_index = int.from_bytes(data[0x3E:0x40], "little")

    def header(index: int) -> bytes:
        return data[table + index * entry_size : table + (index + 1) * entry_size]

    names_at = int.from_bytes(header(names_index)[0x18:0x20], "little")
    names = set()
    for index in range(count):
        start = names_at + int.from_bytes(header(index)[0:4], "little")
        names.add(data[start : data.index(b"\0", start)].decode())
    return names


def test_shared_objects_ship_without_symbol_tables_or_debug_information(unzipped: Path) -> None:
    """.ci/build_lambda.py strips them: asyncpg's extensions alone carried
    about 12 MB of debug information, a quarter of Lambda's 50 MB limit."""
    shared = sorted(unzipped.rglob("*.so"))
    assert len(shared) >= 4  # asyncpg's two, pydantic-core's, cryptography's
    unstripped = {
        path.relative_to(unzipped).as_posix(): sorted(
            name for name in elf_section_names(path) if name == ".symtab" or name.startswith(".debug")
        )
        for path in shared
    }
    assert {name: sections for name, sections in unstripped.items() if sections} == {}
