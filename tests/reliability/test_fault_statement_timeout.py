"""A statement past the statement timeout (DB_STATEMENT_TIMEOUT_MS, here
200 ms): an operator's open transaction holds the row (or lock) the request
needs, so the app's statement waits until the server cancels it. The request
is answered 503 with Retry-After at once (a cancelled statement is not
retried: waiting again would only wait again), nothing is half-written, and
once the lock is released the client's repeat with the same key applies
exactly once."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from database import config, pool
from repositories.users import SIGNUP_LOCK_NAMESPACE
from tests.functions.callers import fingerprint
from tests.reliability.conftest import Served
from tests.reliability.traffic import Books, Client, Record, User, check_books, deliver

STATEMENT_TIMEOUT_MS = 200

WAITING_LOCKS = "select count(*) from pg_locks where not granted"


@pytest.fixture
async def short_timeout(served: Served) -> AsyncIterator[None]:
    await pool.close_pool()
    config.configure(statement_timeout_ms=STATEMENT_TIMEOUT_MS)
    yield
    await pool.close_pool()


@pytest.fixture
async def operator(direct_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another client of the database, holding locks in an open transaction."""
    connection = await asyncpg.connect(direct_url)
    try:
        yield connection
    finally:
        await connection.close()


def a_user(http: httpx.AsyncClient, served: Served, record: Record, books: Books) -> User:
    device = f"timeout-{uuid.uuid4().hex[:12]}"
    return User(
        handle=device,
        kind="device",
        auth={"X-Device-Id": device},
        client=Client(http, record),
        books=books,
        fake=served.fake,
    )


def assert_refused_in_time(response: httpx.Response | None, seconds: float) -> None:
    assert response is not None
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "unavailable"
    assert int(response.headers["retry-after"]) >= 1
    # the server's cancel after 200 ms, not the client's 15 s command timeout
    # nor three attempts of waiting
    assert seconds < 2


async def test_a_spend_past_the_statement_timeout_is_503_and_writes_nothing(
    short_timeout: None,
    served: Served,
    http: httpx.AsyncClient,
    admin: asyncpg.Connection,
    operator: asyncpg.Connection,
) -> None:
    record, books = Record(), Books()
    user = a_user(http, served, record, books)
    await user.sign_in()
    user_id = await admin.fetchval("select id from users where device_id = $1", user.handle)
    key = f"gen-{uuid.uuid4()}"
    before = await fingerprint(admin)

    async with operator.transaction():
        await operator.execute("select 1 from user_tokens where user_id = $1 for update", user_id)
        started = time.perf_counter()
        refused = await user.client.once(
            "POST /api/generations",
            "POST",
            "/api/generations",
            headers=user.headers(key),
            json={"prompt": "a lighthouse", "quality": "standard"},
        )
        assert_refused_in_time(refused, time.perf_counter() - started)
        # cancelled, not still queued behind the lock; and nothing written
        assert await admin.fetchval(WAITING_LOCKS) == 0
        assert await fingerprint(admin) == before

    first = await user.spend(key=key)
    again = await user.spend(key=key)
    assert first is not None and first == again
    assert record.problems == []
    assert await check_books(admin, books) == []
    assert await admin.fetchval("select balance from user_tokens where user_id = $1", user_id) == 5 - 1


async def test_a_credit_past_the_statement_timeout_is_503_and_credited_once_on_redelivery(
    short_timeout: None,
    served: Served,
    http: httpx.AsyncClient,
    admin: asyncpg.Connection,
    operator: asyncpg.Connection,
) -> None:
    record, books = Record(), Books()
    user = a_user(http, served, record, books)
    await user.sign_in()
    created = await user.create_payment("tokens_50")
    assert created is not None
    payment_id, provider_id = created
    before = await fingerprint(admin)

    async with operator.transaction():
        await operator.execute("select 1 from payments where id = $1 for update", payment_id)
        # the payer pays; YooKassa's notification meets the locked payment
        started = time.perf_counter()
        notification: dict[str, Any] = await served.fake.succeed(provider_id)
        seconds = time.perf_counter() - started
        assert [d.status_code for d in served.fake.deliveries] == [503]
        assert seconds < 2
        assert await admin.fetchval(WAITING_LOCKS) == 0
        assert await fingerprint(admin) == before

    # YooKassa delivers it again: credited once, and once only
    await deliver(user.client, books, payment_id, notification)
    await deliver(user.client, books, payment_id, notification)
    assert books.credited_outcomes[payment_id] == 1
    books.credits[payment_id] = (user.handle, 50)
    assert record.problems == []
    assert await check_books(admin, books) == []


async def test_a_signup_past_the_statement_timeout_is_503_and_creates_no_one(
    short_timeout: None,
    served: Served,
    http: httpx.AsyncClient,
    admin: asyncpg.Connection,
    operator: asyncpg.Connection,
) -> None:
    """A new device signs up in a transaction (the per-IP advisory lock, then
    the insert): the lock held elsewhere times the first statement out, and
    the transaction leaves nothing behind."""
    record, books = Record(), Books()
    user = a_user(http, served, record, books)
    before = await fingerprint(admin)

    async with operator.transaction():
        await operator.execute(
            "select pg_advisory_xact_lock($1, hashtext('127.0.0.1'))", SIGNUP_LOCK_NAMESPACE
        )
        started = time.perf_counter()
        refused = await user.client.once("GET /api/user", "GET", "/api/user", headers=user.headers())
        assert_refused_in_time(refused, time.perf_counter() - started)
        assert await admin.fetchval(WAITING_LOCKS) == 0
        assert await fingerprint(admin) == before

    await user.sign_in()
    await user.sign_in()
    assert record.problems == []
    assert await admin.fetchval("select count(*) from users where device_id = $1", user.handle) == 1
    assert await check_books(admin, books) == []
