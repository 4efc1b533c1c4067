"""Tests of repositories/ against the real PostgreSQL of tests/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from database import config, pool


@asynccontextmanager
async def wide_pool(size: int) -> AsyncIterator[None]:
    """A pool of `size` connections, so concurrent calls really run side by side."""
    await pool.close_pool()
    config.configure(pool_max_size=size)
    try:
        yield
    finally:
        # the next test builds its own, default-sized pool
        await pool.close_pool()
