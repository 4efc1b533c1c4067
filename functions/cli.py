"""`dreamlens`: the operator's command line.

dreamlens init-db            create or upgrade the schema; print what was applied
dreamlens migrate --status   list every migration and whether it is applied
dreamlens audit              check the ledger invariants for every user; exit 1 on any violation
"""

from __future__ import annotations

import argparse
import asyncio
import logging
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
    return root


async def _then_close_pool(command: Coroutine[Any, Any, int]) -> int:
    # the pool belongs to this asyncio.run's loop: close it before the loop goes
    try:
        return await command
    finally:
        await pool.close_pool()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run: Command = args.run
    try:
        return asyncio.run(_then_close_pool(run(args)))
    except DreamLensError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
