"""What can be bought: token packs and plans (table token_packages).

Prices live in the database so they can change without a deploy; a payment
copies its package's price when it is created (repositories/payments.py).
"""

from __future__ import annotations

from typing import Literal

from database import Executor, NotFound, sql
from database.model import Model


class Package(Model):
    id: str
    kind: Literal["tokens", "plan"]
    tokens: int
    plan: str | None
    period_days: int | None
    amount: int  # minor units (kopecks)
    currency: str
    description: str


LIST_PACKAGES = """
-- name: list_packages
select id, kind, tokens, plan, period_days, amount, currency, description
  from token_packages
 where active
 order by sort_order, id
"""

GET_PACKAGE = """
-- name: get_package
select id, kind, tokens, plan, period_days, amount, currency, description
  from token_packages
 where id = $1
   and active
"""


PACKAGE_STATES = """
-- name: package_states
-- every package ever sold, retired ones too: a row is never deleted (payments
-- refer to it)
select id, active from token_packages
"""

PackageState = Literal["on sale", "retired", "unknown"]

# ids this process last saw on sale: only these skip the round trip
_on_sale: set[str] = set()


async def package_state(package_id: str, *, fresh: bool = False, db: Executor = sql) -> PackageState:
    """Whether `package_id` is on sale, retired (a repeat of a payment made
    before may still name it), or names no package. An id last seen on sale
    costs nothing unless `fresh`; any other one round trip, so a package
    added or put back on sale is found. One seen on sale may have been
    retired since: the payment statement has the last word (then
    `package_refused`)."""
    if package_id in _on_sale and not fresh:
        return "on sale"
    rows = await db.fetch(PACKAGE_STATES)
    _on_sale.clear()
    _on_sale.update(row["id"] for row in rows if row["active"])
    if package_id in _on_sale:
        return "on sale"
    return "retired" if any(row["id"] == package_id for row in rows) else "unknown"


def package_refused(package_id: str) -> None:
    """The payment statement found `package_id` off sale: ask the database next time."""
    _on_sale.discard(package_id)


def forget_package_states() -> None:
    """Tests that change the catalogue start from what the database holds."""
    _on_sale.clear()


async def list_packages(db: Executor = sql) -> list[Package]:
    return [Package.model_validate(dict(row)) for row in await db.fetch(LIST_PACKAGES)]


async def get_package(package_id: str, db: Executor = sql) -> Package:
    """The active package; NotFound for an unknown or retired one."""
    row = await db.fetchrow(GET_PACKAGE, package_id)
    if row is None:
        raise NotFound(f"No package {package_id!r}")
    return Package.model_validate(dict(row))
