"""Sensitivity to database distance: POST /api/generations with PostgreSQL
2 ms away (each way), this project against the peer.

A delay proxy (bench/delay_proxy.py, in a process of its own) sits between
the app and PostgreSQL and holds every chunk 2 ms in each direction, as a
database in another zone or a serverless Postgres would. Both handlers reach
the database through it, in one process, on the Mangum loop, with API Gateway
v2 events for device callers:

- this project: functions.generations' handler (statement cache on), one
  statement per warm request;
- the peer: bench/peer_sqlalchemy.py's FastAPI + Mangum handler, SQLAlchemy
  async ORM in the repository style (user lookup, price, plan limit, wallet
  FOR UPDATE, update, three inserts, commit).

They run interleaved in blocks (the order turns each round). Reach: this
project's p50 ≤ 0.5 x the peer's. First, at 0 ms, the round trips each sends
per warm request are counted on the wire.

    uv run python bench/db_distance.py
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg
from delay_proxy import DelayProxy, spawn_proxy
from harness import BenchDatabase, Summary, banner, bench_database, run_sync, summarize
from workload import BENCH_PLAN_NOTE, Figures, call, generation_event, load_line, seed_callers

DELAY_MS = 2.0
TARGET_RATIO = 0.5
CALLS = 300
BLOCK = 25
WARMUP = 20
USERS = 50  # each comes back every few seconds: identities stay cached (30 s)
BUDGET_S = 150.0
COUNTED_CALLS = 20


async def _seed(url: str, prefix: str) -> list[str]:
    connection = await asyncpg.connect(url)
    try:
        users = await seed_callers(connection, USERS, balance=100_000, prefix=prefix)
    finally:
        await connection.close()
    return users.identities


class Contender:
    """A handler and its callers; `block(n)` times n sequential calls."""

    def __init__(self, name: str, handler: Any, devices: list[str]) -> None:
        self.name = name
        self.handler = handler
        self.devices = devices
        self.turn = 0
        self.samples: list[float] = []

    def events(self, count: int) -> list[dict[str, Any]]:
        picked = [self.devices[(self.turn + index) % len(self.devices)] for index in range(count)]
        self.turn += count
        return [generation_event(device) for device in picked]

    def block(self, count: int, *, keep: bool = True) -> None:
        for event in self.events(count):  # built before the timing of each call
            started = time.perf_counter()
            call(self.handler, event, expect=201)
            if keep:
                self.samples.append((time.perf_counter() - started) * 1000)

    def summary(self) -> Summary:
        return summarize(self.samples)


def contenders(url: str, ours_devices: list[str], peer_devices: list[str]) -> list[Contender]:
    """This project's handler with its database layer on `url`, and the peer's."""
    from peer_sqlalchemy import build_handler

    from database import config, pool
    from functions import generations

    os.environ["DATABASE_URL"] = url
    os.environ.pop("DB_STATEMENT_CACHE_SIZE", None)
    config.reset()
    asyncio.get_event_loop().run_until_complete(pool.close_pool())
    return [
        Contender("this project", generations.handler, ours_devices),
        Contender("peer (SQLAlchemy ORM + FastAPI)", build_handler(url), peer_devices),
    ]


def count_round_trips(database: BenchDatabase, ours: list[str], peer: list[str]) -> dict[str, float]:
    """Round trips on the wire per warm request, through the proxy at 0 ms."""
    counted: dict[str, float] = {}
    with DelayProxy(database.upstream, delay_ms=0) as proxy:
        for contender in contenders(database.url_for("127.0.0.1", proxy.port), ours, peer):
            contender.block(len(contender.devices), keep=False)  # every caller resolved once
            before = proxy.turns_to_server
            contender.block(COUNTED_CALLS, keep=False)
            counted[contender.name] = (proxy.turns_to_server - before) / COUNTED_CALLS
    return counted


def measure(database: BenchDatabase, ours: list[str], peer: list[str]) -> list[Contender]:
    with spawn_proxy(database.upstream, DELAY_MS) as proxy:
        sides = contenders(database.url_for("127.0.0.1", proxy.port), ours, peer)
        for side in sides:  # every caller resolved once, pools open, statements prepared
            side.block(USERS, keep=False)
        deadline = time.monotonic() + BUDGET_S
        order = list(sides)
        while len(sides[0].samples) < CALLS and time.monotonic() < deadline:
            for side in order:
                side.block(BLOCK)
            order = order[1:] + order[:1]
        if len(sides[0].samples) < CALLS:
            print(f"  (time budget of {BUDGET_S:g} s reached after {len(sides[0].samples)} calls each)")
    return sides


def main() -> None:
    from workload import write_logs_like_lambda

    write_logs_like_lambda()
    figures = Figures("db_distance")
    with bench_database() as database:
        banner(
            f"database distance: POST /api/generations with PostgreSQL {DELAY_MS:g} ms away each way",
            database,
        )
        print(BENCH_PLAN_NOTE)
        print(f"before: {load_line()}")
        ours = run_sync(lambda: _seed(database.url, "dist"))
        peer = run_sync(lambda: _seed(database.url, "distpeer"))
        trips = count_round_trips(database, ours, peer)
        for name, count in trips.items():
            print(f"round trips on the wire per warm request, {name}: {count:.1f}")
        sides = measure(database, ours, peer)
        print(f"after:  {load_line()}")
        for side in sides:
            print(f"{side.name + ':':<34} {side.summary().line()}")
        mine, theirs = (side.summary() for side in sides)
        for side in sides:
            figures.note(
                f"POST /api/generations p50, {side.name}, {DELAY_MS:g} ms each way",
                f"{side.summary().p50:.1f} ms (p99 {side.summary().p99:.1f}; "
                f"{trips[side.name]:.0f} round trips)",
            )
        figures.reach("this project p50 / peer p50 at 2 ms each way", mine.p50 / theirs.p50, TARGET_RATIO)
    figures.save()


if __name__ == "__main__":
    main()
