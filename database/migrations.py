"""Schema versioning: schema.sql is version 1, numbered files in
database/migrations/ (`0002_add_something.sql`, ...) are the versions after it.

init_database() applies what the database has not recorded yet, in one
transaction that holds an advisory lock, so any number of processes may call
it at once (many Lambdas cold start together): one applies, the others wait
and then find nothing to do. The lock is transaction-scoped, so it also holds
behind PgBouncer in transaction mode. It refuses a database whose recorded
version is newer than this code knows.

schema.sql always describes the whole current schema and every migration is
idempotent, so a fresh database runs schema.sql and then every migration as
a no-op; an older one runs only the migrations it lacks.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from database import budget, config, pool
from database.errors import SchemaTooNew

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key: any fixed bigint unique to this purpose
SCHEMA_LOCK_KEY = 0x6472656D6C656E73  # "dremlens"

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

CREATE_SCHEMA_MIGRATIONS = """
create table if not exists schema_migrations (
    version    integer primary key,
    name       text not null,
    applied_at timestamptz not null default now()
)
"""

RECORDED_VERSION = "select coalesce(max(version), 0) from schema_migrations"

RECORD_MIGRATION = "insert into schema_migrations (version, name) values ($1, $2)"

LIST_APPLIED = "select version, name, applied_at from schema_migrations order by version"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")


def schema_path() -> Path:
    # the repository root in a checkout; beside this package in a wheel or zip
    for candidate in (Path(__file__).parent.parent / "schema.sql", Path(__file__).parent / "schema.sql"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("schema.sql is missing from this build")


def known_migrations() -> list[Migration]:
    migrations = [Migration(1, "schema.sql", schema_path())]
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name} is not named NNNN_description.sql")
        version = int(match.group(1))
        if version <= migrations[-1].version:
            raise ValueError(f"migration {path.name} does not come after {migrations[-1].name}")
        migrations.append(Migration(version, path.name, path))
    return migrations


async def init_database() -> list[str]:
    """Apply schema.sql and newer migrations; return the names applied.

    Within the request's time budget, when there is one (database/budget.py):
    many Lambdas cold starting on an empty database wait here for the one
    applying the schema, and each must still answer 503 before it is stopped.
    Cut short, it rolls back whole (one transaction), so nothing is left half
    applied; a migration longer than a request's time is for `dreamlens
    init-db`, which has no budget."""
    async with asyncio.timeout(budget.bounded(None)):
        return await _apply_migrations()


async def _apply_migrations() -> list[str]:
    migrations = known_migrations()
    connection = await pool.connect_direct()
    try:
        async with connection.transaction():
            await connection.execute("select pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
            await connection.execute(CREATE_SCHEMA_MIGRATIONS)
            recorded = await connection.fetchval(RECORDED_VERSION)
            newest = migrations[-1].version
            if recorded > newest:
                raise SchemaTooNew(
                    f"The database is at schema version {recorded}, newer than this code "
                    f"knows ({newest}); deploy the newer code or restore the database"
                )
            applied = []
            for migration in migrations:
                if migration.version > recorded:
                    await connection.execute(migration.text())
                    await connection.execute(RECORD_MIGRATION, migration.version, migration.name)
                    applied.append(migration.name)
    except BaseException:
        # cut short (a timeout, a cancelled task) or failed: don't wait on a
        # polite close, the server rolls back and frees the lock either way
        connection.terminate()
        raise
    await connection.close()
    if applied:
        log.info("schema initialized: applied %s", ", ".join(applied))
    return applied


async def migration_status() -> list[tuple[int, str, str]]:
    """Every known migration with `applied <when>` or `pending`; recorded
    versions this code does not know are listed as `unknown (newer code)`."""
    connection = await pool.connect_direct()
    try:
        exists = await connection.fetchval("select to_regclass('schema_migrations') is not null")
        rows = await connection.fetch(LIST_APPLIED) if exists else []
    finally:
        await connection.close()
    applied = {row["version"]: row for row in rows}
    status = []
    known = known_migrations()
    for migration in known:
        row = applied.get(migration.version)
        state = f"applied {row['applied_at']:%Y-%m-%d %H:%M:%S}" if row else "pending"
        status.append((migration.version, migration.name, state))
    known_versions = {m.version for m in known}
    for version, row in sorted(applied.items()):
        if version not in known_versions:
            status.append((version, row["name"], "unknown (newer code)"))
    return status


_init_lock: asyncio.Lock | None = None
_init_loop: asyncio.AbstractEventLoop | None = None
_initialized_url: str | None = None


async def ensure_initialized() -> None:
    """init_database() once per process and database, however many callers
    find the schema missing at the same moment."""
    global _init_lock, _init_loop, _initialized_url
    loop = asyncio.get_running_loop()
    if _init_lock is None or _init_loop is not loop:
        _init_lock, _init_loop = asyncio.Lock(), loop
    url = config.settings().non_pooling_url
    # the wait for another caller's init counts against this one's budget too
    async with asyncio.timeout(budget.bounded(None)), _init_lock:
        if _initialized_url == url:
            return
        await init_database()
        _initialized_url = url


def forget_initialized() -> None:
    """Tests that drop the schema call this so the next miss initializes again."""
    global _initialized_url
    _initialized_url = None
