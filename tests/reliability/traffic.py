"""Clients for the fault and load tests, and the check of the books against
what they were told.

A `Client` talks real HTTP to the served API and behaves as the mobile app
should: a 503 is repeated, with the same Idempotency-Key, after the
Retry-After it carries (scaled down, so a test stays short). Every answer is
recorded; anything a client must never see is a problem: a 5xx other than
503, a 503 that is not `unavailable` with Retry-After, no answer within the
client's timeout.

`Books` is what the clients were told: the generations they were answered
201 for, the payments YooKassa reported succeeded and the webhook accepted,
the results the worker reported. `check_books()` compares that with the
ledger, row by row: nothing lost (a success a client saw that the ledger
lacks), nothing applied twice, nothing the clients were never told about.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import httpx

from database import pool
from functions.fake_yookassa import FakeYooKassa
from repositories.audit import Violation, find_violations
from tests import db

log = logging.getLogger("dreamlens.reliability")
# the load test's summary is an INFO line, shown whatever the root level
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)

WEBHOOK = "/api/payments/webhook"
CALLBACK_SECRET = "reliability-" + secrets.token_urlsafe(12)

# a Retry-After of 1 s is waited as 0.1 s: the clients keep its order of
# magnitude without making each test last minutes
RETRY_AFTER_SCALE = 0.1
WELCOME_BONUS = {"device": 5, "clerk": 10}
PACKAGE_TOKENS = {"tokens_50": 50, "tokens_200": 200, "pro_month": 200, "premium_month": 1000}
COST = {"standard": 1, "hd": 2}


class GaveUp(Exception):
    """A client retried past its deadline: recorded as a problem."""


@dataclass(frozen=True)
class Exchange:
    """One HTTP request and its answer (status None: no answer)."""

    route: str
    status: int | None
    seconds: float


@dataclass
class Record:
    exchanges: list[Exchange] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None

    def statuses(self, route: str | None = None) -> Counter[int | None]:
        return Counter(e.status for e in self.exchanges if route is None or e.route == route)

    def summary(self, title: str) -> str:
        """Throughput and latency percentiles, overall and by route."""
        ended = self.ended or time.perf_counter()
        elapsed = max(ended - self.started, 1e-9)
        lines = [
            f"{title}: {len(self.exchanges)} requests in {elapsed:.1f} s = "
            f"{len(self.exchanges) / elapsed:.0f} req/s; {_percentiles(self.exchanges)}; "
            f"statuses {dict(sorted(self.statuses().items(), key=str))}"
        ]
        for route in sorted({e.route for e in self.exchanges}):
            chosen = [e for e in self.exchanges if e.route == route]
            lines.append(f"  {route:<34} {len(chosen):>6}  {_percentiles(chosen)}")
        return "\n".join(lines)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def _percentiles(exchanges: list[Exchange]) -> str:
    seconds = [e.seconds for e in exchanges]
    if not seconds:
        return "no requests"
    return (
        f"p50 {_percentile(seconds, 0.5) * 1000:.1f} ms, p99 {_percentile(seconds, 0.99) * 1000:.1f} ms, "
        f"max {max(seconds) * 1000:.1f} ms, mean {statistics.fmean(seconds) * 1000:.1f} ms"
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() and int(value) >= 1 else None


class Client:
    """One well-behaved client of the API (see the module docstring)."""

    def __init__(self, http: httpx.AsyncClient, record: Record, *, patience: float = 60.0) -> None:
        self.http = http
        self.record = record
        # how long a client keeps repeating one request before giving up
        self.patience = patience

    def _check_503(self, route: str, response: httpx.Response) -> None:
        try:
            code = response.json().get("error")
        except ValueError:
            code = None
        if code != "unavailable" or _retry_after(response) is None:
            self.record.problems.append(
                f"{route}: 503 without `unavailable` and Retry-After: "
                f"{response.headers.get('retry-after')!r} {response.text[:200]}"
            )

    async def once(
        self, route: str, method: str, path: str, *, headers: dict[str, str] | None = None, json: Any = None
    ) -> httpx.Response | None:
        """One request; None (and a problem) when no answer came in time."""
        started = time.perf_counter()
        try:
            response = await self.http.request(method, path, headers=headers, json=json)
        except httpx.TimeoutException as exc:
            seconds = time.perf_counter() - started
            self.record.exchanges.append(Exchange(route, None, seconds))
            self.record.problems.append(f"{route}: no answer within {seconds:.1f} s ({type(exc).__name__})")
            return None
        except httpx.TransportError as exc:
            self.record.exchanges.append(Exchange(route, None, time.perf_counter() - started))
            self.record.problems.append(f"{route}: {type(exc).__name__} {exc}")
            return None
        self.record.exchanges.append(Exchange(route, response.status_code, time.perf_counter() - started))
        if response.status_code == 503:
            self._check_503(route, response)
        elif response.status_code >= 500:
            self.record.problems.append(f"{route}: {response.status_code} {response.text[:300]}")
        return response

    async def call(
        self,
        route: str,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        json: Any = None,
        expect: Iterable[int] = (200,),
    ) -> httpx.Response:
        """The request, repeated unchanged (same Idempotency-Key) while it is
        answered 503 or not at all; GaveUp past the client's patience. Any
        answer other than `expect` (and 503) is a problem."""
        expected = frozenset(expect)
        deadline = time.perf_counter() + self.patience
        while True:
            response = await self.once(route, method, path, headers=headers, json=json)
            if response is not None and response.status_code != 503:
                if response.status_code not in expected:
                    self.record.problems.append(
                        f"{route}: unexpected {response.status_code} {response.text[:300]}"
                    )
                return response
            if time.perf_counter() > deadline:
                self.record.problems.append(f"{route}: still unavailable after {self.patience:.0f} s")
                raise GaveUp(route)
            wait = _retry_after(response) if response is not None else None
            await asyncio.sleep((wait or 1.0) * RETRY_AFTER_SCALE * random.uniform(0.8, 1.2))


# ------------------------------------------------------------------ books


@dataclass
class Books:
    """What the clients were told, to be found in the ledger exactly once."""

    # user handle (device id or Clerk id) -> "device" | "clerk"
    users: dict[str, str] = field(default_factory=dict)
    # (user, Idempotency-Key) -> (generation id, cost) answered 201
    spends: dict[tuple[str, str], tuple[UUID, int]] = field(default_factory=dict)
    # (user, Idempotency-Key) refused with 402/429: nothing applied
    declined: set[tuple[str, str]] = field(default_factory=set)
    # payment id -> (user, tokens) that YooKassa reported succeeded and the
    # webhook accepted (200)
    credits: dict[UUID, tuple[str, int]] = field(default_factory=dict)
    # payment id -> webhook deliveries answered `credited`
    credited_outcomes: Counter[UUID] = field(default_factory=Counter)
    # generation id -> the result the worker was answered with
    results: dict[UUID, str] = field(default_factory=dict)

    def expected_ledger(self) -> dict[str, Counter[tuple[str, int]]]:
        """(idempotency key, amount) rows expected per user."""
        expected: dict[str, Counter[tuple[str, int]]] = {
            user: Counter({("welcome_bonus", WELCOME_BONUS[kind]): 1}) for user, kind in self.users.items()
        }
        # one spend per generation, however many answers (repeats of its key) named it
        spent = {generation_id: (user, cost) for (user, _), (generation_id, cost) in self.spends.items()}
        for generation_id, (user, cost) in spent.items():
            rows = expected.setdefault(user, Counter())
            rows[(f"generation:{generation_id}", -cost)] = 1
            if self.results.get(generation_id) == "failed":
                rows[(f"refund:{generation_id}", cost)] = 1
        for payment_id, (user, tokens) in self.credits.items():
            expected.setdefault(user, Counter())[(f"payment:{payment_id}", tokens)] = 1
        return {user: +rows for user, rows in expected.items()}


LEDGER_BY_USER = """
select coalesce(u.device_id, u.clerk_id) as handle, t.idempotency_key, t.amount
  from token_transactions t
  join users u on u.id = t.user_id
