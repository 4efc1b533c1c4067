"""Cold start: a fresh process that imports a handler module and answers its
first API Gateway event, timed from process launch to the response.

`measure_cold_start(module, event_file)` launches `python -c ...` once per
run (after one untimed launch that warms the page cache and writes .pyc files,
as a package that ships bytecode has them). The child imports the module, calls
`handler(event, context)` once and prints the monotonic clock at the moment
the response is back; the parent subtracts its own clock read just before the
launch (CLOCK_MONOTONIC is system-wide), so interpreter start-up, imports,
the first event and any database connect count, and process exit does not.
The child imports nothing from bench/ beyond the module under test.

`uv run python bench/cold_start.py` measures, runs interleaved, median of 10:

- functions.generations answering POST /api/generations and functions.tokens
  answering GET /api/tokens for a device caller, each including the database
  connect, the identity lookup and the statement (bench database, schema
  applied); reach ≤ 250 ms;
- functions.generations for a Clerk caller (a signed session token: PyJWT and
  cryptography load on the first Bearer token);
- functions.generations from the Lambda artifact itself: the zip
  `.ci/build_lambda.py` builds (build/lambda/dreamlens.zip when it is newer
  than the sources, else built afresh into a scratch directory), unzipped and
  run by the runtime's interpreter (python3.12 -I -S -B: the artifact
  directory, then the standard library, on sys.path; nothing written), so
  its own 3.12 dependencies and shipped bytecode are what loads; reach
  ≤ 250 ms;
- functions.generations and the peer compiling every module from source (no
  bytecode read or written): what a package without bytecode costs;
- the FastAPI + Mangum hello world (the peer) and the Starlette + Mangum one
  (the floor the functions stand on);

then the lazy initialization of an empty database: a fresh process whose
first POST /api/generations finds no schema, creates it and is answered,
against its second request; and where the import time goes
(`python -X importtime`, by package).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BUILD_SCRIPT = ROOT / ".ci" / "build_lambda.py"
BUILT_ARTIFACT = ROOT / "build" / "lambda" / "dreamlens.zip"

# what runs in the fresh process: argv = module, event file, handler name
CHILD = """
import importlib, json, sys, time
module = importlib.import_module(sys.argv[1])
handler = getattr(module, sys.argv[3])
with open(sys.argv[2]) as file:
    event = json.load(file)

class Context:
    function_name = "dreamlens-cold-start"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:dreamlens-cold-start"
    memory_limit_in_mb = 1024
    aws_request_id = "cold-start"
    log_group_name = "/aws/lambda/dreamlens-cold-start"
    log_stream_name = "cold-start"
    def get_remaining_time_in_millis(self):
        return 30000

response = handler(event, Context())
done = time.monotonic_ns()
print("RESPONSE", done, response.get("statusCode"), flush=True)
"""


# lazy init: argv = module, first event file, second event file; both timed
CHILD_TWICE = CHILD.replace(
    "response = handler(event, Context())",
    """first_started = time.perf_counter()
response = handler(event, Context())
first_ms = (time.perf_counter() - first_started) * 1000""",
).replace(
    'print("RESPONSE", done, response.get("statusCode"), flush=True)',
    """with open(sys.argv[4]) as file:
    second_event = json.load(file)
