"""The balance cache: 30 s TTL on an injectable clock, explicit invalidation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from database import cache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(cache, "clock", fake)
    cache.clear()
    yield fake
    cache.clear()


def test_cached_within_ttl_and_expired_after(clock: FakeClock) -> None:
    user_id = uuid.uuid4()
    cache.remember_balance(user_id, 42)
    clock.now += 29.9
    assert cache.cached_balance(user_id) == 42
    clock.now += 0.2
    assert cache.cached_balance(user_id) is None


def test_invalidation_drops_only_that_user(clock: FakeClock) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    cache.remember_balance(first, 1)
    cache.remember_balance(second, 2)
    cache.invalidate_balance(first)
    assert cache.cached_balance(first) is None
    assert cache.cached_balance(second) == 2