"""

GENERATIONS_BY_KEY = """
select coalesce(u.device_id, u.clerk_id) as handle, g.idempotency_key, g.id
  from generations g
  join users u on u.id = g.user_id
"""


async def check_books(
    admin: asyncpg.Connection,
    books: Books,
    audit: Callable[[], Awaitable[list[Violation]]] = find_violations,
) -> list[str]:
    """Every difference between the ledger and what the clients were told,
    and every broken ledger invariant (both audits; `audit` runs the app's
    on the loop that owns the pool)."""
    problems: list[str] = []
    actual: dict[str, Counter[tuple[str, int]]] = {}
    for row in await admin.fetch(LEDGER_BY_USER):
        actual.setdefault(row["handle"], Counter())[(row["idempotency_key"], row["amount"])] += 1
    expected = books.expected_ledger()
    for user in sorted(set(actual) | set(expected)):
        have, want = actual.get(user, Counter()), expected.get(user, Counter())
        lost = want - have
        extra = have - want
        if lost:
            problems.append(f"{user}: ledger lacks what clients were told: {sorted(lost)}")
        if extra:
            problems.append(f"{user}: ledger has rows no client was told of, or twice: {sorted(extra)}")

    generations: dict[tuple[str, str], list[UUID]] = {}
    for row in await admin.fetch(GENERATIONS_BY_KEY):
        generations.setdefault((row["handle"], row["idempotency_key"]), []).append(row["id"])
    for key, (generation_id, _) in books.spends.items():
        if generations.get(key) != [generation_id]:
            problems.append(f"{key}: answered {generation_id}, stored {generations.get(key)}")
    for key in books.declined:
        if key in generations:
            problems.append(f"{key}: refused, yet stored {generations[key]}")
    for payment_id, count in books.credited_outcomes.items():
        if count > 1:
            problems.append(f"payment {payment_id}: {count} deliveries answered `credited`")

    problems += [f"audit: {v.user_id} {v.problem} {v.detail}" for v in await audit()]
    problems += [f"independent audit: {p}" for p in await db.audit_problems(admin)]
    return problems


# ------------------------------------------------------------------ actors


@dataclass
class User:
    """A caller of the API: a device, or a Clerk user with a session token."""

    handle: str
    kind: str  # "device" | "clerk"
    auth: dict[str, str]
    client: Client
    books: Books
    fake: FakeYooKassa
    # Idempotency-Keys of this user's answered spends, for repeats
    keys: list[str] = field(default_factory=list)
    # YooKassa's redeliveries come from its own address (the webhook's
    # trusted network), not the user's; None: the user's client
    provider: Client | None = None

    def headers(self, key: str | None = None) -> dict[str, str]:
        headers = dict(self.auth)
        if key is not None:
            headers["Idempotency-Key"] = key
        return headers

    async def sign_in(self) -> None:
        response = await self.client.call("GET /api/user", "GET", "/api/user", headers=self.headers())
        if response.status_code == 200:
            self.books.users[self.handle] = self.kind

    async def spend(
        self, quality: str = "standard", key: str | None = None, declinable: bool = False
    ) -> UUID | None:
        """POST /api/generations with `key` (a new one by default); the id answered."""
        key = key or f"gen-{uuid.uuid4()}"
        expect = (201, 402, 429) if declinable else (201,)
        response = await self.client.call(
            "POST /api/generations",
            "POST",
            "/api/generations",
            headers=self.headers(key),
            json={"prompt": f"a lighthouse, take {key[-6:]}", "quality": quality},
            expect=expect,
        )
        if response.status_code in (402, 429):
            self.books.declined.add((self.handle, key))
            return None
        if response.status_code != 201:
            return None
        body = response.json()
        generation_id = UUID(body["id"])
        first = self.books.spends.setdefault((self.handle, key), (generation_id, body["cost"]))
        if first[0] != generation_id:
            self.client.record.problems.append(
                f"{self.handle} key {key}: answered {generation_id}, earlier {first[0]}"
            )
        if key not in self.keys:
            self.keys.append(key)
        return generation_id

    async def repeat_spend(self, quality: str = "standard") -> None:
        """A spend repeated with a key already answered: the same generation."""
        if self.keys:
            key = random.choice(self.keys)
            (_, cost) = self.books.spends[(self.handle, key)]
            await self.spend("hd" if cost == COST["hd"] else "standard", key=key)

    async def create_payment(self, package_id: str) -> tuple[UUID, str] | None:
        """POST /api/payments (repeated while 503): our payment id and
        YooKassa's, or None when it was refused."""
        response = await self.client.call(
            "POST /api/payments",
            "POST",
            "/api/payments",
            headers=self.headers(f"buy-{uuid.uuid4()}"),
            json={"package_id": package_id},
            expect=(201,),
        )
        if response.status_code != 201:
            return None
        created = response.json()
        return UUID(created["id"]), created["confirmation_url"].rsplit("/", 1)[1]

    async def buy(self, package_id: str) -> None:
        """Create a payment, pay it at YooKassa, and see it delivered: the fake
        POSTs payment.succeeded to the webhook; like YooKassa, it is delivered
        again until the webhook answers 200."""
        created = await self.create_payment(package_id)
        if created is None:
            return
        payment_id, provider_id = created
        notification = await self.fake.succeed(provider_id)
        await deliver(self.provider or self.client, self.books, payment_id, notification)
        shown = await self.client.call(
            "GET /api/payments/{id}", "GET", f"/api/payments/{payment_id}", headers=self.headers()
        )
        if shown.status_code == 200 and shown.json()["status"] == "succeeded":
            self.books.credits[payment_id] = (self.handle, PACKAGE_TOKENS[package_id])
        else:
            problem = f"payment {payment_id}: {shown.status_code} {shown.text[:200]}"
            self.client.record.problems.append(problem)

    async def read_around(self) -> None:
        """What the app shows: the account, the balance, the ledger's pages."""
        await self.client.call("GET /api/tokens", "GET", "/api/tokens", headers=self.headers())
        path = "/api/tokens/transactions?limit=5"
        for _ in range(3):
            page = await self.client.call("GET /api/tokens/transactions", "GET", path, headers=self.headers())
            cursor = page.json().get("next_before") if page.status_code == 200 else None
            if cursor is None:
                break
            path = f"/api/tokens/transactions?limit=5&before={cursor}"
        await self.client.call(
            "GET /api/generations", "GET", "/api/generations?limit=10", headers=self.headers()
        )


