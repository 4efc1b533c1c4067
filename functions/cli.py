"""`dreamlens`: the operator's command line.

dreamlens init-db            create or upgrade the schema; print what was applied
dreamlens migrate --status   list every migration and whether it is applied
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from database import DreamLensError, init_database, migration_status

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


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="dreamlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("init-db", help="create or upgrade the schema").set_defaults(run=init_db)
    migrate_parser = commands.add_parser("migrate", help="apply pending migrations")
    migrate_parser.add_argument("--status", action="store_true", help="only list migrations")
    migrate_parser.set_defaults(run=migrate)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run: Command = args.run
    try:
        return asyncio.run(run(args))
    except DreamLensError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
