"""Every function test gets a fresh Lambda runtime (a thread with its own
persistent event loop, see lambda_events.py) and fresh per-cold-start state:
settings, secrets and the identity cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from functions.fake_yookassa import InProcessServer
from tests.functions import lambda_events

# Mangum() takes the thread's event loop when it is constructed (at the import
# of a function module), making one if there is none. In Lambda that loop then
# serves every invocation. Under pytest nothing would close it, and
# pytest-asyncio replaces the main thread's loop, so the orphan would be
# collected with a ResourceWarning. The imports get a loop this file owns.
_import_loop = asyncio.new_event_loop()
asyncio.set_event_loop(_import_loop)


@pytest.fixture(scope="session", autouse=True)
def close_import_loop() -> Iterator[None]:
    yield
    _import_loop.close()


@pytest.fixture(autouse=True)
async def lambda_runtime() -> AsyncIterator[lambda_events.LambdaRuntime]:
    async with lambda_events.warm_runtime() as runtime:
        yield runtime


@pytest.fixture
async def http(payments_server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the payments and webhook app served on localhost
    (payment_support.payments_server, which the module imports)."""
    async with httpx.AsyncClient(base_url=payments_server.base_url, timeout=30) as client:
        yield client
