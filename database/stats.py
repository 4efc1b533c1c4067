"""Per-request database totals, and the slow-statement log.

Every statement that goes through sql() or a transaction is counted here:
statements, round trips on the wire, attempts (retries included) and
milliseconds. The request log line and the benchmarks read these totals.
"""

from __future__ import annotations

import contextvars
import logging
import re
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger("dreamlens.database")


@dataclass
class Stats:
    statements: int = 0
    round_trips: int = 0
    attempts: int = 0
    retries: int = 0
    db_ms: float = 0.0

    def as_log_fields(self) -> dict[str, float | int]:
        return {
            "db_statements": self.statements,
            "db_round_trips": self.round_trips,
            "db_retries": self.retries,
            "db_ms": round(self.db_ms, 2),
        }


_current: contextvars.ContextVar[Stats | None] = contextvars.ContextVar("dreamlens_db_stats", default=None)


class collect:
    """Count the database work done inside the block (a request, a test).
    A class rather than @contextmanager: every request opens one."""

    __slots__ = ("_token", "stats")

    def __init__(self) -> None:
        self.stats = Stats()

    def __enter__(self) -> Stats:
        self._token = _current.set(self.stats)
        return self.stats

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


def current() -> Stats | None:
    return _current.get()


def record(query: str, ms: float, round_trips: int, slow_ms: float) -> None:
    stats = _current.get()
    if stats is not None:
        stats.statements += 1
        stats.round_trips += round_trips
        stats.db_ms += ms
    if ms > slow_ms:
        # the statement's name only: parameters may hold prompts or ids
        log.warning("slow statement %s took %.1f ms", statement_name(query), ms)


def record_round_trips(count: int) -> None:
    """BEGIN and COMMIT are round trips too, though not statements we wrote."""
    stats = _current.get()
    if stats is not None:
        stats.round_trips += count


def record_attempt(retry: bool) -> None:
    stats = _current.get()
    if stats is not None:
        stats.attempts += 1
        stats.retries += int(retry)


_NAME = re.compile(r"^\s*--\s*name:\s*(\S+)")


@lru_cache(maxsize=1024)
def statement_name(query: str) -> str:
    """A short, parameter-free label for a statement: its `-- name:` comment or
    its first words."""
    match = _NAME.match(query)
    if match:
        return match.group(1)
    words = " ".join(line.split("--")[0] for line in query.splitlines()).split()
    return " ".join(words)[:60]
