"""A database that stops answering, seen from a Lambda with little time left.

A function is stopped at its timeout (15 s, serverless.yml); API Gateway
then answers for it, without our body or Retry-After, and the client learns
nothing. So a handler must answer 503 with Retry-After before that, however
the database fails: a connect that is never answered (a blackholed address,
a failover in progress), or a warm connection gone half-open (a statement
sent, no answer ever coming back).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database import DatabaseUnavailable, Transaction, config, pool, sql, stats, time_budget
from database.executor import run_in_transaction
from database.migrations import SCHEMA_LOCK_KEY
from functions import app, identity, tokens
from repositories import generations
from tests import db
from tests.functions import lambda_events
from tests.functions.lambda_events import EVENT_BUILDERS, Invocation, LambdaContext, LambdaRuntime, invoke
from tests.reliability.proxy import faulty_proxy

REMAINING_MS = 4_000


class ShortOfTime(LambdaContext):
    """An invocation with 4 s left, less than one default connect timeout (5 s)."""

    def get_remaining_time_in_millis(self) -> int:
        return REMAINING_MS


@pytest.fixture(autouse=True)
def roomy_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer is due within the database budget, the time left less the
    reserve for answering: with 2.5 s of reserve (1 s deployed) the budget is
    1.5 s, so a slow machine has 2.5 s of slack before the 4 s are up, and a
    budget that were not applied still fails (it waited the 5 s connect)."""
    monkeypatch.setattr(app, "RESPONSE_RESERVE_SECONDS", 2.5)


@pytest.fixture
async def lambda_runtime() -> AsyncIterator[LambdaRuntime]:
    async with lambda_events.warm_runtime() as runtime:
        yield runtime


async def balance_of(device: str, context: LambdaContext | None = None) -> tuple[Invocation, float]:
    event = EVENT_BUILDERS["v2"]("GET", "/api/tokens", headers={"X-Device-Id": device})
    started = time.perf_counter()
    answer = await invoke(tokens.handler, event, context)
    return answer, time.perf_counter() - started


def assert_answered_in_time(answer: Invocation, seconds: float) -> None:
    assert (answer.status, answer.body["error"]) == (503, "unavailable")
    assert int(answer.headers["retry-after"]) >= 1
    assert seconds < REMAINING_MS / 1000


async def test_a_connect_never_answered_is_503_before_the_lambda_is_stopped(
    lambda_runtime: LambdaRuntime,
) -> None:
    """Bug: sql() retried a connect that timed out (DB_CONNECT_TIMEOUT, 5 s)
    three times whatever the invocation had left: 15.4 s against a database
    that accepts and never answers, past the functions' 15 s timeout, so
    Lambda stopped every such request before it could answer 503."""
    held: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    url = f"postgresql://postgres@127.0.0.1:{silent.sockets[0].getsockname()[1]}/dreamlens"
    try:
        await pool.close_pool()
        config.configure(url=url, non_pooling_url=url)
        answer, seconds = await balance_of("device-silent-db-01", ShortOfTime())
        assert_answered_in_time(answer, seconds)
    finally:
        silent.close()
        for writer in held:
            writer.close()


async def test_a_warm_connection_gone_half_open_is_503_before_the_lambda_is_stopped(
    lambda_runtime: LambdaRuntime, direct_url: str
) -> None:
    """Bug: a statement on a pooled connection that no longer answers waited
    for asyncpg's command timeout (DB_COMMAND_TIMEOUT, 15 s) and then was
    retried: Lambda stopped the request long before."""
    async with faulty_proxy(direct_url, close_delay=0.0) as proxy:
        await pool.close_pool()
        config.configure(url=proxy.url, non_pooling_url=proxy.url, pool_min_size=1, pool_max_size=1)
        warm, _ = await balance_of("device-half-open-1")
        assert warm.status == 200
        identity.forget_all()  # the next request must reach the database

        proxy.freeze()
        answer, seconds = await balance_of("device-half-open-1", ShortOfTime())
        assert_answered_in_time(answer, seconds)

        # the network comes back: the same warm process answers again
        proxy.thaw()
        again, _ = await balance_of("device-half-open-1")
        assert again.status == 200
        await lambda_runtime.close_pool()