started = time.perf_counter()
second = handler(second_event, Context())
second_ms = (time.perf_counter() - started) * 1000
statuses = response.get("statusCode"), second.get("statusCode")
print("RESPONSE", done, *statuses, first_ms, second_ms, flush=True)""",
)


class ColdStartFailed(RuntimeError):
    pass


def _child_env(extra: dict[str, str | None] | None) -> dict[str, str]:
    """This environment, the checkout and bench/ on PYTHONPATH, and `extra`
    (a None value removes the variable)."""
    env = dict(os.environ)
    paths = [str(ROOT), str(BENCH_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def bytecode_env(cache_dir: Path | None) -> dict[str, str | None]:
    """With a directory: bytecode written there on the first launch and read
    by the next (PYTHONPYCACHEPREFIX; the checkout and .venv stay untouched),
    as in a package that ships .pyc files. None: no bytecode written or read
    beyond what the interpreter's own standard library carries: every module
    compiled from source, as a package without bytecode on Lambda's
    read-only code directory would be."""
    if cache_dir is None:
        return {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": None}
    return {"PYTHONDONTWRITEBYTECODE": None, "PYTHONPYCACHEPREFIX": str(cache_dir)}


def bytecode_in_checkout() -> list[Path]:
    """__pycache__ directories the "no bytecode" runs would still read."""
    found = []
    for base in (ROOT / "functions", ROOT / "database", ROOT / "repositories", Path(pydantic_dir())):
        found += [path for path in base.glob("__pycache__") if any(path.iterdir())]
    return found


def pydantic_dir() -> str:
    import pydantic

    return os.path.dirname(pydantic.__file__)


def launch_once(
    module: str,
    event_file: Path | str,
    *,
    handler: str = "handler",
    env: dict[str, str | None] | None = None,
    timeout_s: float = 60,
    expect_status: int | None = 200,
    python: Sequence[str] = (),
    prelude: str = "",
) -> float:
    """One fresh process; milliseconds from launch to the handler's response.
    `python`: the interpreter and its options (default: this one); `prelude`:
    code the child runs first (e.g. to put an artifact on sys.path)."""
    command = [*(python or [sys.executable]), "-c", prelude + CHILD, module, str(event_file), handler]
    started = time.monotonic_ns()
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, env=_child_env(env), cwd=ROOT, check=False
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESPONSE ")]
    if completed.returncode != 0 or not lines:
        raise ColdStartFailed(
            f"{module}: exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
        )
    _, done, status = lines[-1].split()
    if expect_status is not None and status != str(expect_status):
        raise ColdStartFailed(f"{module} answered {status}, expected {expect_status}:\n{completed.stdout}")
    return (int(done) - started) / 1e6


def measure_cold_start(
    module: str,
    event_file: Path | str,
    runs: int = 10,
    *,
    handler: str = "handler",
    env: dict[str, str] | None = None,
    warmup: int = 1,
    expect_status: int | None = 200,
    budget_s: float = 300,
) -> list[float]:
    """Milliseconds from launch to first response of `runs` fresh processes
    (bounded by `budget_s` overall); take `statistics.median()` of it."""
    deadline = time.monotonic() + budget_s
    for _ in range(warmup):
        launch_once(module, event_file, handler=handler, env=env, expect_status=expect_status)
    samples = []
    for _ in range(runs):
        samples.append(launch_once(module, event_file, handler=handler, env=env, expect_status=expect_status))
        if time.monotonic() > deadline:
            break
    return samples


def compare_cold_starts(
    modules: list[str],
    event_file: Path | str,
    runs: int = 10,
    *,
    env: dict[str, str] | None = None,
    warmup: int = 1,
    budget_s: float = 600,
) -> dict[str, list[float]]:
    """measure_cold_start for several modules with their runs interleaved
    (A, B, A, B, ...), so drift in a noisy machine hits each alike."""
    deadline = time.monotonic() + budget_s
    for module in modules:
        for _ in range(warmup):
            launch_once(module, event_file, env=env)
    samples: dict[str, list[float]] = {module: [] for module in modules}
    for _ in range(runs):
        for module in modules:
            samples[module].append(launch_once(module, event_file, env=env))
        if time.monotonic() > deadline:
            break
    return samples


def measure_import(statement: str, runs: int = 10, *, warmup: int = 1) -> list[float]:
    """Milliseconds for a fresh `python -c <statement>` to run to exit (for
    `import fastapi` and the like); the baseline is `pass`."""
    samples = []
    for index in range(warmup + runs):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", statement], env=_child_env(None), cwd=ROOT, check=True, timeout=60
        )
        if index >= warmup:
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def compare_imports(
    statements: dict[str, str], runs: int = 10, *, env: dict[str, str | None] | None = None
) -> dict[str, list[float]]:
    """Milliseconds from launch to the end of each statement in a fresh
    process (interpreter exit not counted), runs interleaved after one untimed
    run of each."""

    def once(statement: str) -> float:
        started = time.monotonic_ns()
        completed = subprocess.run(
            [sys.executable, "-c", f"{statement}\nimport time; print('DONE', time.monotonic_ns())"],
            env=_child_env(env),
            cwd=ROOT,
            check=True,
            timeout=60,
            capture_output=True,
            text=True,
        )
        done = next(line for line in completed.stdout.splitlines() if line.startswith("DONE "))
        return (int(done.split()[1]) - started) / 1e6

    for statement in statements.values():
        once(statement)
    samples: dict[str, list[float]] = {name: [] for name in statements}
    order = list(statements)
    for _ in range(runs):
        for name in order:
            samples[name].append(once(statements[name]))
        order = order[1:] + order[:1]
    return samples


_STACK = "import starlette.applications, starlette.routing, mangum"
IMPORT_LAYERS = {
    "python -c pass": "pass",
    "+ starlette, mangum (the floor's stack)": _STACK,
    "+ pydantic (BaseModel)": f"{_STACK}; from pydantic import BaseModel",
    "+ asyncpg": f"{_STACK}, asyncpg; from pydantic import BaseModel",
    "import functions.generations (all of it)": "import functions.generations",
}


def write_event(event: dict[str, object], directory: Path | None = None) -> Path:
    """An event as a JSON file for the child process to read."""
    handle, name = tempfile.mkstemp(prefix="event-", suffix=".json", dir=directory)
    with os.fdopen(handle, "w") as file:
        json.dump(event, file)
    return Path(name)


@dataclass(frozen=True)
class Launch:
    """One kind of fresh process: a module answering an event (with
    `python` and `prelude` as launch_once takes them)."""

    module: str
    event_file: Path
    expect_status: int = 200
    env: dict[str, str | None] | None = None
    python: tuple[str, ...] = ()
    prelude: str = ""

    def once(self) -> float:
        return launch_once(
            self.module,
            self.event_file,
            env=self.env,
            expect_status=self.expect_status,
            python=self.python,
            prelude=self.prelude,
        )


def compare_launches(
    launches: dict[str, Launch], runs: int = 10, *, warmup: int = 1, budget_s: float = 300
) -> dict[str, list[float]]:
    """Like compare_cold_starts, for launches that differ in event, status
    and environment: runs interleaved, the order turning each round."""
    deadline = time.monotonic() + budget_s
    for launch in launches.values():
        for _ in range(warmup):
            launch.once()
    samples: dict[str, list[float]] = {name: [] for name in launches}
    order = list(launches)
    for _ in range(runs):
        for name in order:
            samples[name].append(launches[name].once())
        order = order[1:] + order[:1]
        if time.monotonic() > deadline:
            print(f"  (time budget of {budget_s:g} s reached after {len(samples[order[0]])} runs)")
            break
    return samples


def launch_twice(
    module: str, first_event: Path, second_event: Path, env: dict[str, str | None], timeout_s: float = 120
) -> tuple[float, float, float]:
    """A fresh process answering two events: (ms from launch to the first
    response, ms of the first request alone, ms of the second)."""
    command = [sys.executable, "-c", CHILD_TWICE, module, str(first_event), "handler", str(second_event)]
    started = time.monotonic_ns()
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, env=_child_env(env), cwd=ROOT, check=False
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESPONSE ")]
    if completed.returncode != 0 or not lines:
        raise ColdStartFailed(
            f"{module}: exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
        )
    _, done, first_status, second_status, first_ms, second_ms = lines[-1].split()
    if (first_status, second_status) != ("201", "201"):
        raise ColdStartFailed(f"{module} answered {first_status}, {second_status}:\n{completed.stdout}")
    return (int(done) - started) / 1e6, float(first_ms), float(second_ms)


def import_time_by_package(
    module: str, top: int = 12, env: dict[str, str | None] | None = None
) -> list[tuple[str, float]]:
    """`python -X importtime -c 'import module'`: self time summed by top-level package, ms."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        env=_child_env(env),
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    totals: dict[str, float] = {}
    for line in completed.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \| \s*(\S+)", line)
        if match:
            package = match.group(2).split(".")[0]
            totals[package] = totals.get(package, 0.0) + int(match.group(1)) / 1000
    return sorted(totals.items(), key=lambda item: item[1], reverse=True)[:top]