async def deliver(client: Client, books: Books, payment_id: UUID, notification: dict[str, Any]) -> None:
    """YooKassa delivering a notification again until it hears 200 (the
    fake's own first delivery may have been answered 503)."""
    response = await client.call("POST /api/payments/webhook", "POST", WEBHOOK, json=notification)
    if response.status_code == 200 and response.json().get("outcome") == "credited":
        books.credited_outcomes[payment_id] += 1


def fake_delivery_problems(fake: FakeYooKassa, unanswered_allowed: bool = False) -> list[str]:
    """The fake's own deliveries: each answered, 200 or 503. With
    `unanswered_allowed` (the load test), one the fake stopped waiting for
    after its 10 s is not a problem: YooKassa delivers it again, as the
    users' deliver() does, and the books show it applied once."""
    return [
        f"fake delivery of {d.notification['event']}: {d.status_code} {d.error or ''}"
        for d in fake.deliveries
        if d.status_code not in (200, 503) and not (unanswered_allowed and d.status_code is None)
    ]


class Worker:
    """The generation worker: claims, then reports each result; every fourth
    generation (by id) fails and must be refunded once."""

    def __init__(self, client: Client, books: Books) -> None:
        self.client = client
        self.books = books
        self.headers = {"X-Callback-Secret": CALLBACK_SECRET}

    @staticmethod
    def outcome(generation_id: UUID) -> str:
        return "failed" if generation_id.int % 4 == 0 else "succeeded"

    async def report(self, generation_id: UUID) -> None:
        status = self.outcome(generation_id)
        body: dict[str, Any] = {"status": status}
        if status == "succeeded":
            body["image_key"] = f"images/{generation_id}.png"
        else:
            body["error"] = "the model refused"
        response = await self.client.call(
            "POST /api/generations/{id}/result",
            "POST",
            f"/api/generations/{generation_id}/result",
            headers=self.headers,
            json=body,
        )
        if response.status_code == 200:
            answered = response.json()["status"]
            self.books.results[generation_id] = answered
            if answered != status:
                self.client.record.problems.append(f"result {generation_id}: sent {status}, got {answered}")

    async def claim(self, limit: int = 10) -> list[UUID]:
        response = await self.client.call(
            "POST /api/worker/claim",
            "POST",
            "/api/worker/claim",
            headers=self.headers,
            json={"limit": limit, "lease_seconds": 300},
        )
        if response.status_code != 200:
            return []
        return [UUID(item["id"]) for item in response.json()["items"]]

    async def run(self, done: asyncio.Event, idle_pause: float = 0.05) -> None:
        """Claim and report until `done` is set and the queue is empty."""
        while True:
            claimed = await self.claim()
            for generation_id in claimed:
                await self.report(generation_id)
            if not claimed:
                if done.is_set():
                    return
                await asyncio.sleep(idle_pause)


