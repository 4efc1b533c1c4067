"""Memory of a warm function process: peak RSS after 1,000 and 10,000 requests.

Linux keeps the peak (VmHWM, "high water mark") and the current size (VmRSS)
in /proc/<pid>/status; elsewhere `resource.getrusage` gives the peak of this
process or of its finished children.

`uv run python bench/memory.py` starts a fresh process (nothing of bench/ in
it but this file) that imports functions.generations and functions.tokens
and answers 10,000 API Gateway v2 events in turn, POST /api/generations and
GET /api/tokens alternating, for 500 device callers taking turns (each
identity and balance resolved once, then cached as on a warm Lambda); it
reports its own peak RSS after 1,000 and after 10,000 requests. Reach: ≤ 100
MB, and ≤ 5 % growth between the two. A second process does the same for
10,000 callers each seen once, so the identity and balance caches (10,000
entries each, 30 s) fill: the bound of what they can hold.

`uv run python bench/memory.py --self-check` prints this interpreter's
figures before and after importing the Starlette stack (the helpers' check).
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_kb(field: str, pid: int | None = None) -> int | None:
    path = Path(f"/proc/{pid or 'self'}/status")
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except (OSError, ValueError):
        return None
    return None


def _rusage_mb(who: int) -> float:
    peak = resource.getrusage(who).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak RSS of this process (or of a running `pid`), in MB."""
    kb = _status_kb("VmHWM", pid)
    if kb is not None:
        return kb / 1024
    if pid is None or pid == os.getpid():
        return _rusage_mb(resource.RUSAGE_SELF)
    raise OSError(f"no /proc/{pid}/status: cannot read another process's peak here")


def current_rss_mb(pid: int | None = None) -> float:
    """Resident set size now, in MB (falls back to the peak off Linux)."""
    kb = _status_kb("VmRSS", pid)
    return kb / 1024 if kb is not None else peak_rss_mb(pid)


def children_peak_rss_mb() -> float:
    """The largest peak RSS among this process's finished, waited-for children."""
    return _rusage_mb(resource.RUSAGE_CHILDREN)