def _build_script() -> Any:
    """.ci/build_lambda.py as a module (.ci is no package): the runtime's
    version and the search for its interpreter, as the build does them."""
    name = "dreamlens_build_lambda"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BUILD_SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def _artifact_sources() -> list[Path]:
    """What the artifact is built from: a zip older than any of them is stale."""
    found = [ROOT / name for name in ("schema.sql", "pyproject.toml", "uv.lock", "serverless.yml")]
    found.append(BUILD_SCRIPT)
    for package in ("functions", "repositories", "database"):
        found += (ROOT / package).rglob("*.py")
    return [path for path in found if path.exists()]


def _missing_bytecode(archive_path: Path, cache_tag: str) -> int:
    """How many modules of the zip have no pyc of `cache_tag`."""
    with zipfile.ZipFile(archive_path) as archive:
        names = set(archive.namelist())
    missing = 0
    for name in names:
        if name.endswith(".py"):
            directory, _, file = name.rpartition("/")
            pyc = f"{directory}/__pycache__/{file[:-3]}.{cache_tag}.pyc".lstrip("/")
            missing += pyc not in names
    return missing


def lambda_artifact(scratch: Path, cache_tag: str) -> tuple[Path, str]:
    """The deploy artifact to measure and where it came from: build/lambda's
    when it is newer than every source and carries its bytecode, else one
    built now into `scratch` (requiring bytecode)."""
    if BUILT_ARTIFACT.exists():
        built = BUILT_ARTIFACT.stat().st_mtime
        newest = max(path.stat().st_mtime for path in _artifact_sources())
        if built > newest and _missing_bytecode(BUILT_ARTIFACT, cache_tag) == 0:
            return BUILT_ARTIFACT, f"{BUILT_ARTIFACT.relative_to(ROOT)} (newer than the sources)"
    out = scratch / "dreamlens.zip"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--require-bytecode", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out, f"built now by .ci/build_lambda.py ({time.perf_counter() - started:.0f} s)"


