"""GET /api/health through the Lambda handler: the database reachable, down,
and back again; warm invocations on one pool."""

from __future__ import annotations

import json
import logging

import pytest

from database import config, pool
from database.executor import MAX_ATTEMPTS
from functions.health import handler
from tests import db, pgbouncer
from tests.functions.lambda_events import EVENT_BUILDERS, invoke

VERSIONS = sorted(EVENT_BUILDERS)

# nothing listens on port 1: the connection is refused at once
UNREACHABLE = "postgresql://dreamlens@127.0.0.1:1/dreamlens"


@pytest.mark.parametrize("version", VERSIONS)
async def test_healthy(version: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    response = await invoke(handler, EVENT_BUILDERS[version]("GET", "/api/health"))
    assert response.status == 200
    assert response.body == {"status": "ok", "database": "ok"}
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dreamlens.request"]
    assert (line["route"], line["status"], line["db_statements"]) == ("/api/health", 200, 1)


@pytest.mark.parametrize("version", VERSIONS)
async def test_database_down_is_503_and_back_without_a_restart(version: str, schema: str) -> None:
    config.configure(url=UNREACHABLE)
    down = await invoke(handler, EVENT_BUILDERS[version]("GET", "/api/health"))
    assert down.status == 503
    assert down.body == {
        "status": "degraded",
        "database": "unavailable",
        "error": "unavailable",
        "message": "Database unavailable",
    }
    assert int(down.headers["retry-after"]) >= 1

    config.configure(url=schema)  # the database is back
    up = await invoke(handler, EVENT_BUILDERS[version]("GET", "/api/health"))
    assert up.status == 200
    assert up.body == {"status": "ok", "database": "ok"}


async def test_a_database_that_refuses_us_is_503_and_logged(
    schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a transient fault (the database does not exist), so sql() does not
    translate it: health still answers 503, never 500, and logs the cause.

    Behind PgBouncer the pooler reports the server's refusal as an error of its
    own, 08P01 like its transient ones ("server login has been failing, try
    again later"), so sql() retries it and answers DatabaseUnavailable: 503
    all the same, the cause in the pooler's log."""
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    config.configure(url=db.with_database(schema, "no_such_database"))
    response = await invoke(handler, EVENT_BUILDERS["v2"]("GET", "/api/health"))
    assert response.status == 503
    assert response.body["database"] == "unavailable"
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dreamlens.request"]
    if pgbouncer.ENABLED:
        assert line["db_retries"] == MAX_ATTEMPTS - 1
    else:
        assert line["db_retries"] == 0
        assert any(r.name == "dreamlens.health" and r.exc_info for r in caplog.records)


async def test_warm_invocations_reuse_one_pool() -> None:
    before = pool.connections_opened
    for _ in range(50):
        response = await invoke(handler, EVENT_BUILDERS["v2"]("GET", "/api/health"))
        assert response.status == 200
    assert pool.connections_opened - before <= 1


@pytest.mark.parametrize("version", VERSIONS)
async def test_health_takes_no_other_method(version: str) -> None:
    response = await invoke(handler, EVENT_BUILDERS[version]("POST", "/api/health"))
    assert response.status == 405
    assert response.body["error"] == "invalid_request"