async def test_a_transaction_on_a_half_open_connection_gives_up_within_its_budget(direct_url: str) -> None:
    """Bug (the same, for transactions): BEGIN and COMMIT went out with no
    bound but asyncpg's command timeout, so a unit of work on a half-open
    connection waited 15 s before its first statement could even start."""

    async def sign_up(tx: Transaction) -> int:
        await tx.execute("insert into users (clerk_id) values ('user_half_open_tx')")
        count: int = await tx.fetchval("select count(*) from users")
        return count

    async with faulty_proxy(direct_url, close_delay=0.0) as proxy:
        await pool.close_pool()
        config.configure(url=proxy.url, non_pooling_url=proxy.url, pool_min_size=1, pool_max_size=1)
        try:
            assert await sql.fetchval("select 1") == 1  # a warm connection
            proxy.freeze()
            started = time.perf_counter()
            with pytest.raises(DatabaseUnavailable), time_budget(1.5):
                await run_in_transaction(sign_up)
            # the budget's 1.5 s, not the 15 s command timeout it once waited
            assert time.perf_counter() - started < 5
            proxy.thaw()
            with time_budget(5.0):
                assert await run_in_transaction(sign_up) == 1
        finally:
            await pool.close_pool()


async def test_no_attempt_starts_once_the_budget_is_spent() -> None:
    with stats.collect() as counted, pytest.raises(DatabaseUnavailable), time_budget(0):
        await sql.fetchval("select 1")
    assert (counted.attempts, counted.statements) == (1, 0)


async def test_a_spend_given_up_while_waiting_for_a_lock_never_commits_afterwards(
    admin: asyncpg.Connection, direct_url: str
) -> None:
    """Bug: a spend waiting for a wallet lock past its budget was answered
    503, and its connection dropped, but the server went on waiting: a
    backend blocked on a lock does not read its socket. Once the lock was
    released it spent and committed; a client retrying the 503 without an
    Idempotency-Key then spent again. The backend now checks for its client
    (client_connection_check_interval) and gives up with it."""
    user_id = await db.insert_user(admin, device_id="device-given-up-01")
    # a statement timeout longer than the wait below, so that only the check
    # for the client can end the backend's wait
    await pool.close_pool()
    config.configure(statement_timeout_ms=60_000)
    operator = await asyncpg.connect(direct_url)
    waiting = (
        "select count(*) from pg_stat_activity"
        " where application_name = 'dreamlens' and wait_event_type = 'Lock'"
    )
    try:
        async with operator.transaction():
            await operator.execute("select 1 from user_tokens where user_id = $1 for update", user_id)
            with pytest.raises(DatabaseUnavailable), time_budget(0.5):
                await generations.create_generation(user_id, "a fox", "standard", "given-up")
            # the dropped connection's backend finds its client gone and stops waiting
            try:
                async with asyncio.timeout(10):
                    while await admin.fetchval(waiting):
                        await asyncio.sleep(0.05)
            except TimeoutError:
                pytest.fail("the backend of the dropped connection still waits for the wallet")
    finally:
        await operator.close()
        await pool.close_pool()
    assert await admin.fetchval("select count(*) from generations") == 0
    assert await db.balance(admin, user_id) == 5
    assert await db.audit_problems(admin) == []


# ---------------------------------------------- a warm connection that dropped


