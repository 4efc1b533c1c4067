"""What the app benchmarks share on top of harness.py: callers with a plan
whose daily limit a benchmark cannot reach, API Gateway v2 events for them,
the request log written as Lambda writes it, and calling a handler.

    users = await seed_callers(connection, 200, balance=1_000_000)  # device users on the bench plan
    event = generation_event(users.identities[0])
    status = call(generations.handler, event)

The daily generation limit: the free plan allows 20 generations a day and
premium 1,000, so a benchmark that spends thousands of times would be
refused with 429 part-way. `grant_bench_plan()` adds a plan `bench` with a
limit of 100,000,000 a day to the bench database and gives the users an
active subscription to it. The spend statement reads the plan through the
subscription exactly as for a paying user, so nothing is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from uuid import UUID

import asyncpg
from harness import SeededUsers, api_gateway_v2_event, lambda_context, seed_users
from harness import reach as harness_reach

BENCH_PLAN = "bench"
BENCH_PLAN_DAILY_LIMIT = 100_000_000
PROMPT = "a lighthouse at dawn, oil on canvas"

BENCH_PLAN_NOTE = (
    f"daily generation limit: bench users subscribe to a plan '{BENCH_PLAN}' "
    f"({BENCH_PLAN_DAILY_LIMIT:,} a day) added to the bench database, read by the spend as for any subscriber"
)

ADD_BENCH_PLAN = """
insert into plans (id, name, daily_generation_limit)
values ($1, 'Bench (no practical limit)', $2)
on conflict (id) do update set daily_generation_limit = excluded.daily_generation_limit
"""

SUBSCRIBE = """
insert into subscriptions (user_id, plan, status, current_period_end)
select id, $2, 'active', now() + interval '30 days'
  from unnest($1::uuid[]) as id
on conflict do nothing
"""


async def grant_bench_plan(connection: asyncpg.Connection, user_ids: Sequence[UUID]) -> None:
    """An active subscription to the bench plan for each user (see the module doc)."""
    await connection.execute(ADD_BENCH_PLAN, BENCH_PLAN, BENCH_PLAN_DAILY_LIMIT)
    await connection.execute(SUBSCRIBE, list(user_ids), BENCH_PLAN)


async def seed_callers(
    connection: asyncpg.Connection, count: int, *, balance: int, prefix: str = "bench"
) -> SeededUsers:
    """`count` device users (identities usable as X-Device-Id) with `balance`
    more tokens than the welcome bonus, on the bench plan."""
    users = await seed_users(connection, count, balance=balance, prefix=prefix, kind="device")
    await grant_bench_plan(connection, users.ids)
    return users


def generation_event(device: str, prompt: str = PROMPT, quality: str = "standard") -> dict[str, Any]:
    """POST /api/generations as API Gateway (HTTP API, payload 2.0) sends it:
    the body as the app's client sends it, with Content-Length."""
    body = json.dumps({"prompt": prompt, "quality": quality})
    return api_gateway_v2_event(
        "POST",
        "/api/generations",
        headers={
            "X-Device-Id": device,
            "Content-Type": "application/json",
            "Content-Length": str(len(body.encode())),
        },
        body=body,
    )


def floor_handler(connection: asyncpg.Connection, users: Mapping[str, Any]) -> Any:
    """The floor under the app: a Mangum + Starlette handler with nothing of
    ours (no middleware, identity, validation, sql() or log line) whose
    endpoint reads the JSON body, sends CREATE_GENERATION on a raw asyncpg
    `connection` (made on the loop Mangum runs on) for the device's user in
    `users` and answers 201 with the same fields."""
    from mangum import Mangum
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from repositories.generations import CREATE_GENERATION

    async def create(request: Request) -> Response:
        body = json.loads(await request.body())
        row = await connection.fetchrow(
            CREATE_GENERATION,
            users[request.headers["x-device-id"]],
            body["prompt"],
            body["quality"],
            str(uuid.uuid4()),
        )
        assert row is not None and row["outcome"] == "created", row
        document = {
            "id": str(row["id"]),
            "balance": row["balance"],
            "created_at": row["created_at"].isoformat(),
        }
        return Response(json.dumps(document), status_code=201, media_type="application/json")

    app = Starlette(routes=[Route("/api/generations", create, methods=["POST"])])
    return Mangum(app, lifespan="off")


