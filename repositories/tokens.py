"""The token wallet (user_tokens) and its ledger (token_transactions).

Every movement is one statement that changes the wallet and writes its ledger
row together, keyed by an idempotency key unique per user: a repeated key
applies nothing and answers with the first entry. Spends are decided inside
that statement (`balance >= cost` on the locked row), never by reading first.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from database import (
    Conflict,
    Executor,
    InsufficientTokens,
    InvalidRequest,
    NotFound,
    Transaction,
    cached_balance,
    invalidate_balance,
    remember_balance,
    sql,
)
from database.model import Model

IDEMPOTENCY_CONSTRAINT = "token_transactions_idempotency_key"

# ledger types by the sign of their amount ('adjustment' goes either way)
CREDIT_TYPES = frozenset({"bonus", "purchase", "plan_grant", "refund", "transfer_in", "adjustment"})
DEBIT_TYPES = frozenset({"spend", "reversal", "transfer_out", "adjustment"})

MAX_PAGE_SIZE = 100


class Balance(Model):
    balance: int
    total_earned: int
    total_spent: int
    updated_at: datetime


class LedgerEntry(Model):
    id: int
    amount: int
    balance_after: int
    type: str
    description: str | None
    reference: str | None
    created_at: datetime


class LedgerPage(Model):
    items: list[LedgerEntry]
    next_before: int | None


class LedgerResult(Model):
    entry: LedgerEntry
    duplicate: bool


GET_BALANCE = """
-- name: get_balance
select balance, total_earned, total_spent, updated_at
  from user_tokens
 where user_id = $1
"""


async def get_balance(user_id: UUID, db: Executor = sql) -> Balance:
    """The wallet as it is now (no cache)."""
    row = await db.fetchrow(GET_BALANCE, user_id)
    if row is None:
        raise NotFound("No wallet for this user")
    return Balance.model_validate(dict(row))


class _Reading:
    """Holds a user's cache slot while a fresh read is on the wire."""


async def get_cached_balance(user_id: UUID) -> Balance:
    """The balance for display: up to 30 s old, no round trip when cached.

    A write that lands while our read is on the wire invalidates the slot and
    so removes the placeholder we put there; the (possibly older) value we
    read is then returned but not remembered, so the cache never holds a
    balance older than the last invalidation.
    """
    cached = cached_balance(user_id)
    if isinstance(cached, Balance):
        return cached
    placeholder = _Reading()
    remember_balance(user_id, placeholder)
    balance = await get_balance(user_id)
    if cached_balance(user_id) is placeholder:
        remember_balance(user_id, balance)
    return balance


LIST_TRANSACTIONS = """
-- name: list_transactions
select id, amount, balance_after, type, description, reference, created_at
  from token_transactions
 where user_id = $1
   and ($2::bigint is null or id < $2)
 order by id desc
 limit $3
"""


async def list_transactions(
    user_id: UUID, limit: int = 50, before: int | None = None, db: Executor = sql
) -> LedgerPage:
    """The user's ledger, newest first; pass `next_before` back as `before`."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    # one row more than asked tells whether another page exists
    rows = await db.fetch(LIST_TRANSACTIONS, user_id, before, limit + 1)
    items = [LedgerEntry.model_validate(dict(row)) for row in rows[:limit]]
    next_before = items[-1].id if len(rows) > limit else None
    return LedgerPage(items=items, next_before=next_before)


# $1 user, $2 signed amount, $3 type, $4 idempotency key, $5 description, $6 reference
MOVE_TOKENS = """
-- name: move_tokens
-- One statement, so the wallet and its ledger row change together or not at all.
with earlier as (
    -- a key seen before: its first entry is the answer and nothing is applied
    -- (read in this statement's snapshot; a concurrent twin is caught by the
    -- unique key on insert, and the caller runs this once more)
    select id, amount, balance_after, type, description, reference, created_at
      from token_transactions
     where user_id = $1
       and idempotency_key = $4
),
wallet as (
    -- lock the wallet row and read its latest committed balance (a locking
    -- read is not bound to the snapshot): concurrent moves on this user queue
    -- here, and each decides on what the one before it left
    select user_id, balance, total_earned, total_spent
      from user_tokens
     where user_id = $1
       and not exists (select 1 from earlier)
       for no key update
),
moved as (
    -- the update rule: spend and refund move total_spent, every other type
    -- total_earned, so balance = total_earned - total_spent always; a refund
    -- larger than this wallet ever spent (the spend was on a device wallet
    -- since linked in) counts the excess as earned. Computed from the locked
    -- row (w), not from t: PostgreSQL checks the new row against the
    -- constraints before it rechecks a row changed since the snapshot, so a
    -- credit that committed while this waited would otherwise refuse it
    update user_tokens t
       set balance      = w.balance + $2,
           total_earned = w.total_earned + case when $3 = 'spend' then 0
                                                when $3 = 'refund' then greatest($2 - w.total_spent, 0)
                                                else $2 end,
           total_spent  = w.total_spent - case when $3 = 'spend' then $2
                                               when $3 = 'refund' then least($2, w.total_spent)
                                               else 0 end,
           updated_at   = now()
      from wallet w
     where t.user_id = w.user_id
       and w.balance + $2 >= 0
 returning t.balance
),
entry as (
    insert into token_transactions
           (user_id, amount, balance_after, type, description, reference, idempotency_key)
    select $1, $2, moved.balance, $3, $5, $6, $4
      from moved
 returning id, amount, balance_after, type, description, reference, created_at
)
select e.id, e.amount, e.balance_after, e.type, e.description, e.reference, e.created_at,
       false as duplicate, null::integer as refused_balance
  from entry e
 union all
