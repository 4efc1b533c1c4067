"""Lazy initialization and schema versioning on a fresh, empty database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from database import SchemaTooNew, config, init_database, migration_status, pool, sql
from database import migrations as migrations_module
from tests import db


@pytest.fixture
async def fresh_database(admin: asyncpg.Connection, schema: str) -> AsyncIterator[str]:
    name = f"fresh_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'create database "{name}"')
    url = db.with_database(schema, name)
    await pool.close_pool()
    config.configure(url=url, non_pooling_url=url, pool_max_size=50)
    migrations_module.forget_initialized()
    try:
        yield url
    finally:
        await pool.close_pool()
        config.reset()
        migrations_module.forget_initialized()
        await admin.execute(f'drop database "{name}" with (force)')


async def test_fifty_concurrent_first_queries_initialize_once(fresh_database: str) -> None:
    results = await asyncio.gather(
        *(sql.fetchval("select count(*) from plans") for _ in range(50)),
        return_exceptions=True,
    )
    assert results == [3] * 50
    connection = await asyncpg.connect(fresh_database)
    try:
        rows = await connection.fetch("select version, name from schema_migrations order by version")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in migrations_module.known_migrations()
        ]
        assert await connection.fetchval("select count(*) from token_packages") == 4
    finally:
        await connection.close()


async def test_concurrent_init_from_many_processes_applies_once(fresh_database: str) -> None:
    """Separate connections stand in for separate Lambdas: the advisory lock,
    not the in-process lock, must make exactly one of them apply."""
    applied = await asyncio.gather(*(init_database() for _ in range(10)))
    non_empty = [names for names in applied if names]
    assert len(non_empty) == 1
    assert non_empty[0][0] == "schema.sql"
    assert await init_database() == []


async def test_init_refuses_a_database_newer_than_the_code(fresh_database: str) -> None:
    await init_database()
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute(
            "insert into schema_migrations (version, name) values (9999, '9999_future.sql')"
        )
    finally:
        await connection.close()
    with pytest.raises(SchemaTooNew, match="9999"):
        await init_database()
    status = await migration_status()
    assert (9999, "9999_future.sql", "unknown (newer code)") in status


async def test_newer_migration_is_applied_once_in_order(
    fresh_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await init_database()
    (tmp_path / "0002_add_marker.sql").write_text(
        "create table if not exists migration_marker (id int primary key);"
        "insert into migration_marker values (2) on conflict do nothing;"
    )
    monkeypatch.setattr(migrations_module, "MIGRATIONS_DIR", tmp_path)
    assert [s[2] for s in await migration_status()][-1] == "pending"
    assert await init_database() == ["0002_add_marker.sql"]
    assert await init_database() == []
    assert await sql.fetchval("select count(*) from migration_marker") == 1
    assert all(state.startswith("applied") for _, _, state in await migration_status())


async def test_badly_named_migration_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "add_column.sql").write_text("select 1;")
    monkeypatch.setattr(migrations_module, "MIGRATIONS_DIR", tmp_path)
    with pytest.raises(ValueError, match="NNNN_description"):
        migrations_module.known_migrations()
