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


PACKAGE_IDS = """
-- name: package_ids
-- every package ever sold, retired ones too: a row is never deleted (payments
-- refer to it), so an id seen once is a package for good
select id from token_packages
"""

# package ids this process has seen: only a miss asks the database again
_known_ids: set[str] = set()


async def package_exists(package_id: str, db: Executor = sql) -> bool:
    """Whether `package_id` names a package, on sale or retired. A known id
    costs nothing; an unknown one one round trip (a package added meanwhile
    is found then). Whether it can be bought is the payment statement's to say."""
    if package_id in _known_ids:
        return True
    _known_ids.update(row["id"] for row in await db.fetch(PACKAGE_IDS))
    return package_id in _known_ids


def forget_package_ids() -> None:
    """Tests that change the catalogue start from what the database holds."""
    _known_ids.clear()


async def list_packages(db: Executor = sql) -> list[Package]:
    return [Package.model_validate(dict(row)) for row in await db.fetch(LIST_PACKAGES)]


async def get_package(package_id: str, db: Executor = sql) -> Package:
    """The active package; NotFound for an unknown or retired one."""
    row = await db.fetchrow(GET_PACKAGE, package_id)
    if row is None:
        raise NotFound(f"No package {package_id!r}")
    return Package.model_validate(dict(row))
