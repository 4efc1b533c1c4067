"""An empty database of their own, for the tests of schema initialization
and migrations."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database import config, pool
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