def get_event(path: str, headers: dict[str, str], query: dict[str, str] | None = None) -> dict[str, Any]:
    return api_gateway_v2_event("GET", path, headers=headers, query=query)


def call(handler: Any, event: dict[str, Any], expect: int | tuple[int, ...] = (200, 201)) -> dict[str, Any]:
    """One invocation, as the Lambda runtime makes it; the response, its status checked."""
    response: dict[str, Any] = handler(event, lambda_context())
    check_status(event, response, expect)
    return response


def check_status(event: dict[str, Any], response: dict[str, Any], expect: int | tuple[int, ...]) -> None:
    """AssertionError unless the response's status is (one of) `expect`."""
    wanted = (expect,) if isinstance(expect, int) else expect
    if response["statusCode"] not in wanted:
        raise AssertionError(f"{event['rawPath']}: {response['statusCode']} {response.get('body')}")


class RequestLines:
    """A stream for the request lines (functions/logging.py's request_lines),
    kept parsed; `.last()` is the newest."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, text: str) -> int:
        self.lines += [json.loads(line) for line in text.splitlines() if line]
        return len(text)

    def flush(self) -> None:
        pass

    def last(self) -> dict[str, Any]:
        return self.lines[-1]


def write_logs_like_lambda() -> None:
    """Format and write the log lines the app emits as they are in Lambda,
    to /dev/null, so their cost is in the figures and the output stays
    readable: the request and metric lines bare, straight to the stream
    (functions/metrics.py's JsonLines, as inside Lambda), anything else
    through a root handler like the runtime's, left at WARNING (its default:
    Mangum's per-request INFO line stays off)."""
    from functions import logging as request_logging
    from functions import metrics

    sink = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    request_logging.request_lines.stream = sink
    metrics.metric_lines.stream = sink
    root = logging.getLogger()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("[%(levelname)s]\t%(asctime)s\t%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


# ------------------------------------------------------------------- figures

FIGURES_ENV = "BENCH_FIGURES_FILE"


@dataclass
class Figure:
    script: str
    label: str
    value: str
    reach: str  # "≤ 1.5", "" when the figure is informational
    met: bool | None


@dataclass
class Figures:
    """The figures a script prints, kept for bench/run_all.py's markdown:
    each `reach()` prints `label: value (reach ≤ target) MET` (harness.reach)
    and records it; `note()` prints and records a figure without a reach.
    `save()` appends them as JSON lines to $BENCH_FIGURES_FILE when set."""

    script: str
    rows: list[Figure] = field(default_factory=list)

    def reach(
        self,
        label: str,
        value: float,
        target: float,
        better: Literal["lower", "higher"] = "lower",
        unit: str = "",
        digits: int = 2,
        detail: str = "",
    ) -> bool:
        """`detail`, when given, follows the value in the markdown only (the
        script prints it its own way)."""
        met = harness_reach(label, value, target, better=better, unit=unit, digits=digits)
        sign = "≤" if better == "lower" else "≥"
        shown, wanted = f"{value:.{digits}f}{unit}", f"{sign} {target:g}{unit}"
        if detail:
            shown += f" ({detail})"
        self.rows.append(Figure(self.script, label, shown, wanted, met))
        return met

    def note(self, label: str, value: str) -> None:
        print(f"{label}: {value}")
        self.rows.append(Figure(self.script, label, value, "", None))

    def save(self) -> None:
        path = os.environ.get(FIGURES_ENV)
        if not path:
            return
        with open(path, "a", encoding="utf-8") as file:
            for row in self.rows:
                file.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")


def load_line() -> str:
    """The machine's load right now: figures from a busy machine say so."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"
