"""The ledger audit as the ledger grows: each statement bounded by its batch.

The hourly audit job (functions/jobs.py) runs repositories/audit.py's
find_violations() under the deployed statement timeout (10 s by default).
It goes through the users in batches of AUDIT_BATCH_USERS, two statements a
batch, so what one statement reads is one batch's wallets and ledger rows,
whatever the size of the whole ledger.

This script grows a ledger in steps (users with a history of ledger rows
each, consistent books) and, at each size, runs the audit as the job does
(through sql(), on the app's pool) and times each of its statements. Beside
it, for scale, the same checks as one statement over the whole ledger (the
audit before batching), whose time grows with the ledger. Reach: the slowest
statement of the batched audit at the largest size ≤ 1 s, a tenth of the
statement timeout. The books must come out clean at every size.

    uv run python bench/audit.py [--users 20000] [--rows-per-user 25] [--steps 3]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import asyncpg
from harness import banner, bench_database, point_app_at, run_sync, seed_users
from workload import Figures, load_line

TARGET_SLOWEST_S = 1.0

# a history of `$1` purchases of one token for each user in bench_users
# n in ($2, $3], in ledger id order, with balance_after the running sum; the
# wallets follow, so the books stay clean
ADD_HISTORY = """
with history as (
    insert into token_transactions (user_id, amount, balance_after, type, description, idempotency_key)
    select b.user_id, 1, t.balance + g, 'purchase', 'bench history', 'bench-history:' || b.n || ':' || g
      from bench_users b
      join user_tokens t on t.user_id = b.user_id
     cross join generate_series(1, $1::integer) as g
     where b.n > $2 and b.n <= $3
     order by b.n, g
    returning user_id
)
update user_tokens t
   set balance = t.balance + $1, total_earned = t.total_earned + $1, updated_at = now()
 where t.user_id in (select distinct user_id from history)
"""


class TimedSql:
    """sql() with each statement's time kept: the executor the audit is given."""

    def __init__(self) -> None:
        from database import sql

        self.sql = sql
        self.seconds: list[float] = []

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        started = time.perf_counter()
        try:
            return await self.sql.fetch(query, *args)
        finally:
            self.seconds.append(time.perf_counter() - started)


def whole_ledger_statement() -> str:
    """The same checks as one statement over every user (no batch)."""
    from repositories.audit import FIND_VIOLATIONS

    unbatched = FIND_VIOLATIONS.replace("     where user_id = any($1::uuid[])\n", "").replace(
        " where u.id = any($1::uuid[])\n   and c.failed", " where c.failed"
    )
    if unbatched == FIND_VIOLATIONS or "$1" in unbatched:
        raise RuntimeError("FIND_VIOLATIONS changed shape: update whole_ledger_statement()")
    return unbatched


async def grow(url: str, users: int, rows_per_user: int) -> int:
    """`users` more users with `rows_per_user` ledger rows each (the welcome
    bonus included); the ledger's size afterwards."""
    connection = await asyncpg.connect(url)
    try:
        seeded = await seed_users(connection, users)
        await connection.execute(ADD_HISTORY, rows_per_user - 1, seeded.first - 1, seeded.last)
        await connection.execute("analyze users; analyze token_transactions; analyze user_tokens")
        rows: int = await connection.fetchval("select count(*) from token_transactions")
        return rows
    finally:
        await connection.close()


async def batched_audit() -> tuple[int, TimedSql, float]:
    """The job's audit, on a pool of its own (connected before the timing)."""
    from database import pool, sql
    from repositories.audit import find_violations

    await sql.fetch("select 1")
    timed = TimedSql()
    try:
        started = time.perf_counter()
        violations = await find_violations(db=timed)  # type: ignore[arg-type]
        return len(violations), timed, time.perf_counter() - started
    finally:
        await pool.close_pool()


async def one_statement(url: str) -> tuple[int, float]:
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        rows = await connection.fetch(whole_ledger_statement())
        return len(rows), time.perf_counter() - started
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000, help="users added at each step")
    parser.add_argument("--rows-per-user", type=int, default=25, help="ledger rows of each user")
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()

    from repositories.audit import AUDIT_BATCH_USERS

    figures = Figures("audit")
    with bench_database() as database:
        banner("ledger audit: batched statements as the ledger grows", database)
        point_app_at(database.url)
        print(f"before: {load_line()}")
        print(f"batches of {AUDIT_BATCH_USERS:,} users, two statements each; times in ms")
        slowest = 0.0
        for step in range(1, options.steps + 1):
            ledger_rows = run_sync(lambda: grow(database.url, options.users, options.rows_per_user))
            found, timed, total = run_sync(batched_audit)
            unbatched_found, unbatched_s = run_sync(lambda: one_statement(database.url))
            slowest = max(timed.seconds)
            ordered = sorted(timed.seconds)
            print(
                f"ledger {ledger_rows:>9,} rows, {step * options.users:>7,} users: batched audit "
                f"{total * 1000:7.0f} total, {len(timed.seconds):>4} statements, "
                f"median {ordered[len(ordered) // 2] * 1000:5.1f}, slowest {slowest * 1000:6.1f}; "
                f"one statement over the whole ledger {unbatched_s * 1000:7.0f}; "
                f"violations {found} / {unbatched_found}"
            )
            if found or unbatched_found:
                raise AssertionError("the bench's books must be clean")
            figures.note(
                f"audit of {ledger_rows:,} ledger rows ({step * options.users:,} users)",
                f"batched {total * 1000:.0f} ms in {len(timed.seconds)} statements, slowest "
                f"{slowest * 1000:.1f} ms; one statement over the whole ledger {unbatched_s * 1000:.0f} ms",
            )
        print(f"after:  {load_line()}")
        figures.reach(
            "slowest audit statement at the largest ledger", slowest, TARGET_SLOWEST_S, unit=" s", digits=3
        )
    figures.save()


if __name__ == "__main__":
    main()
