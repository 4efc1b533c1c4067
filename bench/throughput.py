"""Throughput: 8 warm "Lambdas" spending at once, against pgbench sending the
same statement with as many clients.

Eight worker processes (multiprocessing, spawn) each import
functions.generations and call its `handler(event, context)` sequentially
with API Gateway v2 events, each with its own pool of one connection, as a
Lambda instance serves one request at a time. Phases, each a fixed time:

- distinct users: POST /api/generations for 10,000 device users (each worker
  draws at random from its own 1,250, identities resolved and statements
  prepared beforehand);
- one hot user: every worker spends on the same wallet (a big balance): the
  row lock serializes them;
- pgbench with the same client count running the equivalent single SQL
  statement (bench/pgbench_runner.py: spend, daily counter, generation,
  ledger and usage rows in one CTE, prepared protocol) on the same users.

Ours and pgbench alternate in rounds so drift on this noisy machine hits both.
On distinct users the same workers also run the floor: a Mangum + Starlette
handler sending the statement on a raw asyncpg connection, nothing of ours,
to show what ceiling the stack itself leaves on these cores.
Reach: ours ≥ 0.7 x pgbench on distinct users. Then a scarce wallet: the
eight workers race for 100 tokens; exactly 100 spends must apply. The hot
wallet must never overdraw and the ledger audit must stay clean.

    uv run python bench/throughput.py [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import asyncpg
from harness import BenchDatabase, banner, bench_database, run_sync
from pgbench_runner import PgbenchResult, pgbench_path, run_spend
from workload import BENCH_PLAN_NOTE, Figures, generation_event, load_line, seed_callers

WORKERS = 8
USERS = 10_000
HOT_BALANCE = 100_000_000
SCARCE_TOKENS = 100
SCARCE_ATTEMPTS_PER_WORKER = 25
TARGET_RATIO = 0.7


# ------------------------------------------------------------------- worker


@dataclass
class PhaseResult:
    ops: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_s: float = 0.0  # this worker's CPU time in the phase


def worker(index: int, commands: Connection, database_url: str) -> None:
    """One warm "Lambda": runs the phases the parent sends, answers results."""
    os.environ.update(DATABASE_URL=database_url, DB_POOL_MIN_SIZE="1", DB_POOL_MAX_SIZE="1")
    from harness import lambda_context
    from workload import write_logs_like_lambda

    # the request lines, and slow-statement warnings when the machine is
    # saturated, are written as on Lambda, out of this output
    write_logs_like_lambda()

    from functions import generations

    handlers = {"app": generations.handler}
    context = lambda_context()
    events: dict[str, list[dict[str, Any]]] = {}
    rng = random.Random(index)
    while True:
        command, argument = commands.recv()
        if command == "stop":
            return
        if command == "floor":  # {device: user id}: the floor handler on a raw connection
            import asyncio

            import asyncpg
            from workload import floor_handler

            raw = asyncio.get_event_loop().run_until_complete(asyncpg.connect(database_url))
            handlers["floor"] = floor_handler(raw, argument)
            commands.send(len(argument))
            continue
        if command == "events":  # (name, devices): build them once, outside the timing
            name, devices = argument
            events[name] = [generation_event(device) for device in devices]
            commands.send(len(events[name]))
            continue
        if command == "warm":  # every caller once: identity resolved, statement prepared
            result = PhaseResult()
            for event in events[argument]:
                status = handlers["app"](event, context)["statusCode"]
                if status != 201:
                    result.errors[str(status)] = result.errors.get(str(status), 0) + 1
                result.ops += 1
            commands.send(asdict(result))
            continue
        if command == "run":  # (name, seconds, attempts or None, "app" or "floor")
            name, seconds, attempts, side = argument
            handler = handlers[side]
            pool = events[name]
            result = PhaseResult()
            cpu = time.process_time()
            started = time.monotonic()
            deadline = started + seconds
            while time.monotonic() < deadline and (attempts is None or result.ops < attempts):
                event = pool[rng.randrange(len(pool))]
                try:
                    status = handler(event, context)["statusCode"]
                except Exception as exc:  # a benchmark counts failures, whatever they are
                    status = type(exc).__name__
                if status != 201:
                    result.errors[str(status)] = result.errors.get(str(status), 0) + 1
                result.ops += 1
            result.seconds = time.monotonic() - started
            result.cpu_s = time.process_time() - cpu
            # plain data: the parent has no __mp_main__ to unpickle a class from
            commands.send(asdict(result))


class Workers:
    """The eight spawned processes and a pipe to each."""

    def __init__(self, database_url: str, count: int = WORKERS) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes = []
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(target=worker, args=(index, child, database_url), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def send_all(self, command: str, arguments: list[Any]) -> list[Any]:
        for pipe, argument in zip(self.pipes, arguments, strict=True):
            pipe.send((command, argument))
        return [pipe.recv() for pipe in self.pipes]

    def run(
        self, name: str, seconds: float, attempts: int | None = None, side: str = "app"
    ) -> list[PhaseResult]:
        answers = self.send_all("run", [(name, seconds, attempts, side)] * len(self.pipes))
        return [PhaseResult(**answer) for answer in answers]

    def warm(self, name: str) -> list[PhaseResult]:
        return [PhaseResult(**answer) for answer in self.send_all("warm", [name] * len(self.pipes))]

    def stop(self) -> None:
        for pipe in self.pipes:
            pipe.send(("stop", None))
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.terminate()


@dataclass
class Totals:
    ops: int
    errors: dict[str, int]
    seconds: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


def total(results: list[list[PhaseResult]]) -> Totals:
    """Rounds of the eight workers' results: ops over the phases' wall time."""
    ops = sum(result.ops for round_ in results for result in round_)
    seconds = sum(max(result.seconds for result in round_) for round_ in results)
    errors: dict[str, int] = {}
    for round_ in results:
        for result in round_:
            for status, count in result.errors.items():
                errors[status] = errors.get(status, 0) + count
    cpu_s = sum(result.cpu_s for round_ in results for result in round_)
    return Totals(ops, errors, seconds, cpu_s)


# ----------------------------------------------------------------- database


@dataclass
class Seeded:
    first: int  # bench_users numbers of the distinct users
    last: int
    devices: list[str]
    ids: list[Any]
    hot: tuple[int, str, Any]  # number, device, user id
    scarce: tuple[int, str, Any]


async def _seed(url: str) -> Seeded:
    connection = await asyncpg.connect(url)
    try:
        users = await seed_callers(connection, USERS, balance=1_000_000, prefix="tp")
        hot = await seed_callers(connection, 1, balance=HOT_BALANCE, prefix="tphot")
        # the welcome bonus (device: 5) plus the rest, 100 in all
        scarce = await seed_callers(connection, 1, balance=SCARCE_TOKENS - 5, prefix="tpscarce")
    finally:
        await connection.close()
    return Seeded(
        users.first,
        users.last,
        users.identities,
        users.ids,
        (hot.first, hot.identities[0], hot.ids[0]),
        (scarce.first, scarce.identities[0], scarce.ids[0]),
    )


async def _wallet(url: str, user_id: Any) -> tuple[int, int, int]:
    """(balance, total_spent, spend rows in the ledger) of a user."""
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(
            "select balance, total_spent from user_tokens where user_id = $1", user_id
        )
        spends = await connection.fetchval(
            "select count(*) from token_transactions where user_id = $1 and type = 'spend'", user_id
        )
    finally:
        await connection.close()
    assert row is not None
    return row["balance"], row["total_spent"], spends


async def _audit(url: str) -> list[tuple[str, str]]:
    from harness import audit_problems

    connection = await asyncpg.connect(url)
    try:
        return await audit_problems(connection)
    finally:
        await connection.close()


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children (pgbench, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------- run


def run(database: BenchDatabase, seconds: int, rounds: int, figures: Figures) -> None:
    seeded = run_sync(lambda: _seed(database.url))
    hot_number, hot_device, hot_id = seeded.hot
    _, scarce_device, scarce_id = seeded.scarce
    print(f"seeded {USERS:,} users (bench_users {seeded.first}..{seeded.last}), one hot, one scarce")
    workers = Workers(database.url)
    try:
        shares = [seeded.devices[index::WORKERS] for index in range(WORKERS)]
        workers.send_all("events", [("distinct", share) for share in shares])
        workers.send_all("events", [("hot", [hot_device])] * WORKERS)
        workers.send_all("events", [("scarce", [scarce_device])] * WORKERS)
        users = dict(zip(seeded.devices, seeded.ids, strict=True))
        workers.send_all("floor", [{device: users[device] for device in share} for share in shares])
        warm = workers.warm("distinct")
        warm_errors = sum(sum(result.errors.values()) for result in warm)
        print(f"warm-up: {sum(r.ops for r in warm):,} spends, one per user ({warm_errors} errors)")
        hot_before = run_sync(lambda: _wallet(database.url, hot_id))

        ours: dict[str, list[list[PhaseResult]]] = {"distinct": [], "hot": []}
        floor: list[list[PhaseResult]] = []
        pgbench_cpu = {"distinct": 0.0, "hot": 0.0}
        theirs: dict[str, list[PgbenchResult]] = {"distinct": [], "hot": []}
        for round_ in range(rounds):
            for phase, (first, last) in (
                ("distinct", (seeded.first, seeded.last)),
                ("hot", (hot_number, hot_number)),
            ):
                steps = ["ours", "pgbench"] if round_ % 2 == 0 else ["pgbench", "ours"]
                if phase == "distinct":
                    steps.insert(1, "floor")
                for step in steps:
                    if step == "ours":
                        ours[phase].append(workers.run(phase, seconds))
                    elif step == "floor":
                        floor.append(workers.run(phase, seconds, side="floor"))
                    else:
                        cpu = children_cpu_s()
                        theirs[phase].append(
                            run_spend(
                                database.url, first, last, clients=WORKERS, seconds=seconds, generation=True
                            )
                        )
                        pgbench_cpu[phase] += children_cpu_s() - cpu
        print(f"after:  {load_line()} (the timed phases done)")

        # eight workers race for 100 tokens, 25 attempts each
        hot_after = run_sync(lambda: _wallet(database.url, hot_id))
        scarce = total([workers.run("scarce", 60.0, SCARCE_ATTEMPTS_PER_WORKER)])
        scarce_wallet = run_sync(lambda: _wallet(database.url, scarce_id))
    finally:
        workers.stop()
    problems = run_sync(lambda: _audit(database.url))

    print()
    for phase, label in (("distinct", f"{USERS:,} distinct users"), ("hot", "one hot user")):
        mine = total(ours[phase])
        pg_ops = sum(result.transactions for result in theirs[phase])
        pg_seconds = sum(result.seconds or 0 for result in theirs[phase])
        pg_failed = sum(result.failed for result in theirs[phase])
        pg_rate = pg_ops / pg_seconds
        print(
            f"{label}: handlers {mine.rate:,.0f} ops/s ({mine.ops:,} in {mine.seconds:.1f} s, errors "
            f"{mine.errors or 'none'}); pgbench {pg_rate:,.0f} tps ({pg_ops:,}, {pg_failed} failed)"
        )
        ours_us, theirs_us = mine.cpu_s / mine.ops * 1e6, pgbench_cpu[phase] / pg_ops * 1e6
        client_cpu = f"handlers {ours_us:,.0f} µs, pgbench {theirs_us:,.0f} µs"
        print(f"  client CPU per operation: {client_cpu} (both beside PostgreSQL on the same cores)")
        figures.note(
            f"{label}: handlers, {WORKERS} workers",
            f"{mine.rate:,.0f} ops/s, errors {sum(mine.errors.values())}",
        )
        figures.note(f"{label}: pgbench, {WORKERS} clients, same statement", f"{pg_rate:,.0f} tps")
        figures.note(f"{label}: client CPU per operation (on the database's 2 cores)", client_cpu)
        ratio = mine.rate / pg_rate
        if phase == "distinct":
            figures.reach(f"{label}: handlers / pgbench", ratio, TARGET_RATIO, better="higher")
            # what the same eight processes reach with nothing of ours: the
            # ceiling Mangum, Starlette and asyncpg leave on these cores
            bare = total(floor)
            figures.note(
                f"{label}: floor (Mangum + Starlette + raw asyncpg, nothing of ours), {WORKERS} workers",
                f"{bare.rate:,.0f} ops/s = {bare.rate / pg_rate:.2f} x pgbench, "
                f"client CPU {bare.cpu_s / bare.ops * 1e6:,.0f} µs per operation, "
                f"errors {sum(bare.errors.values())}",
            )
        else:
            figures.note(f"{label}: handlers / pgbench", f"{ratio:.2f}")

    # the hot wallet paid for every spend of the handlers and of pgbench, one ledger row each
    hot_spends = hot_after[2] - hot_before[2]
    handler_spends = total(ours["hot"]).ops - sum(total(ours["hot"]).errors.values())
    pgbench_spends = sum(result.transactions for result in theirs["hot"])
    hot_ok = (
        hot_after[0] >= 0
        and hot_before[0] - hot_after[0] == hot_spends == hot_after[1] - hot_before[1]
        and hot_spends == handler_spends + pgbench_spends
    )
    figures.note(
        "hot user: never overdrawn, every spend in the ledger",
        f"{'yes' if hot_ok else 'NO'} (balance {hot_before[0]:,} -> {hot_after[0]:,}: {handler_spends:,} "
        f"spends by the handlers + {pgbench_spends:,} by pgbench = {hot_spends:,} ledger rows)",
    )
    applied = scarce_wallet[2]
    figures.note(
        f"scarce wallet: {WORKERS} workers x {SCARCE_ATTEMPTS_PER_WORKER} attempts on {SCARCE_TOKENS} tokens",
        f"{applied} applied, balance {scarce_wallet[0]}, refusals {scarce.errors}",
    )
    figures.note(
        "ledger audit after the run", "clean" if not problems else f"{len(problems)} problems: {problems}"
    )
    assert hot_ok, (hot_before, hot_after)
    assert applied == SCARCE_TOKENS and scarce_wallet[0] == 0, scarce_wallet
    assert not problems, problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5, help="length of each timed phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (ours, pgbench) per workload")
    args = parser.parse_args()
    figures = Figures("throughput")
    with bench_database() as database:
        banner(f"throughput: {WORKERS} warm handler processes against pgbench, same statement", database)
        print(BENCH_PLAN_NOTE)
        print(f"pgbench: {pgbench_path()}; {args.rounds} rounds of {args.seconds} s per side and workload")
        print(f"before: {load_line()}")
        run(database, args.seconds, args.rounds, figures)
    figures.save()


if __name__ == "__main__":
    main()
