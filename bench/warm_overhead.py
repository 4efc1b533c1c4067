"""Warm overhead: what the Lambda handler adds to the one statement it sends.

POST /api/generations through `handler(event, context)` with an API Gateway
HTTP API (v2) event, sequentially, in a warm process (identity cached, pool
open, statement prepared), against the same spend sent by a raw asyncpg
connection: repositories.generations.CREATE_GENERATION with the parameters
the handler gives it (user id, prompt, quality, a fresh idempotency key), on
the same event loop. Reach: p50 ratio ≤ 1.5.

A third side shows the floor under the app: a Mangum + Starlette handler
with nothing of ours (no middleware, identity, validation, sql() or log
line) whose endpoint reads the JSON body and sends the same statement on a
raw connection. The sides run interleaved in blocks of 100 (the order turns
each round), so drift on this noisy machine hits them alike, and each side
has a connection (a PostgreSQL backend) of its own, used by its blocks
alone: a backend another side's blocks also use is kept warmer than the
rest. (The floor once shared the raw side's connection; in one process,
that made the raw statement's p50 0.59-0.64 ms instead of 0.68-0.69 ms, and
the handler's ratio 1.56-1.58 instead of 1.32-1.38.)

Also printed: CPU per request (thread time) of each side, and, when the
reach is not met (or with --profile), a cProfile of separate handler calls:
the share of CPU by package and the top functions. Profiling inflates
call-heavy code, so read it for where, not for how much.

The handler's request log and metric lines are formatted and written (to
/dev/null), as the Lambda runtime writes them.

    uv run python bench/warm_overhead.py [--count 3000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import asyncpg
from harness import ROOT, BenchDatabase, Summary, banner, bench_database, lambda_context, run_sync, summarize
from workload import (
    BENCH_PLAN_NOTE,
    PROMPT,
    Figures,
    call,
    check_status,
    floor_handler,
    generation_event,
    load_line,
    seed_callers,
    write_logs_like_lambda,
)

TARGET_RATIO = 1.5
BLOCK = 100
WARMUP_BLOCKS = 3
USERS = 100
BUDGET_S = 120.0
PROFILE_CALLS = 1000


@dataclass
class Side:
    samples: list[float]  # ms per call
    cpu_us: list[float]  # CPU time per call, one figure per block

    def summary(self) -> Summary:
        return summarize(self.samples)

    def cpu(self) -> float:
        return statistics.median(self.cpu_us)


class Bench:
    """The handler and a raw connection on the loop Mangum runs on."""

    def __init__(self, database: BenchDatabase) -> None:
        from functions import generations
        from repositories.generations import CREATE_GENERATION

        self.statement = CREATE_GENERATION
        self.handler = generations.handler
        self.ids, self.devices = run_sync(lambda: _seed(database.url))
        self.loop = asyncio.get_event_loop()
        self.raw: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(database.url))
        self.floor_connection: asyncpg.Connection = self.loop.run_until_complete(
            asyncpg.connect(database.url)
        )
        self.floor = self._floor_handler()
        self.turn = 0

    def _floor_handler(self) -> Any:
        """Mangum + Starlette and a raw connection of its own, nothing of ours."""
        return floor_handler(self.floor_connection, dict(zip(self.devices, self.ids, strict=True)))

    def users(self, count: int) -> list[int]:
        picked = [(self.turn + index) % USERS for index in range(count)]
        self.turn += count
        return picked

    def handler_block(self, count: int = BLOCK, handler: Any = None) -> tuple[list[float], float]:
        handler = handler or self.handler
        # the events, and the contexts the Lambda runtime hands the handler,
        # are made outside the timing: the handler's time starts at its call
        invocations = [(generation_event(self.devices[i]), lambda_context()) for i in self.users(count)]
        samples = []
        responses = []
        cpu = time.thread_time()
        for event, context in invocations:
            started = time.perf_counter()
            responses.append(handler(event, context))
            samples.append((time.perf_counter() - started) * 1000)
        cpu_us = (time.thread_time() - cpu) / count * 1e6
        for (event, _), response in zip(invocations, responses, strict=True):
            check_status(event, response, expect=201)
        return samples, cpu_us

    def floor_block(self, count: int = BLOCK) -> tuple[list[float], float]:
        return self.handler_block(count, self.floor)

    def raw_block(self, count: int = BLOCK) -> tuple[list[float], float]:
        users = [self.ids[i] for i in self.users(count)]

        async def run() -> list[float]:
            samples = []
            for user_id in users:
                key = str(uuid.uuid4())  # as the handler makes one per request
                started = time.perf_counter()
                row = await self.raw.fetchrow(self.statement, user_id, PROMPT, "standard", key)
                samples.append((time.perf_counter() - started) * 1000)
                assert row is not None and row["outcome"] == "created", row
            return samples

        cpu = time.thread_time()
        samples = self.loop.run_until_complete(run())
        return samples, (time.thread_time() - cpu) / count * 1e6

    def close(self) -> None:
        self.loop.run_until_complete(self.raw.close())
        self.loop.run_until_complete(self.floor_connection.close())


async def _seed(url: str) -> tuple[list[Any], list[str]]:
    connection = await asyncpg.connect(url)
    try:
        users = await seed_callers(connection, USERS, balance=1_000_000)
    finally:
        await connection.close()
    return users.ids, users.identities


def measure(bench: Bench, count: int) -> dict[str, Side]:
    """handler, floor and raw, interleaved in blocks; `count` calls each (or the time budget)."""
    blocks = {"handler": bench.handler_block, "floor": bench.floor_block, "raw": bench.raw_block}
    # warm-up: every caller resolved once (identity cache), pool open, statements prepared
    for _ in range(WARMUP_BLOCKS):
        for block in blocks.values():
            block()
    sides = {name: Side([], []) for name in blocks}
    deadline = time.monotonic() + BUDGET_S
    order = list(blocks)
    while len(sides["handler"].samples) < count and time.monotonic() < deadline:
        for name in order:
            samples, cpu_us = blocks[name]()
            sides[name].samples += samples
            sides[name].cpu_us.append(cpu_us)
        order = order[1:] + order[:1]  # who goes first turns each round
    done = len(sides["handler"].samples)
    if done < count:
        print(f"  (time budget of {BUDGET_S:g} s reached after {done} of {count} calls)")
    return sides


def _short(path: str) -> str:
    """A profile entry's file relative to the checkout or to site-packages / the stdlib."""
    for marker in ("site-packages/", f"/lib/python{sys.version_info.major}.{sys.version_info.minor}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    root = str(ROOT) + "/"
    return path[len(root) :] if path.startswith(root) else path


def _component(path: str) -> str:
    """A profile entry's file as a package (starlette, asyncpg) or a project module."""
    short = _short(path)
    if short.split("/")[0] in ("functions", "database", "repositories", "bench"):
        return short.removesuffix(".py")
    if short == "~" or short.startswith("<"):
        return "builtins (C: syscalls, isinstance, dict ops)"
    return short.split("/")[0].removesuffix(".py")


def profile(bench: Bench, calls: int = PROFILE_CALLS, top: int = 15) -> None:
    """Where a warm handler call's CPU goes: cProfile over `calls` calls, by thread time."""
    events = [generation_event(bench.devices[i]) for i in bench.users(calls)]
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    for event in events:
        call(bench.handler, event, expect=201)
    profiler.disable()
    stats = pstats.Stats(profiler)
    entries: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    by_component: Counter[str] = Counter()
    for (path, _, _), (_, _, own, _, _) in entries.items():
        by_component[_component(path)] += own
    total = sum(by_component.values())
    print(f"\nprofile of {calls} handler calls (cProfile, CPU time; profiling inflates call-heavy code):")
    print("  share of CPU by package / project module:")
    for name, own in by_component.most_common(top):
        print(f"    {own / total * 100:5.1f}%  {name}")
    print("  top functions by own time:")
    ranked = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for (path, line, function), (_, calls_made, own, _, _) in ranked:
        where = f"{_short(path)}:{line}({function})" if line else function
        print(f"    {own / total * 100:5.1f}%  {calls_made / calls:5.1f} calls/request  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=3000, help="handler calls measured (and as many raw)")
    parser.add_argument("--profile", action="store_true", help="profile even when the reach is met")
    args = parser.parse_args()
    write_logs_like_lambda()
    figures = Figures("warm_overhead")
    with bench_database() as database:
        banner("warm overhead: POST /api/generations through the handler vs the raw spend", database)
        print(BENCH_PLAN_NOTE)
        print(f"before: {load_line()}")
        bench = Bench(database)
        try:
            sides = measure(bench, args.count)
            print(f"after:  {load_line()}")
            handler, floor, raw = (sides[name].summary() for name in ("handler", "floor", "raw"))
            print(f"handler(event, context), v2 event:        {handler.line()}")
            print(f"floor: Mangum + Starlette + raw statement: {floor.line()}")
            print(f"raw asyncpg CREATE_GENERATION:             {raw.line()}")
            print(f"({len(sides['raw'].cpu_us)} rounds of interleaved blocks of {BLOCK})")
            print(
                "CPU per call (median of blocks): "
                + ", ".join(f"{name} {side.cpu():.0f} µs" for name, side in sides.items())
            )
            figures.note("POST /api/generations handler p50 / p99", _pair(handler))
            figures.note("raw spend statement p50 / p99", _pair(raw))
            met = figures.reach(
                "POST /api/generations p50 / raw spend p50", handler.p50 / raw.p50, TARGET_RATIO
            )
            figures.note("p99 ratio (handler / raw)", f"{handler.p99 / raw.p99:.2f}")
            figures.note(
                "floor p50 / raw p50 (Mangum + Starlette, nothing of ours)", f"{floor.p50 / raw.p50:.2f}"
            )
            figures.note(
                "CPU per call: handler / floor / raw",
                " / ".join(f"{sides[name].cpu():.0f} µs" for name in ("handler", "floor", "raw")),
            )
            if not met or args.profile:
                profile(bench)
        finally:
            bench.close()
    figures.save()


def _pair(summary: Summary) -> str:
    return f"{summary.p50:.3f} / {summary.p99:.3f} ms (n={summary.count})"


if __name__ == "__main__":
    main()
