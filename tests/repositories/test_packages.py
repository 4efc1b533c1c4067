"""repositories/packages.py: the seeded catalogue, active packages only."""

from __future__ import annotations

import asyncpg
import pytest

from database import NotFound
from repositories.packages import Package, get_package, list_packages


async def test_lists_active_packages_in_sort_order() -> None:
    packages = await list_packages()
    assert [p.id for p in packages] == ["tokens_50", "tokens_200", "pro_month", "premium_month"]
    assert packages[0] == Package(
        id="tokens_50",
        kind="tokens",
        tokens=50,
        plan=None,
        period_days=None,
        amount=9900,
        currency="RUB",
        description="50 tokens",
    )


async def test_plan_package_carries_its_plan_and_period() -> None:
    package = await get_package("pro_month")
    assert (package.kind, package.plan, package.period_days, package.tokens, package.amount) == (
        "plan",
        "pro",
        30,
        200,
        49900,
    )


async def test_retired_package_is_neither_listed_nor_found(admin: asyncpg.Connection) -> None:
    await admin.execute("update token_packages set active = false where id = 'tokens_200'")
    assert "tokens_200" not in [p.id for p in await list_packages()]
    with pytest.raises(NotFound):
        await get_package("tokens_200")


async def test_unknown_package_is_not_found() -> None:
    with pytest.raises(NotFound):
        await get_package("tokens_999")


async def test_price_changed_in_the_database_is_served_without_a_deploy(admin: asyncpg.Connection) -> None:
    await admin.execute("update token_packages set amount = 8900, sort_order = 99 where id = 'tokens_50'")
    packages = await list_packages()
    assert packages[-1].id == "tokens_50"
    assert packages[-1].amount == 8900