def reset_peak() -> bool:
    """Start a new high water mark from the current RSS (Linux: writing 5 to
    /proc/self/clear_refs); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def self_check() -> None:
    at_start = peak_rss_mb(), current_rss_mb()
    import mangum  # noqa: F401
    import starlette.applications  # noqa: F401
    from harness import banner  # imports asyncpg

    banner("memory helpers")
    print(f"python at start: peak {at_start[0]:.1f} MB, now {at_start[1]:.1f} MB")

    print(
        f"after importing starlette, mangum, asyncpg: peak {peak_rss_mb():.1f} MB, "
        f"now {current_rss_mb():.1f} MB"
    )
    ballast = bytearray(50 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it is resident
    with_ballast = peak_rss_mb()
    del ballast
    print(f"with 50 MB allocated: peak {with_ballast:.1f} MB; freed: now {current_rss_mb():.1f} MB")
    if reset_peak():
        print(f"after reset_peak(): peak {peak_rss_mb():.1f} MB")
    print(f"getrusage(RUSAGE_SELF) peak agrees: {_rusage_mb(resource.RUSAGE_SELF):.1f} MB")


# ------------------------------------------------------- the function process

TARGET_MB = 100.0
TARGET_GROWTH = 5.0  # percent
CHECKPOINTS = (1_000, 10_000)
CALLERS = 500
BUDGET_S = 240.0


def serve(config_path: str) -> None:
    """The child: a warm "Lambda" answering the events; prints `CHECKPOINT n
    peak_mb current_mb` lines. Imports only the function modules and json."""
    import copy
    import json
    import time

    from functions import generations, tokens

    config = json.loads(Path(config_path).read_text())
    post, get, devices = config["post"], config["get"], config["devices"]
    checkpoints = set(config["checkpoints"])

    class Context:
        function_name = "dreamlens-memory"
        aws_request_id = "memory"
        memory_limit_in_mb = 1024

        def get_remaining_time_in_millis(self) -> int:
            return 30_000

    context = Context()
    deadline = time.monotonic() + config["budget_s"]
    statuses: dict[int, int] = {}
    for number in range(1, max(checkpoints) + 1):
        # a caller's POST and then its GET, or each request a caller of its own
        turn = (number - 1) // 2 if config["pairs"] else number - 1
        device = devices[turn % len(devices)]
        template, handler = (post, generations.handler) if number % 2 else (get, tokens.handler)
        event = copy.deepcopy(template)
        event["headers"]["x-device-id"] = device
        event["requestContext"]["requestId"] = f"memory-{number}"
        status = handler(event, context)["statusCode"]
        statuses[status] = statuses.get(status, 0) + 1
        if number in checkpoints:
            print(
                f"CHECKPOINT {number} {peak_rss_mb():.2f} {current_rss_mb():.2f} {json.dumps(statuses)}",
                flush=True,
            )
        if time.monotonic() > deadline:
            print(f"BUDGET {number}", flush=True)
            return


def run_child(
    database_url: str, devices: list[str], directory: Path, *, pairs: bool
) -> list[tuple[int, float, float, str]]:
    """The child's checkpoints: (requests, peak MB, current MB, statuses)."""
    import json
    import subprocess

    from harness import api_gateway_v2_event
    from workload import PROMPT, generation_event

    config = {
        "post": generation_event("placeholder-device", PROMPT),
        "get": api_gateway_v2_event("GET", "/api/tokens", headers={"X-Device-Id": "placeholder-device"}),
        "devices": devices,
        "checkpoints": list(CHECKPOINTS),
        "pairs": pairs,
        "budget_s": BUDGET_S,
    }
    config_path = directory / f"memory-{len(devices)}.json"
    config_path.write_text(json.dumps(config))
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    completed = subprocess.run(
        [sys.executable, __file__, "--child", str(config_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=BUDGET_S + 60,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{completed.stdout}\n{completed.stderr}")
    points = []
    for line in completed.stdout.splitlines():
        if line.startswith("BUDGET "):
            print(f"  (time budget of {BUDGET_S:g} s reached after {line.split()[1]} requests)")
        if line.startswith("CHECKPOINT "):
            _, number, peak, current, statuses = line.split(maxsplit=4)
            points.append((int(number), float(peak), float(current), statuses))
    return points


async def _seed(url: str, count: int, prefix: str) -> list[str]:
    import asyncpg
    from workload import seed_callers

    connection = await asyncpg.connect(url)
    try:
        users = await seed_callers(connection, count, balance=100_000, prefix=prefix)
    finally:
        await connection.close()
    return users.identities


def main() -> None:
    import tempfile

    from harness import banner, bench_database, run_sync
    from workload import Figures, load_line

    figures = Figures("memory")
    with bench_database() as database, tempfile.TemporaryDirectory(prefix="memory-") as scratch:
        banner("memory: peak RSS of a warm function process", database)
        print(f"before: {load_line()}")
        few = run_sync(lambda: _seed(database.url, CALLERS, "mem"))
        many = run_sync(lambda: _seed(database.url, CHECKPOINTS[-1], "memall"))
        runs = {
            f"{CALLERS} callers taking turns": run_child(database.url, few, Path(scratch), pairs=True),
            f"{len(many):,} callers each seen once (caches fill)": run_child(
                database.url, many, Path(scratch), pairs=False
            ),
        }
        print(f"after:  {load_line()}")
        for label, points in runs.items():
            print(f"{label}:")
            for number, peak, current, statuses in points:
                print(
                    f"  after {number:>6,} requests: peak {peak:6.1f} MB, now {current:6.1f} MB, {statuses}"
                )
        steady = runs[f"{CALLERS} callers taking turns"]
        if len(steady) == len(CHECKPOINTS):
            (_, first, _, _), (_, last, _, _) = steady
            figures.reach(
                f"peak RSS after {CHECKPOINTS[0]:,} requests", first, TARGET_MB, unit=" MB", digits=1
            )
            figures.reach(
                f"peak RSS after {CHECKPOINTS[1]:,} requests", last, TARGET_MB, unit=" MB", digits=1
            )
            figures.reach(
                "growth between the two", (last - first) / first * 100, TARGET_GROWTH, unit=" %", digits=1
            )
        full = runs[f"{len(many):,} callers each seen once (caches fill)"]
        if full:
            figures.note(
                f"peak RSS, {len(many):,} distinct callers (identity and balance caches full)",
                f"{full[-1][1]:.1f} MB",
            )
    figures.save()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        serve(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--self-check":
        self_check()
    else:
        main()
