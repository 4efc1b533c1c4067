"""Database round trips per warm request, endpoint by endpoint.

Every endpoint is called through its Lambda `handler(event, context)` with
an API Gateway HTTP API (v2) event, as a warm repeat caller: the same call
first (identity cached, pool open, statements prepared), then the measured
one. Three counts for the measured request:

- statements and round trips as sql() counted them (the request log line's
  `db_statements` and `db_round_trips`, from database.stats);
- round trips on the wire: the app reaches PostgreSQL through bench's
  DelayProxy at 0 ms, which counts each time the client speaks again after
  the server answered (`turns_to_server`);
- the same again with DB_STATEMENT_CACHE_SIZE=0 (a transaction-mode pooler:
  PgBouncer, RDS Proxy), where every statement is prepared anew and costs 2.

The webhook credits a payment made through POST /api/payments against the
fake YooKassa (functions/fake_yookassa.py, in-process, in its own thread);
its re-read of the payment at YooKassa is HTTP, not a database round trip.

    uv run python bench/round_trips.py
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
from delay_proxy import DelayProxy
from harness import BenchDatabase, api_gateway_v2_event, banner, bench_database, run_sync
from workload import (
    BENCH_PLAN_NOTE,
    Figures,
    RequestLines,
    call,
    generation_event,
    get_event,
    seed_callers,
    write_logs_like_lambda,
)

CALLBACK_SECRET = "bench-callback-secret"  # noqa: S105 (a throwaway value for this run)
TRUSTED_IP = "185.71.76.1/32"  # in YooKassa's published networks
RETURN_URL = "https://app.dreamlens.test/payments/return"


@dataclass
class Count:
    statements: int
    round_trips: int  # as sql() counted them
    wire: int  # round trips through the proxy: the client speaking after the server answered


@dataclass(frozen=True)
class Endpoint:
    name: str
    reach: int | None  # round trips with the statement cache on; None: no reach, shown for information
    why: str = ""


ENDPOINTS = [
    Endpoint("GET /api/tokens (identity and balance cached)", 0),
    Endpoint("GET /api/tokens (balance changed since)", 1),
    Endpoint("GET /api/user", 1),
    Endpoint("POST /api/generations", 1, "aim 1"),
    Endpoint("POST /api/payments/webhook (credit)", 1),
    Endpoint("GET /api/tokens/transactions", 1),
    Endpoint("GET /api/subscription", 1),
    Endpoint("GET /api/generations", 1),
    Endpoint("GET /api/generations/{id}", 1),
    Endpoint("POST /api/worker/claim", 1),
    Endpoint("POST /api/generations/{id}/result (failed: refund)", 1),
    Endpoint("GET /api/packages", 1),
    Endpoint("POST /api/payments", None, "store pending, YooKassa's create, attach: a provider call between"),
    Endpoint("GET /api/payments/{id}", 1),
]
# the reach for POST /api/generations is ≤ 2; the table shows the aim (1) met or not
REACH_OVERRIDE = {"POST /api/generations": 2}


class FakeProvider:
    """The fake YooKassa served by uvicorn on a loop of its own in a thread;
    control calls (`succeed`) run there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.fake: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-yookassa", daemon=True)

    def __enter__(self) -> FakeProvider:
        from functions.fake_yookassa import start_fake_yookassa

        self._thread.start()
        self.fake = self.run(start_fake_yookassa())
        return self

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def __exit__(self, *_: object) -> None:
        self.run(self.fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def configure(self) -> None:
        """Point the functions' YooKassa settings at the fake (as tests/functions/payment_support.py does)."""
        from functions import settings

        os.environ.update(
            YOOKASSA_SHOP_ID=self.fake.shop_id,
            YOOKASSA_SECRET_KEY=self.fake.secret_key,
            YOOKASSA_API_URL=self.fake.api_url,
            YOOKASSA_RETURN_URL=RETURN_URL,
        )
        os.environ.pop("YOOKASSA_TRUSTED_NETWORKS", None)
        settings.reset()


class Meter:
    """Counts one handler call: the request line's figures and the proxy's turns."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        from functions.logging import request_lines

        self.lines = RequestLines()
        request_lines.stream = self.lines  # as Lambda writes them, read back here

        self.body: Any = None  # the measured response's JSON body

    def measure(
        self, handler: Any, event: dict[str, Any], expect: int | tuple[int, ...] = (200, 201)
    ) -> Count:
        before, seen = self.proxy.turns_to_server, len(self.lines.lines)
        response = call(handler, event, expect)
        assert len(self.lines.lines) == seen + 1, "the handler wrote no request line"
        self.body = json.loads(response["body"])
        line = self.lines.last()
        return Count(line["db_statements"], line["db_round_trips"], self.proxy.turns_to_server - before)


@dataclass
class Caller:
    device: str
    user_id: UUID


def worker_event(path: str, body: dict[str, Any]) -> dict[str, Any]:
    return api_gateway_v2_event(
        "POST",
        path,
        headers={"X-Callback-Secret": CALLBACK_SECRET, "Content-Type": "application/json"},
        body=body,
    )


def measure_all(meter: Meter, caller: Caller, provider: FakeProvider) -> dict[str, Count]:
    """Each endpoint once warm-up, once measured; the counts of the measured calls."""
    from functions import generations, payments, subscription, tokens, user, webhook, worker

    who = {"X-Device-Id": caller.device}
    counts: dict[str, Count] = {}

    def twice(name: str, make: Callable[[], tuple[Any, dict[str, Any]]]) -> None:
        handler, event = make()
        call(handler, event)
        handler, event = make()
        counts[name] = meter.measure(handler, event)

    twice("GET /api/user", lambda: (user.handler, get_event("/api/user", who)))
    twice(
        "GET /api/tokens (identity and balance cached)",
        lambda: (tokens.handler, get_event("/api/tokens", who)),
    )
    twice("POST /api/generations", lambda: (generations.handler, generation_event(caller.device)))
    # the spend dropped the cached balance: the next read goes to the database
    counts["GET /api/tokens (balance changed since)"] = meter.measure(
        tokens.handler, get_event("/api/tokens", who)
    )
    twice(
        "GET /api/tokens/transactions", lambda: (tokens.handler, get_event("/api/tokens/transactions", who))
    )
    twice("GET /api/subscription", lambda: (subscription.handler, get_event("/api/subscription", who)))
    twice("GET /api/generations", lambda: (generations.handler, get_event("/api/generations", who)))
    created = json.loads(call(generations.handler, generation_event(caller.device))["body"])
    twice(
        "GET /api/generations/{id}",
        lambda: (generations.handler, get_event(f"/api/generations/{created['id']}", who)),
    )

    # the worker empties the queue, two generations arrive, it claims them one
    # by one and fails both: the refund is inside the result's statement
    def claim(limit: int) -> tuple[Count, list[str]]:
        count = meter.measure(worker.handler, worker_event("/api/worker/claim", {"limit": limit}))
        return count, [item["id"] for item in meter.body["items"]]

    claim(100)
    for _ in range(2):
        call(generations.handler, generation_event(caller.device))
    _, [first] = claim(1)
    counts["POST /api/worker/claim"], [second] = claim(1)
    failed = {"status": "failed", "error": "bench"}
    call(worker.handler, worker_event(f"/api/generations/{first}/result", failed))
    counts["POST /api/generations/{id}/result (failed: refund)"] = meter.measure(
        worker.handler, worker_event(f"/api/generations/{second}/result", failed)
    )
    twice("GET /api/packages", lambda: (payments.handler, get_event("/api/packages", {})))

    # payments: create one; YooKassa says it succeeded and notifies the webhook
    def buy() -> str:
        headers = {**who, "Content-Type": "application/json"}
        event = api_gateway_v2_event(
            "POST", "/api/payments", headers=headers, body={"package_id": "tokens_50"}
        )
        before = set(provider.fake.payments)
        counts["POST /api/payments"] = meter.measure(payments.handler, event, expect=201)
        [provider_id] = set(provider.fake.payments) - before
        return str(provider_id)

    def notify_success(provider_id: str) -> Count:
        notification = provider.run(provider.fake.succeed(provider_id))
        event = api_gateway_v2_event(
            "POST",
            "/api/payments/webhook",
            headers={"Content-Type": "application/json"},
            body=notification,
            source_ip=TRUSTED_IP,
        )
        return meter.measure(webhook.handler, event, expect=200)

    notify_success(buy())  # warm-up: the provider client is made on first use
    counts["POST /api/payments/webhook (credit)"] = notify_success(buy())
    newest = provider.fake.payments[next(reversed(provider.fake.payments))]
    path = f"/api/payments/{newest['metadata']['payment_id']}"
    twice("GET /api/payments/{id}", lambda: (payments.handler, get_event(path, who)))
    return counts


# ----------------------------------------------------------------------- run


async def _seed(url: str) -> Caller:
    connection = await asyncpg.connect(url)
    try:
        users = await seed_callers(connection, 1, balance=1_000)
    finally:
        await connection.close()
    return Caller(users.identities[0], users.ids[0])


@contextmanager
def app_database(url: str, *, statement_cache: bool) -> Iterator[None]:
    """The functions' database layer on `url`, with or without the statement
    cache; the pool is made afresh on the next request."""
    from database import config, pool

    os.environ["DATABASE_URL"] = url
    if statement_cache:
        os.environ.pop("DB_STATEMENT_CACHE_SIZE", None)
    else:
        os.environ["DB_STATEMENT_CACHE_SIZE"] = "0"
    config.reset()
    try:
        yield
    finally:
        asyncio.get_event_loop().run_until_complete(pool.close_pool())
        os.environ.pop("DB_STATEMENT_CACHE_SIZE", None)
        config.reset()


def run(database: BenchDatabase) -> tuple[dict[str, Count], dict[str, Count]]:
    from functions import identity, settings

    os.environ["GENERATION_CALLBACK_SECRET"] = CALLBACK_SECRET
    settings.reset()
    caller = run_sync(lambda: _seed(database.url))
    with DelayProxy(database.upstream, delay_ms=0) as proxy, FakeProvider() as provider:
        provider.configure()
        meter = Meter(proxy)
        proxied = database.url_for("127.0.0.1", proxy.port)
        with app_database(proxied, statement_cache=True):
            cached = measure_all(meter, caller, provider)
        identity.forget_all()
        with app_database(proxied, statement_cache=False):
            uncached = measure_all(meter, caller, provider)
        from functions import yookassa

        asyncio.get_event_loop().run_until_complete(yookassa.close_default_client())
    return cached, uncached


def audit(database: BenchDatabase) -> list[tuple[str, str]]:
    from harness import audit_problems

    async def check() -> list[tuple[str, str]]:
        connection = await asyncpg.connect(database.url)
        try:
            return await audit_problems(connection)
        finally:
            await connection.close()

    return run_sync(check)


def main() -> None:
    write_logs_like_lambda()
    figures = Figures("round_trips")
    with bench_database() as database:
        banner("database round trips per warm request, per endpoint", database)
        print(BENCH_PLAN_NOTE)
        cached, uncached = run(database)
        problems = audit(database)
    width = max(len(endpoint.name) for endpoint in ENDPOINTS)
    print()
    print(f"{'endpoint':<{width}}  statements  round trips  on the wire  cache off: sql() (wire)  reach")
    for endpoint in ENDPOINTS:
        on, off = cached[endpoint.name], uncached[endpoint.name]
        reach = "-" if endpoint.reach is None else f"≤ {REACH_OVERRIDE.get(endpoint.name, endpoint.reach)}"
        print(
            f"{endpoint.name:<{width}}  {on.statements:>10}  {on.round_trips:>11}  {on.wire:>11}  "
            f"{off.round_trips:>16} ({off.wire})  {reach} {endpoint.why}"
        )
    print()
    for endpoint in ENDPOINTS:
        on, off = cached[endpoint.name], uncached[endpoint.name]
        if on.wire != on.round_trips or off.wire != off.round_trips:
            counted, wire = f"{on.round_trips}/{off.round_trips}", f"{on.wire}/{off.wire}"
            print(f"note: {endpoint.name}: sql() counted {counted} (cache on/off), the wire carried {wire}")
        detail = (
            f"{on.statements} statement{'s' if on.statements != 1 else ''}, on the wire {on.wire}; "
            f"cache off {off.round_trips}, on the wire {off.wire}"
        )
        if endpoint.reach is None:
            figures.note(f"{endpoint.name} round trips", f"{on.round_trips} ({detail}; {endpoint.why})")
            continue
        target = REACH_OVERRIDE.get(endpoint.name, endpoint.reach)
        if target != endpoint.reach:
            detail += f"; aim {endpoint.reach}: {'met' if on.round_trips <= endpoint.reach else 'not met'}"
        figures.reach(f"{endpoint.name} round trips", on.round_trips, target, digits=0, detail=detail)
    figures.note("audit after the run", "clean" if not problems else f"{len(problems)} problems: {problems}")
    figures.save()
    assert not problems, problems


if __name__ == "__main__":
    main()