select x.id, x.amount, x.balance_after, x.type, x.description, x.reference, x.created_at,
       true, null
  from earlier x
 union all
-- neither applied nor seen before: the locked balance is too low for the spend
select null, null, null, null, null, null, null, false, w.balance
  from wallet w
 where not exists (select 1 from moved)
"""


async def _move(
    user_id: UUID,
    amount: int,
    type: str,
    idempotency_key: str,
    description: str | None,
    reference: str | None,
    db: Executor,
) -> LedgerResult:
    args = (user_id, amount, type, idempotency_key, description, reference)
    try:
        row = await db.fetchrow(MOVE_TOKENS, *args)
    except Conflict as exc:
        # Two requests with one key passed the "seen before" check in the same
        # snapshot; the unique key let the first in and rolled this one back.
        # Run again: it now finds the first entry. Inside a caller's transaction
        # it cannot (the transaction is aborted): the caller's unit is re-run.
        if exc.constraint != IDEMPOTENCY_CONSTRAINT or isinstance(db, Transaction):
            raise
        row = await db.fetchrow(MOVE_TOKENS, *args)
    finally:
        invalidate_balance(user_id)
    if row is None:
        raise NotFound("No wallet for this user")
    if row["refused_balance"] is not None:
        raise InsufficientTokens(row["refused_balance"], -amount)
    return LedgerResult(entry=_entry(row), duplicate=row["duplicate"])


def _entry(row: Any) -> LedgerEntry:
    return LedgerEntry(
        id=row["id"],
        amount=row["amount"],
        balance_after=row["balance_after"],
        type=row["type"],
        description=row["description"],
        reference=row["reference"],
        created_at=row["created_at"],
    )


def _check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise InvalidRequest("amount must be a positive whole number of tokens")


def _check_key(idempotency_key: str) -> None:
    if not 1 <= len(idempotency_key) <= 200:
        raise InvalidRequest("idempotency key must be 1 to 200 characters")


async def credit(
    user_id: UUID,
    amount: int,
    type: str,
    idempotency_key: str,
    description: str | None = None,
    reference: str | None = None,
    db: Executor = sql,
) -> LedgerResult:
    """Add `amount` tokens as a ledger row of `type`; a repeated key applies once."""
    _check_amount(amount)
    _check_key(idempotency_key)
    if type not in CREDIT_TYPES:
        raise InvalidRequest(f"{type!r} is not a credit type")
    return await _move(user_id, amount, type, idempotency_key, description, reference, db)


async def spend(
    user_id: UUID,
    amount: int,
    idempotency_key: str,
    description: str | None = None,
    reference: str | None = None,
    type: str = "spend",
    db: Executor = sql,
) -> LedgerResult:
    """Take `amount` tokens, or raise InsufficientTokens(balance, cost) and change
    nothing. A repeated key returns the first result, even if the balance is
    now lower."""
    _check_amount(amount)
    _check_key(idempotency_key)
    if type not in DEBIT_TYPES:
        raise InvalidRequest(f"{type!r} is not a debit type")
    return await _move(user_id, -amount, type, idempotency_key, description, reference, db)