# counts the artifact's modules compiled from source while the handler imports
_COMPILES_CHECK = """
import importlib, importlib.machinery, sys
root = sys.argv[1]
sys.path.insert(0, root)
compiled = []
original = importlib.machinery.SourceFileLoader.source_to_code
def source_to_code(self, data, path, *args, **kwargs):
    if str(path).startswith(root):
        compiled.append(str(path))
    return original(self, data, path, *args, **kwargs)
importlib.machinery.SourceFileLoader.source_to_code = source_to_code
importlib.import_module(sys.argv[2])
loaded = [m for m in list(sys.modules.values()) if (getattr(m, "__file__", None) or "").startswith(root)]
print(len(loaded), len(compiled))
"""


def compiled_at_import(python: Sequence[str], task_root: Path, module: str) -> tuple[int, int]:
    """(modules of the artifact imported, how many of them compiled from source)."""
    completed = subprocess.run(
        [*python, "-c", _COMPILES_CHECK, str(task_root), module],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded, compiled = completed.stdout.split()
    return int(loaded), int(compiled)


# ------------------------------------------------------------------ the run

TARGET_MS = 250.0
RUNS = 10
LAZY_INIT_RUNS = 3


def _clerk_session(subject: str) -> tuple[str, str]:
    """A fresh RSA key pair's public PEM (CLERK_JWT_KEY) and a session token
    it verifies, valid for ten minutes."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    now = int(time.time())
    claims = {"sub": subject, "iat": now - 5, "nbf": now - 5, "exp": now + 600}
    return pem, jwt.encode(claims, private, algorithm="RS256")


async def _seed(url: str) -> tuple[str, str]:
    """A device caller and a Clerk user (by clerk id), on the bench plan with tokens to spend."""
    import asyncpg
    from harness import seed_users
    from workload import grant_bench_plan, seed_callers

    connection = await asyncpg.connect(url)
    try:
        device = await seed_callers(connection, 1, balance=1_000_000, prefix="cold")
        clerk = await seed_users(connection, 1, balance=1_000_000, prefix="user_cold", kind="clerk")
        await grant_bench_plan(connection, clerk.ids)
    finally:
        await connection.close()
    return device.identities[0], clerk.identities[0]


async def _create_empty(admin_url: str, name: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'drop database if exists "{name}" with (force)')
        await connection.execute(f'create database "{name}"')
    finally:
        await connection.close()


async def _drop(admin_url: str, name: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await connection.close()


def _show(label: str, samples: list[float]) -> str:
    return (
        f"median {statistics.median(samples):6.1f} ms "
        f"(min {min(samples):.1f}, max {max(samples):.1f}, n={len(samples)})"
    )


def _artifact_launches(scratch: Path, event_file: Path, database_url: str) -> dict[str, Launch]:
    """functions.generations run from the unzipped deploy artifact by the
    runtime's interpreter, or nothing (said why) when this machine has none."""
    build = _build_script()
    version, _ = build.runtime_of_service()
    python = build.runtime_python(version)
    if python is None:
        print(
            f"note: no CPython {version} here (`uv python install {version}` provides one): "
            "the Lambda artifact is not measured"
        )
        return {}
    cache_tag = "cpython-" + version.replace(".", "")
    archive_path, origin = lambda_artifact(scratch, cache_tag)
    task_root = scratch / "lambda-task-root"
    with zipfile.ZipFile(archive_path) as archive:
        archive.extractall(task_root)
    # -I: no PYTHON* variables, no user site, nothing of this venv; -S: no
    # site-packages of that interpreter; -B: nothing written, as on Lambda's
    # read-only code directory. sys.path: the artifact, then the standard library.
    command = (python, "-I", "-S", "-B")
    loaded, from_source = compiled_at_import(command, task_root, "functions.generations")
    print(
        f"Lambda artifact: {origin}; CPython {version} ({python}); importing functions.generations "
        f"loads {loaded} modules of the artifact, {loaded - from_source} from their shipped pyc, "
        f"{from_source} compiled from source"
    )
    label = f"functions.generations from the Lambda artifact (python{version}, shipped bytecode)"
    if from_source:
        label = f"functions.generations from the Lambda artifact (python{version}, {from_source} compiled)"
    prelude = f"import sys; sys.path.insert(0, {str(task_root)!r})\n"
    return {
        label: Launch(
            "functions.generations",
            event_file,
            201,
            {"DATABASE_URL": database_url},
            python=command,
            prelude=prelude,
        )
    }


def main() -> None:
    from harness import api_gateway_v2_event, banner, bench_database, run_sync, with_database
    from workload import Figures, generation_event, load_line

    figures = Figures("cold_start")
    with bench_database() as database, tempfile.TemporaryDirectory(prefix="cold-start-") as scratch:
        banner("cold start: fresh process per run, launch to first response, runs interleaved", database)
        print(f"before: {load_line()}")
        directory = Path(scratch)
        device, clerk_id = run_sync(lambda: _seed(database.url))
        pem, token = _clerk_session(clerk_id)
        events = {
            "generation": generation_event(device),
            "tokens": api_gateway_v2_event("GET", "/api/tokens", headers={"X-Device-Id": device}),
            "clerk": api_gateway_v2_event(
                "POST",
                "/api/generations",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                body={"prompt": "a lighthouse at dawn, oil on canvas"},
            ),
            "hello": api_gateway_v2_event("GET", "/api/hello"),
        }
        files = {name: write_event(event, directory) for name, event in events.items()}
        compiled = bytecode_env(directory / "pycache")
        source = bytecode_env(None)
        artifact_launches = _artifact_launches(directory, files["generation"], database.url)
        database_env: dict[str, str | None] = {"DATABASE_URL": database.url}
        clerk_env: dict[str, str | None] = {**database_env, "CLERK_JWT_KEY": pem}
        generation, tokens, clerk = (
            "POST /api/generations, device",
            "GET /api/tokens, device",
            ("POST /api/generations, Clerk"),
        )
        launches = {
            f"{generation} (bytecode)": Launch(
                "functions.generations", files["generation"], 201, {**database_env, **compiled}
            ),
            f"{tokens} (bytecode)": Launch(
                "functions.tokens", files["tokens"], 200, {**database_env, **compiled}
            ),
            f"{clerk} (bytecode)": Launch(
                "functions.generations", files["clerk"], 201, {**clerk_env, **compiled}
            ),
            "peer: FastAPI + Mangum hello (bytecode)": Launch(
                "cold_start_peer", files["hello"], 200, compiled
            ),
            "floor: Starlette + Mangum hello (bytecode)": Launch(
                "cold_start_starlette_peer", files["hello"], 200, compiled
            ),
            **artifact_launches,
            f"{generation} (compiling from source)": Launch(
                "functions.generations", files["generation"], 201, {**database_env, **source}
            ),
            "peer: FastAPI + Mangum hello (compiling from source)": Launch(
                "cold_start_peer", files["hello"], 200, source
            ),
        }
        stale = bytecode_in_checkout()
        if stale:
            print(f"note: bytecode found in {', '.join(map(str, stale))}: the from-source runs read it")
        measured = compare_launches(launches, RUNS)
        print(f"after:  {load_line()}")
        width = max(map(len, launches))
        for name, samples in measured.items():
            print(f"{name:<{width}}  {_show(name, samples)}")
        print(
            f"(bytecode: the dev venv, CPython {sys.version_info[0]}.{sys.version_info[1]}, .pyc written by"
            " an untimed first launch; Lambda artifact: the deploy zip unzipped, its own dependencies and"
            " shipped .pyc, the runtime's interpreter; compiling from source: no .pyc read or written, every"
            " project and library module compiled at import)"
        )
        for name, samples in measured.items():
            if name.endswith("(compiling from source)") and not name.startswith(("peer", "floor")):
                # no deployed function runs this way (the artifact ships its
                # bytecode): what shipping it saves, not a figure to meet
                figures.note(
                    f"cold start {name} (median of {len(samples)})", f"{statistics.median(samples):.0f} ms"
                )
            elif not name.startswith(("peer", "floor")):
                figures.reach(
                    f"cold start {name} (median of {len(samples)})",
                    statistics.median(samples),
                    TARGET_MS,
                    unit=" ms",
                    digits=0,
                )
        for mode in ("bytecode", "compiling from source"):
            peer = statistics.median(measured[f"peer: FastAPI + Mangum hello ({mode})"])
            ours = statistics.median(measured[f"{generation} ({mode})"])
            figures.note(f"cold start peer: FastAPI + Mangum hello ({mode}, median)", f"{peer:.0f} ms")
            figures.note(f"cold start {generation} / FastAPI hello ({mode})", f"{ours / peer:.2f}")

        # lazy init: each run a fresh empty database on the same server, and
        # the same launch against the bench database (schema there) beside it
        empty: list[tuple[float, float, float]] = []
        ready: list[tuple[float, float, float]] = []
        second = write_event(generation_event(device), directory)
        for run in range(LAZY_INIT_RUNS):
            name = f"{database.name}_empty_{run}"
            run_sync(partial(_create_empty, database.admin_url, name))
            try:
                env = {"DATABASE_URL": with_database(database.admin_url, name), **compiled}
                empty.append(launch_twice("functions.generations", files["generation"], second, env))
            finally:
                run_sync(partial(_drop, database.admin_url, name))
            ready.append(
                launch_twice(
                    "functions.generations", files["generation"], second, {**database_env, **compiled}
                )
            )
        print("POST /api/generations in a fresh process, twice (bytecode; medians):")
        for label, runs in (
            ("empty database (schema made on the way)", empty),
            ("schema already there", ready),
        ):
            launch, first, again = (statistics.median(values) for values in zip(*runs, strict=True))
            print(
                f"  {label:<40} launch to first response {launch:6.1f} ms; first request {first:6.1f} ms; "
                f"second {again:5.1f} ms"
            )
        launch, first, again = (statistics.median(values) for values in zip(*empty, strict=True))
        figures.note(
            "lazy init: empty database, first POST /api/generations (connect, schema, signup, spend)",
            f"{first:.0f} ms, second request {again:.1f} ms (launch to first response {launch:.0f} ms; "
            f"median of {len(empty)})",
        )
        _, ready_first, _ = (statistics.median(values) for values in zip(*ready, strict=True))
        figures.note("the same first request with the schema already there", f"{ready_first:.0f} ms")

        print("\nwhat the import costs, layer by layer (launch to imported, bytecode, median of 10):")
        layers = compare_imports(IMPORT_LAYERS, RUNS, env=compiled)
        previous = 0.0
        for name, samples in layers.items():
            median = statistics.median(samples)
            print(f"  {name:<44} {median:6.1f} ms  ({median - previous:+.1f})")
            previous = median
        figures.note(
            "import, fresh process (bytecode): pass / + starlette, mangum / + pydantic / + asyncpg / "
            "functions.generations",
            " / ".join(f"{statistics.median(samples):.0f}" for samples in layers.values()) + " ms",
        )

        print(
            "\nimport time of functions.generations by package (python -X importtime, self time, bytecode):"
        )
        for package, ms in import_time_by_package("functions.generations", env=compiled):
            print(f"  {ms:7.1f} ms  {package}")
    figures.save()


if __name__ == "__main__":
    main()