async def guarded(work: Awaitable[None]) -> None:
    """Run one actor; a client that gave up has recorded its problem."""
    with contextlib.suppress(GaveUp):
        await work


async def run_until(
    actors: list[Callable[[], Awaitable[None]]], record: Record, limit_seconds: float
) -> None:
    """Every actor to its end, all at once, bounded by `limit_seconds`."""
    try:
        async with asyncio.timeout(limit_seconds):
            await asyncio.gather(*(guarded(actor()) for actor in actors))
    except TimeoutError:
        record.problems.append(f"the traffic did not end within {limit_seconds:.0f} s")
    record.ended = time.perf_counter()


# --------------------------------------------------------- money traffic


async def traffic_under_way() -> None:
    """Until the traffic has made the app's pool (its first request does,
    however slowly the machine runs), and half a second more to get going."""
    async with asyncio.timeout(30):
        while pool._pool is None:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)


class MoneyTraffic:
    """Spends, purchases (credited by the webhook) and the worker's claims
    and results, from `users` device users at once, while a fault runs.

    Each user signs in, buys pro_month (200 tokens, a daily limit of 200),
    then spends in rounds (a standard and an hd generation, a repeat of an
    earlier key, a balance read, every fourth round a tokens_50 purchase)
    until the fault has ended and `rounds_after_fault` more rounds are done,
    at most `max_rounds` (150 tokens: never short of tokens or over the
    limit). The worker claims and reports until the users are done and the
    queue is empty. The whole run is bounded by `limit_seconds`.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        fake: FakeYooKassa,
        *,
        users: int = 20,
        max_rounds: int = 50,
        rounds_after_fault: int = 2,
        patience: float = 60.0,
        limit_seconds: float = 100.0,
    ) -> None:
        self.record, self.books = Record(), Books()
        self.max_rounds = max_rounds
        self.rounds_after_fault = rounds_after_fault
        self.limit_seconds = limit_seconds
        self.fault_over = asyncio.Event()
        self.users_done = asyncio.Event()
        run = uuid.uuid4().hex[:8]
        self.users = [
            User(
                handle=f"fault-{run}-{number:04d}",
                kind="device",
                auth={"X-Device-Id": f"fault-{run}-{number:04d}"},
                client=Client(http, self.record, patience=patience),
                books=self.books,
                fake=fake,
            )
            for number in range(users)
        ]
        self.worker = Worker(Client(http, self.record, patience=patience), self.books)

    async def _script(self, user: User) -> None:
        await user.sign_in()
        await user.buy("pro_month")
        after = 0
        for round_number in range(self.max_rounds):
            await user.spend("standard")
            await user.spend("hd")
            await user.repeat_spend()
            if round_number % 4 == 3:
                await user.buy("tokens_50")
            await user.client.call("GET /api/tokens", "GET", "/api/tokens", headers=user.headers())
            if self.fault_over.is_set():
                after += 1
                if after >= self.rounds_after_fault:
                    return
            await asyncio.sleep(random.uniform(0.01, 0.05))

    async def _everyone(self) -> None:
        try:
            await asyncio.gather(*(guarded(self._script(user)) for user in self.users))
        finally:
            self.users_done.set()

    async def run(self, fault: Callable[[], Awaitable[None]]) -> MoneyTraffic:
        async def the_fault() -> None:
            try:
                await fault()
            finally:
                self.fault_over.set()

        await run_until(
            [self._everyone, lambda: self.worker.run(self.users_done), the_fault],
            self.record,
            self.limit_seconds,
        )
        return self
