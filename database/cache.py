"""The 30-second balance cache: for display only.

No spend, limit or payment decision ever reads it; those are decided inside
the SQL statement that changes the data. Every write to a wallet made by this
process invalidates the user's entry (repositories/tokens.py and the other
repositories that move tokens call `invalidate_balance`). Another process's
writes show up here within the TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from cachetools import TTLCache

BALANCE_TTL_SECONDS = 30.0
BALANCE_CACHE_SIZE = 10_000

# the clock is injectable so tests can expire entries without sleeping
clock: Callable[[], float] = time.monotonic


def _now() -> float:
    return clock()


_balances: TTLCache[UUID, Any] = TTLCache(maxsize=BALANCE_CACHE_SIZE, ttl=BALANCE_TTL_SECONDS, timer=_now)


def cached_balance(user_id: UUID) -> Any | None:
    return _balances.get(user_id)


def remember_balance(user_id: UUID, balance: Any) -> None:
    _balances[user_id] = balance


def invalidate_balance(user_id: UUID) -> None:
    _balances.pop(user_id, None)


def clear() -> None:
    _balances.clear()
