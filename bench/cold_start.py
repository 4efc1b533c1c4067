"""Cold start: a fresh process that imports a handler module and answers its
first API Gateway event, timed from process launch to the response.

`measure_cold_start(module, event_file)` launches `python -c ...` once per
run (after one untimed launch that warms the page cache and writes .pyc files,
as a deployed package has them). The child imports the module, calls
`handler(event, context)` once and prints the monotonic clock at the moment
the response is back; the parent subtracts its own clock read just before the
launch (CLOCK_MONOTONIC is system-wide), so interpreter start-up, imports,
the first event and any database connect count, and process exit does not.
The child imports nothing from bench/ beyond the module under test.

`uv run python bench/cold_start.py` measures the FastAPI + Mangum hello world
(the peer) and the Starlette + Mangum one side by side.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

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


class ColdStartFailed(RuntimeError):
    pass


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(BENCH_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def launch_once(
    module: str,
    event_file: Path | str,
    *,
    handler: str = "handler",
    env: dict[str, str] | None = None,
    timeout_s: float = 60,
    expect_status: int | None = 200,
) -> float:
    """One fresh process; milliseconds from launch to the handler's response."""
    command = [sys.executable, "-c", CHILD, module, str(event_file), handler]
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


def write_event(event: dict[str, object], directory: Path | None = None) -> Path:
    """An event as a JSON file for the child process to read."""
    handle, name = tempfile.mkstemp(prefix="event-", suffix=".json", dir=directory)
    with os.fdopen(handle, "w") as file:
        json.dump(event, file)
    return Path(name)


def main() -> None:
    from harness import api_gateway_v2_event, banner

    banner("cold start: hello-world handlers, fresh process per run, median of 10")
    event_file = write_event(api_gateway_v2_event("GET", "/api/hello"))
    try:
        # side by side: same event, runs interleaved
        measured = compare_cold_starts(["cold_start_peer", "cold_start_starlette_peer"], event_file)
        fastapi_ms, starlette_ms = measured["cold_start_peer"], measured["cold_start_starlette_peer"]
    finally:
        event_file.unlink()
    python_ms = measure_import("pass")
    fastapi_import_ms = measure_import("import fastapi")
    starlette_import_ms = measure_import("import starlette.applications, mangum, asyncpg")

    def show(label: str, samples: list[float]) -> None:
        print(
            f"{label:<52} median {statistics.median(samples):6.1f} ms "
            f"(min {min(samples):.1f}, max {max(samples):.1f}, n={len(samples)})"
        )

    show("FastAPI + Mangum hello, launch to first response", fastapi_ms)
    show("Starlette + Mangum hello, launch to first response", starlette_ms)
    show("python -c pass (interpreter start and exit)", python_ms)
    show("python -c 'import fastapi'", fastapi_import_ms)
    show("python -c 'import starlette, mangum, asyncpg'", starlette_import_ms)
    ratio = statistics.median(starlette_ms) / statistics.median(fastapi_ms)
    print(f"Starlette / FastAPI cold start: {ratio:.2f}x")


if __name__ == "__main__":
    main()