async def test_reconnect_after_a_dropped_connection_is_bounded_by_the_budget(
    admin: asyncpg.Connection, direct_url: str
) -> None:
    """The Lambda pool (OneConnection, DB_POOL_MAX_SIZE=1) lost its connection
    (backend terminated: a restart, a failover, an idle timeout), and the
    database's address now accepts but never answers (failover in progress).
    The next statement reconnects with the full DB_CONNECT_TIMEOUT (5 s),
    not the request's budget: OneConnection.get_idle_size() reported the
    closed connection as idle, so _Pooled passed no timeout to acquire()."""
    async with faulty_proxy(direct_url, close_delay=0.0) as proxy:
        await pool.close_pool()
        config.configure(url=proxy.url, non_pooling_url=proxy.url, pool_min_size=1, pool_max_size=1)
        try:
            pid = await sql.fetchval("select pg_backend_pid()")
            assert await admin.fetchval("select pg_terminate_backend($1)", pid)
            await proxy.server_closed.wait()
            one = pool._pool
            assert isinstance(one, pool.OneConnection)
            async with asyncio.timeout(5):
                while one._connection is not None and not one._connection.is_closed():
                    await asyncio.sleep(0.01)
            proxy.freeze()  # new connections accepted, never greeted

            started = time.perf_counter()
            with pytest.raises(DatabaseUnavailable), time_budget(1.0):
                await sql.fetchval("select 1")
            seconds = time.perf_counter() - started
            assert seconds < 2.0, f"a 1 s budget took {seconds:.1f} s (the 5 s connect timeout)"
        finally:
            proxy.thaw()
            await pool.close_pool()


async def test_a_warm_lambda_whose_connection_dropped_answers_503_before_it_is_stopped(
    lambda_runtime: LambdaRuntime, admin: asyncpg.Connection, direct_url: str
) -> None:
    """The same through the handler: a warm Lambda (one connection), the
    database restarted/failed over and not answering yet; with 4 s left the
    request must be a 503, not a Lambda stopped at its timeout."""
    async with faulty_proxy(direct_url, close_delay=0.0) as proxy:
        await pool.close_pool()
        config.configure(url=proxy.url, non_pooling_url=proxy.url, pool_min_size=1, pool_max_size=1)
        warm, _ = await balance_of("device-dropped-then-silent")
        assert warm.status == 200
        identity.forget_all()  # the next request must reach the database
        await admin.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'dreamlens'"
        )
        await proxy.server_closed.wait()
        proxy.freeze()

        answer, seconds = await balance_of("device-dropped-then-silent", ShortOfTime())
        proxy.thaw()
        await lambda_runtime.close_pool()
        assert (answer.status, answer.body.get("error")) == (503, "unavailable")
        assert seconds < REMAINING_MS / 1000, f"answered after {seconds:.1f} s of the 4 s left"


# ---------------------------------------------- a schema another Lambda applies


@pytest.fixture
async def schema_being_applied(fresh_database: str) -> AsyncIterator[asyncpg.Connection]:
    """An empty database whose schema another Lambda is applying right now:
    it holds the schema advisory lock in its open transaction."""
    other = await asyncpg.connect(fresh_database)
    transaction = other.transaction()
    await transaction.start()
    await other.execute("select pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
    try:
        yield other
    finally:
        await transaction.rollback()
        await other.close()


async def test_lazy_init_inside_a_request_is_bounded_by_the_budget(
    schema_being_applied: asyncpg.Connection,
) -> None:
    """Many Lambdas cold start on an empty database; one applies the schema.
    The others' first statement fails with "relation does not exist" and
    sql() runs ensure_initialized() -> init_database(), whose direct
    connection and pg_advisory_xact_lock wait knew nothing of the request's
    budget: it waited the statement timeout (10 s), past any Lambda's time."""
    started = time.perf_counter()
    with pytest.raises(DatabaseUnavailable), time_budget(1.0):
        await sql.fetchval("select count(*) from plans")
    seconds = time.perf_counter() - started
    assert seconds < 2.0, f"a 1 s budget took {seconds:.1f} s"


async def test_init_db_inside_a_lambda_answers_503_before_it_is_stopped(
    lambda_runtime: LambdaRuntime, schema_being_applied: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for POST /api/init-db: run_with_retries(init_database) with
    4 s left waited on the schema lock with no bound but the configured
    timeouts."""
    from functions import init_db, settings

    monkeypatch.setenv("DB_INIT_SECRET", "s3cret-for-init")
    settings.reset()
    event = EVENT_BUILDERS["v2"]("POST", "/api/init-db", headers={"X-Init-Secret": "s3cret-for-init"})
    started = time.perf_counter()
    answer = await invoke(init_db.handler, event, ShortOfTime())
    seconds = time.perf_counter() - started
    assert (answer.status, answer.body.get("error")) == (503, "unavailable")
    assert seconds < REMAINING_MS / 1000, f"answered after {seconds:.1f} s of the 4 s left"
