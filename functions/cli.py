"""`dreamlens`: the operator's command line.

dreamlens init-db            create or upgrade the schema; print what was applied
dreamlens migrate --status   list every migration and whether it is applied
dreamlens audit              check the ledger invariants for every user; exit 1 on any violation
dreamlens stats              users, balances outstanding, tokens sold and spent today
dreamlens serve              the whole API on localhost (embedded PostgreSQL, fake YooKassa)
dreamlens reap-generations | expire-subscriptions | prune-usage | audit-ledger | reconcile-payments
                             run one scheduled job now, as its schedule would
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from database import DreamLensError, init_database, migration_status, pool
from repositories.audit import count_users, find_violations

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


async def init_db(_: argparse.Namespace) -> int:
    applied = await init_database()
    if applied:
        print("applied: " + ", ".join(applied))
    else:
        print("schema is up to date; nothing applied")
    return 0


async def migrate(args: argparse.Namespace) -> int:
    if not args.status:
        return await init_db(args)
    for version, name, state in await migration_status():
        print(f"{version:>5}  {name:<40} {state}")
    return 0


async def run_audit() -> int:
    """Print every ledger violation; 0 when the books balance, 1 otherwise."""
    violations = await find_violations()
    checked = await count_users()
    for violation in violations:
        print(f"{violation.user_id}  {violation.problem}: {violation.detail}")
    if violations:
        print(f"audit failed: {len(violations)} violations; {checked} users checked")
        return 1
    print(f"audit clean: {checked} users checked")
    return 0


async def audit(_: argparse.Namespace) -> int:
    return await run_audit()


async def stats(_: argparse.Namespace) -> int:
    from repositories.reports import operator_stats

    figures = await operator_stats()
    for name, value in figures.model_dump().items():
        print(f"{name.replace('_', ' '):<28} {value}")
    return 0


async def serve(args: argparse.Namespace) -> int:
    from functions.serve import ServeOptions
    from functions.serve import serve as run_server

    fake_payments = args.fake_payments or not os.environ.get("YOOKASSA_SHOP_ID")
    return await run_server(ServeOptions(args.host, args.port, fake_payments))


JOB_HELP = {
    "reap-generations": "requeue lapsed leases; fail and refund stuck generations",
    "expire-subscriptions": "expire plans whose period ended",
    "prune-usage": "delete usage logs past their retention, in bounded batches",
    "audit-ledger": "the ledger audit as scheduled: log violations, emit the metric",
    "reconcile-payments": "ask YooKassa about payments still open; credit what succeeded",
}


def job_command(name: str) -> Command:
    async def run_job(_: argparse.Namespace) -> int:
        from functions.jobs import JOBS

        result = await JOBS[name]()
        print(f"{name}: " + ", ".join(f"{key} {value}" for key, value in result.items()))
        return 1 if name == "audit-ledger" and result.get("violations") else 0

    return run_job


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="dreamlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("init-db", help="create or upgrade the schema").set_defaults(run=init_db)
    migrate_parser = commands.add_parser("migrate", help="apply pending migrations")
    migrate_parser.add_argument("--status", action="store_true", help="only list migrations")
    migrate_parser.set_defaults(run=migrate)
    commands.add_parser("audit", help="check the ledger invariants for every user").set_defaults(run=audit)
    commands.add_parser("stats", help="figures for an operator").set_defaults(run=stats)
    serve_parser = commands.add_parser("serve", help="the whole API on localhost")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument(
        "--fake-payments",
        action="store_true",
        help="use the fake YooKassa (the default when YOOKASSA_SHOP_ID is unset)",
    )
    serve_parser.set_defaults(run=serve)
    from functions.jobs import JOBS

    for name in JOBS:
        commands.add_parser(name, help=JOB_HELP[name]).set_defaults(run=job_command(name))
    return root


async def _then_close_pool(command: Coroutine[Any, Any, int]) -> int:
    # the pool belongs to this asyncio.run's loop: close it before the loop goes
    try:
        return await command
    finally:
        await pool.close_pool()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # our own progress lines for a person; the embedded server's chatter and
    # the EMF metric lines (meant for CloudWatch) stay out of the way
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    levels = {
        "dreamlens": logging.INFO,
        "database": logging.INFO,
        "functions": logging.INFO,
        "repositories": logging.INFO,
        "dreamlens.metrics": logging.WARNING,
    }
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        return _run(args)
    finally:
        # main() is also called in-process (tests): leave logging as it was
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _run(args: argparse.Namespace) -> int:
    run: Command = args.run
    try:
        from functions import settings

        # database URLs kept in Secrets Manager (*_SECRET_ARN) reach os.environ first
        settings.load_database_secrets()
        return asyncio.run(_then_close_pool(run(args)))
    except DreamLensError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: uvicorn stops serving, then raises the signal again, which
        # cancels what is left (the fake YooKassa's server); asyncio.run has
        # cancelled every task and the embedded PostgreSQL stops at exit
        print("stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
