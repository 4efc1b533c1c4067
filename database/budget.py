"""How long this request's database work may take.

A Lambda is stopped at its timeout, and API Gateway then answers for it:
no body of ours, no Retry-After. So a request's database work is bounded by
the time the invocation has left (functions/app.py sets it from the Lambda
context), whatever the database does: a connect never answered, a statement
on a connection gone half-open. Inside `time_budget(seconds)` the executor
(database/executor.py) bounds every pool acquire and statement by what is
left, drops a connection whose statement ran out of time, and starts no
retry that could not finish; the request then answers 503 in time.

Outside a budget (the local server, jobs, tests) only the configured
timeouts apply.
"""

from __future__ import annotations

import asyncio
import contextvars

# no retry is started with less than this left: a backoff and an attempt
# would not fit in it
MIN_RETRY_SECONDS = 0.5

# when the current task's database work must be over (the loop's clock)
_ends: contextvars.ContextVar[float | None] = contextvars.ContextVar("database_budget_ends", default=None)


class time_budget:
    """Database work in the block (in this task) ends within `seconds`;
    None: no bound but the configured timeouts. A class rather than
    @contextmanager: every request opens one."""

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        seconds = self._seconds
        ends = None if seconds is None else asyncio.get_running_loop().time() + seconds
        self._token = _ends.set(ends)

    def __exit__(self, *exc_info: object) -> None:
        _ends.reset(self._token)


def time_left() -> float | None:
    """Seconds left in the budget (0 or less: spent); None without one."""
    ends = _ends.get()
    if ends is None:
        return None
    return ends - asyncio.get_running_loop().time()


def bounded(configured: float | None) -> float | None:
    """The timeout for one operation: the configured one, or less when the
    budget has less left. TimeoutError when the budget is spent."""
    left = time_left()
    if left is None:
        return configured
    if left <= 0:
        raise TimeoutError("the request's time for the database is spent")
    return left if configured is None else min(configured, left)


def too_late_to_retry() -> bool:
    left = time_left()
    return left is not None and left < MIN_RETRY_SECONDS
