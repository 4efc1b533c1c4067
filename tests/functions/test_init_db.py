"""POST /api/init-db through the Lambda handler: hidden without a secret,
refused with a wrong one, and applying the schema to a fresh database."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from database import migrations as migrations_module
from functions import settings
from functions.init_db import handler
from tests.functions.lambda_events import EVENT_BUILDERS, invoke

VERSIONS = sorted(EVENT_BUILDERS)
SECRET = "s3cr3t-init-value-that-must-never-be-logged"


@pytest.fixture
def init_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DB_INIT_SECRET", SECRET)
    settings.reset()
    return SECRET


@pytest.mark.parametrize("version", VERSIONS)
async def test_without_db_init_secret_the_endpoint_does_not_exist(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DB_INIT_SECRET", raising=False)
    settings.reset()
    event = EVENT_BUILDERS[version]("POST", "/api/init-db", headers={"X-Init-Secret": "anything"})
    response = await invoke(handler, event)
    assert response.status == 404
    assert response.body["error"] == "not_found"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"X-Init-Secret": "wrong"}, id="wrong"),
        pytest.param({"X-Init-Secret": SECRET[:-1]}, id="prefix"),
        pytest.param({"X-Init-Secret": SECRET + "x"}, id="longer"),
        pytest.param({"X-Init-Secret": "ключ"}, id="non_ascii"),
    ],
)
async def test_wrong_or_missing_secret_is_403(
    version: str, headers: dict[str, str], init_secret: str
) -> None:
    response = await invoke(handler, EVENT_BUILDERS[version]("POST", "/api/init-db", headers=headers))
    assert response.status == 403
    assert response.body["error"] == "forbidden"


async def test_secret_in_the_query_string_does_not_count(init_secret: str) -> None:
    event = EVENT_BUILDERS["v2"]("POST", "/api/init-db", query={"secret": SECRET})
    assert (await invoke(handler, event)).status == 403


@pytest.mark.parametrize("version", VERSIONS)
async def test_fresh_database_is_initialized_then_up_to_date(
    version: str, init_secret: str, fresh_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    event = EVENT_BUILDERS[version]("POST", "/api/init-db", headers={"X-Init-Secret": init_secret})
    first = await invoke(handler, event)
    assert first.status == 200
    expected = [m.name for m in migrations_module.known_migrations()]
    assert first.body == {"initialized": True, "applied": expected}

    again = await invoke(handler, event)
    assert again.body == {"initialized": True, "applied": []}

    connection = await asyncpg.connect(fresh_database)
    try:
        assert await connection.fetchval("select count(*) from token_packages") == 4
    finally:
        await connection.close()
    assert SECRET not in caplog.text
    assert all(SECRET not in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_database_newer_than_the_code_is_409_and_unchanged(
    version: str, init_secret: str, fresh_database: str
) -> None:
    event = EVENT_BUILDERS[version]("POST", "/api/init-db", headers={"X-Init-Secret": init_secret})
    assert (await invoke(handler, event)).status == 200
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute(
            "insert into schema_migrations (version, name) values (9999, '9999_future.sql')"
        )
        before = await connection.fetch("select version, name, applied_at from schema_migrations order by 1")
        response = await invoke(handler, event)
        assert response.status == 409
        assert response.body["error"] == "conflict"
        assert "9999" in response.body["message"]
        assert (
            await connection.fetch("select version, name, applied_at from schema_migrations order by 1")
            == before
        )
    finally:
        await connection.close()
