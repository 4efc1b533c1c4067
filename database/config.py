"""Database configuration, read from the environment and validated at first use."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from database.errors import ConfigurationError


@dataclass(frozen=True)
class Settings:
    url: str
    # init and migrations take a direct connection when the main URL is a pooler
    non_pooling_url: str
    statement_cache_size: int
    pool_min_size: int
    pool_max_size: int
    connect_timeout: float
    command_timeout: float
    statement_timeout_ms: int
    client_check_interval_ms: int
    slow_statement_ms: float
    embedded: bool


_settings: Settings | None = None


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from exc


def in_lambda() -> bool:
    return bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))


def embedded_data_dir() -> Path:
    return Path(os.environ.get("DREAMLENS_DATA_DIR", ".dreamlens")).resolve() / "pgdata"


def load() -> Settings:
    url = (os.environ.get("POSTGRES_URL") or os.environ.get("DATABASE_URL") or "").strip()
    embedded = False
    non_pooling = (os.environ.get("POSTGRES_URL_NON_POOLING") or "").strip()
    if not url:
        if non_pooling:
            # the embedded server would serve requests while init and
            # migrations went to that URL: two different databases
            raise ConfigurationError(
                "POSTGRES_URL_NON_POOLING is set but POSTGRES_URL / DATABASE_URL is not: "
                "set the pooled URL too (a direct URL may serve as both), "
                "or unset it to use the embedded PostgreSQL"
            )
        if in_lambda():
            raise ConfigurationError(
                "No database configured: set POSTGRES_URL or DATABASE_URL "
                "(POSTGRES_URL_NON_POOLING for init when the URL is a pooler)"
            )
        from database.embedded import embedded_url

        url = embedded_url(embedded_data_dir())
        embedded = True
    lambda_like = in_lambda()
    statement_cache_size = _int("DB_STATEMENT_CACHE_SIZE", 100)
    settings = Settings(
        url=url,
        non_pooling_url=non_pooling or url,
        statement_cache_size=statement_cache_size,
        # a Lambda serves one request at a time; a local server many
        pool_min_size=_int("DB_POOL_MIN_SIZE", 1),
        pool_max_size=_int("DB_POOL_MAX_SIZE", 1 if lambda_like else 10),
        connect_timeout=_float("DB_CONNECT_TIMEOUT", 5.0),
        command_timeout=_float("DB_COMMAND_TIMEOUT", 15.0),
        # sent as a startup parameter, which a transaction pooler refuses
        # (PgBouncer: "unsupported startup parameter") or drops: with the
        # statement cache off, i.e. behind one, the default is none, and the
        # timeout belongs on the role (README, Configuration)
        statement_timeout_ms=_int("DB_STATEMENT_TIMEOUT_MS", 10_000 if statement_cache_size > 0 else 0),
        # how often a backend running a statement checks that its client is
        # still there: a connection the executor dropped (out of time) must not
        # go on to commit once the lock it waits for is released, after the
        # request has answered 503; a startup parameter too (see above)
        client_check_interval_ms=_int("DB_CLIENT_CHECK_INTERVAL_MS", 1000 if statement_cache_size > 0 else 0),
        slow_statement_ms=_float("DB_SLOW_STATEMENT_MS", 100.0),
        embedded=embedded,
    )
    if settings.pool_max_size < 1 or settings.pool_min_size > settings.pool_max_size:
        raise ConfigurationError("DB_POOL_MIN_SIZE must be <= DB_POOL_MAX_SIZE and both >= 1")
    if settings.statement_cache_size < 0:
        raise ConfigurationError("DB_STATEMENT_CACHE_SIZE must be >= 0")
    return settings


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = load()
    return _settings


def configure(**changes: object) -> Settings:
    """Replace settings (tests, CLI flags); the pool picks them up when rebuilt."""
    global _settings
    _settings = replace(settings(), **changes)  # type: ignore[arg-type]
    return _settings


def reset() -> None:
    """Forget the settings so the next use reads the environment again."""
    global _settings
    _settings = None
