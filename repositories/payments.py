"""Payments through YooKassa (tables payments and payment_refunds).

A payment is created here `pending` with its price copied from the package,
attached to the provider's payment once YooKassa has made one, and then moved
forward only by what the provider reports:

    pending ─┬─> waiting_for_capture ─┬─> succeeded ──> refunded (fully)
             ├────────────────────────┤
             └────────────────────────┴─> canceled

A payment that never got a provider payment (YooKassa was down, or its
answer was lost, and the client gave up) is abandoned after a day: the
reconciler cancels it, and a canceled payment is never attached afterwards,
so no provider payment can be paid for a payment we no longer credit.

Moving to `succeeded` credits the package's tokens (and grants its plan) in
the same statement; a refund takes tokens back in one statement too. Both
apply exactly once however often and however concurrently the provider's
notifications arrive: the status guard in the UPDATE is re-checked under the
row lock, and the ledger key (`payment:<id>`, `reversal:<id>:<refund id>`)
and payment_refunds' primary key are second guards.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from database import Conflict, DeviceLinked, Executor, InvalidRequest, NotFound, invalidate_balance, sql
from database.model import Model

PAYMENTS_IDEMPOTENCY_KEY = "payments_idempotency_key"

PROVIDER_STATUSES = ("pending", "waiting_for_capture", "succeeded", "canceled")

# where the provider may move a payment; anything else is old news
FORWARD = {
    ("pending", "waiting_for_capture"),
    ("pending", "succeeded"),
    ("pending", "canceled"),
    ("waiting_for_capture", "succeeded"),
    ("waiting_for_capture", "canceled"),
}

# the unique keys that make a repeated apply a duplicate, not an error
DUPLICATE_GUARDS = ("token_transactions_idempotency_key", "payment_refunds_pkey")

MAX_OPEN_PAYMENTS = 1000

ABANDONED = "This payment was abandoned before it could be paid; start a new one with a new Idempotency-Key"


class Payment(Model):
    id: UUID
    user_id: UUID
    package_id: str
    status: str
    amount: int  # minor units (kopecks)
    currency: str
    tokens: int
    provider_payment_id: str | None
    confirmation_url: str | None
    refunded_amount: int
    # tokens a refund could not take back because they were already spent
    refund_shortfall: int
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None


class ApplyResult(Model):
    payment: Payment | None
    changed: bool
    # the signed amount of the wallet change: tokens credited by a success,
    # minus the tokens a refund took back
    credited_tokens: int


CREATE_PENDING_PAYMENT = """
-- name: create_pending_payment
-- One statement: the payment already made under this (user, key), or a new
-- one priced from the active package. Two racing first requests both find
-- nothing; the unique constraint payments_idempotency_key picks the winner.
with existing as (
    select *
      from payments
     where user_id = $1
       and idempotency_key = $3
),
package as (
    select id, amount, currency, tokens
      from token_packages
     where id = $2
       and active
),
payer as (
    -- A device linked into an account must not buy: its payments moved with
    -- the link, and a credit to the device's wallet could never be used.
    -- The share lock conflicts with the link's lock on the user: a payment
    -- committed first is moved by the link; a link committed first is seen
    -- here (the locked row is re-read) and nothing is inserted.
    select id
      from users
     where id = $1
       and linked_to_user_id is null
       for share
),
inserted as (
    -- the plan and period are copied too, by trigger_payments_keep_their_plan
    insert into payments (user_id, package_id, amount, currency, tokens, idempotency_key)
    select payer.id, package.id, package.amount, package.currency, package.tokens, $3
      from package, payer
     where not exists (select 1 from existing)
    returning *
)
select *, true as created from inserted
union all
select *, false as created from existing
"""

LINKED_TO = """
-- name: linked_to
select linked_to_user_id from users where id = $1
"""

ATTACH_PROVIDER_PAYMENT = """
-- name: attach_provider_payment
-- the first provider payment sticks; the payment's current row comes back
-- either way so the caller can tell a repeat from a different id
with attached as (
    update payments
       set provider_payment_id = $2,
           confirmation_url    = $3,
           updated_at          = now()
     where id = $1
       and provider_payment_id is null
       -- an abandoned (canceled) payment is never attached: nothing paid
       -- for it could be credited
       and status = 'pending'
    returning *
)
select * from attached
union all
select *
  from payments
 where id = $1
   and not exists (select 1 from attached)
"""

GET_PAYMENT = """
-- name: get_payment
select *
  from payments
 where id = $1
   and user_id = $2
"""

GET_PAYMENT_BY_PROVIDER_ID = """
-- name: get_payment_by_provider_id
select *
  from payments
 where provider_payment_id = $1
"""

APPLY_PROVIDER_STATUS = """
-- name: apply_provider_status
-- One statement (the webhook's one round trip): move the payment forward and,
-- when it becomes succeeded, credit its tokens with their ledger row and grant
-- or extend its plan. The status guard in the UPDATE's WHERE is re-checked
-- under the row lock, so of many concurrent deliveries exactly one moves the
-- payment; the ledger key payment:<id> is the second guard.
with moved as (
    update payments p
       set status     = $2::text,
           paid_at    = case when $2::text = 'succeeded' then now() else p.paid_at end,
           updated_at = now()
     where p.provider_payment_id = $1
       -- the provider's amount must be what we asked for: a payment altered
       -- on the way (or a bug) is never credited
       and ($3::bigint is null or (p.amount = $3::bigint and p.currency = $4::text))
       and (p.status, $2::text) in (('pending', 'waiting_for_capture'),
                                    ('pending', 'succeeded'),
                                    ('pending', 'canceled'),
                                    ('waiting_for_capture', 'succeeded'),
                                    ('waiting_for_capture', 'canceled'))
    returning p.*
),
purchase as (
    -- what the payment was priced with, not the catalogue as it is now
    select m.id as payment_id, m.user_id, m.tokens,
           case when m.plan is null then 'tokens' else 'plan' end as kind,
           m.plan, m.period_days, k.description
      from moved m
      join token_packages k on k.id = m.package_id
     where m.status = 'succeeded'
),
wallet as (
    update user_tokens t
       set balance      = t.balance + b.tokens,
           total_earned = t.total_earned + b.tokens,
           updated_at   = now()
      from purchase b
     where t.user_id = b.user_id
       and b.tokens > 0
       and not exists (select 1
                         from token_transactions x
                        where x.user_id = b.user_id
                          and x.idempotency_key = 'payment:' || b.payment_id)
    returning t.user_id, t.balance
),
credit as (
    insert into token_transactions (user_id, amount, balance_after, type, description, reference,
                                    idempotency_key)
    select b.user_id, b.tokens, w.balance,
           case b.kind when 'plan' then 'plan_grant' else 'purchase' end,
           b.description, b.payment_id::text, 'payment:' || b.payment_id
      from purchase b
      join wallet w on w.user_id = b.user_id
    returning amount
),
plan_grant as (
    insert into subscriptions (user_id, plan, status, current_period_start, current_period_end)
    select b.user_id, b.plan, 'active', now(), now() + make_interval(days => b.period_days)
      from purchase b
     where b.kind = 'plan'
    on conflict (user_id) where status = 'active' do update
       -- the same plan is extended; another is merged, the higher kept and
       -- the other's time converted into it at their prices (plan_merge).
       -- excluded's end minus its start is the package's period_days
       set (plan, current_period_end) = (
               select m.plan, m.period_end
                 from plan_merge(subscriptions.plan, subscriptions.current_period_end, excluded.plan,
                                 excluded.current_period_end - excluded.current_period_start) m),
           updated_at = now()
    returning user_id, plan, current_period_end
),
granted as (
    -- what the grant added, for its refunds: the package's period as time on
    -- the plan kept, which is the last of the period that now ends
    insert into plan_grants (payment_id, plan, added, starts_at, ends_at)
    select b.payment_id, g.plan, a.added, g.current_period_end - a.added, g.current_period_end
      from purchase b
      join plan_grant g on g.user_id = b.user_id
     cross join lateral (select plan_time_in(b.plan, g.plan, make_interval(days => b.period_days)) as added) a
    on conflict (payment_id) do nothing
)
select m.*, true as changed, coalesce((select sum(amount) from credit), 0)::int as credited_tokens
  from moved m
union all
select p.*, false, 0
  from payments p
 where p.provider_payment_id = $1
   and not exists (select 1 from moved)
"""

APPLY_REFUND = """
-- name: apply_refund
-- One statement: record the provider's refund, take back the tokens it pays
-- for (never more than the wallet holds; the rest is the payment's shortfall),
-- and give back the plan time it paid for. Tokens owed are counted
-- cumulatively, floor(tokens * refunded / amount), so the refunds of one
-- payment add up to all of its tokens exactly when it is fully refunded.
-- Lock order (payment, then wallet) is the same as apply_provider_status's.
with target as (
    select p.id, p.user_id, p.amount, p.tokens, p.refunded_amount,
           case when p.plan is null then 'tokens' else 'plan' end as kind,
           p.plan, p.period_days, k.description
      from payments p
      join token_packages k on k.id = p.package_id
     where p.provider_payment_id = $1
       and p.status = 'succeeded'
       and not exists (select 1 from payment_refunds r where r.provider_refund_id = $2)
       for update of p
),
wallet as (
    -- the row as it is once locked: a link or a credit that committed while
    -- this statement waited is in it, though not in the statement's snapshot
    select t.user_id, t.balance, t.total_earned
      from user_tokens t
     where t.user_id = (select user_id from target)
       for update
),
due as (
    select g.id as payment_id, g.user_id, g.kind, g.plan, g.period_days, g.description, g.amount,
           g.refunded_amount as refunded_before,
           least(g.amount, g.refunded_amount + $3) as refunded_after,
           (floor(g.tokens::numeric * least(g.amount, g.refunded_amount + $3) / g.amount)
            - floor(g.tokens::numeric * g.refunded_amount / g.amount))::int as tokens_due,
           coalesce(w.balance, 0) as balance, w.total_earned
      from target g
      left join wallet w on w.user_id = g.user_id
),
take as (
    select d.*,
           least(d.balance, d.tokens_due) as tokens_taken,
           d.tokens_due - least(d.balance, d.tokens_due) as tokens_short
      from due d
),
recorded as (
    -- and the plan time it pays for, taken back by plan_refund (schema.sql):
    -- the refunded share of what the payment's grant added, never more than
    -- is left of it, under the plan's lock and read after it
    insert into payment_refunds (provider_refund_id, payment_id, amount, tokens_taken, tokens_short,
                                 plan_taken)
    select $2, k.payment_id, $3, k.tokens_taken, k.tokens_short,
           case when k.kind = 'plan'
                then plan_refund(k.user_id, k.payment_id, k.plan, k.period_days,
                                 k.refunded_before::float8 / k.amount, k.refunded_after::float8 / k.amount)
           end
      from take k
    returning provider_refund_id
),
moved as (
    update payments p
       set refunded_amount  = k.refunded_after,
           refund_shortfall = p.refund_shortfall + k.tokens_short,
           status           = case when k.refunded_after >= p.amount then 'refunded' else p.status end,
           updated_at       = now()
      from take k
     where p.id = k.payment_id
    returning p.*
),
debited as (
    update user_tokens t
       -- from the locked row, not from t: PostgreSQL checks the new row
       -- against the constraints before it rechecks a row that changed
       -- since the snapshot, so the snapshot's older balance, less what is
       -- taken, would fail balance >= 0 and refuse the refund
       set balance      = k.balance - k.tokens_taken,
           total_earned = k.total_earned - k.tokens_taken,
           updated_at   = now()
      from take k
     where t.user_id = k.user_id
       and k.tokens_taken > 0
    returning t.user_id, t.balance
),
reversal as (
    insert into token_transactions (user_id, amount, balance_after, type, description, reference,
                                    idempotency_key)
    select k.user_id, -k.tokens_taken, d.balance, 'reversal', 'Refund: ' || k.description,
           k.payment_id::text, 'reversal:' || k.payment_id || ':' || $2
      from take k
      join debited d on d.user_id = k.user_id
    returning amount
)
select m.*, true as changed, coalesce((select sum(amount) from reversal), 0)::int as credited_tokens
  from moved m
union all
select p.*, false, 0
  from payments p
 where p.provider_payment_id = $1
   and not exists (select 1 from moved)
"""

CANCEL_ABANDONED_PAYMENTS = """
-- name: cancel_abandoned_payments
-- Payments that never got a provider payment, older than $1: nobody was
-- ever shown a page to pay them. The status guard keeps a concurrent attach
-- and this cancel from both winning: whichever commits first, the other's
-- re-checked WHERE no longer matches. Bounded by $2 a run; served by
-- payments_open_created_at_idx.
with abandoned as (
    select id
      from payments
     where status = 'pending'
       and provider_payment_id is null
       and created_at < $1
     order by created_at
     limit $2
)
update payments p
   set status     = 'canceled',
       updated_at = now()
  from abandoned a
 where p.id = a.id
   and p.status = 'pending'
   and p.provider_payment_id is null
returning p.id
"""

APPLIED_AND_OURS = """
-- name: applied_refunds_and_our_payments
-- which of the provider's refunds are applied here, and which of its
-- payments are ours (a shop shared with another product lists theirs too)
select 'refund' as kind, provider_refund_id as id
  from payment_refunds
 where provider_refund_id = any($1::text[])
union all
select 'payment', provider_payment_id
  from payments
 where provider_payment_id = any($2::text[])
"""

OPEN_PAYMENTS = """
-- name: open_payments
-- the reconciler's question: which payments has the provider still not
-- settled after a while? The least recently asked about first (never asked,
-- first of all), so payments that stay open for hours (unpaid, or refused
-- on an amount mismatch) cannot hold the head of every run; $3 those this
-- run has asked about already. payments_open_created_at_idx finds the open
-- ones, few enough to sort.
select *
  from payments
 where status in ('pending', 'waiting_for_capture')
   and provider_payment_id is not null
   and created_at < $1
   and id <> all($3::uuid[])
 order by reconciled_at nulls first, created_at, id
 limit $2
"""

MARK_RECONCILED = """
-- name: mark_reconciled
-- A row a notification or a link holds is skipped, not waited for: it is
-- being settled, and waiting could deadlock with a statement that locks
-- several payments in another order.
update payments p
   set reconciled_at = now()
  from (select id
          from payments
         where id = any($1::uuid[])
         order by id
           for update skip locked) asked
 where p.id = asked.id
"""


def _payment(row: Any) -> Payment:
    return Payment.model_validate(dict(row))


async def _unchanged(provider_payment_id: str, db: Executor) -> ApplyResult:
    payment = await get_payment_by_provider_id(provider_payment_id, db)
    return ApplyResult(payment=payment, changed=False, credited_tokens=0)


async def create_pending_payment(
    user_id: UUID, package_id: str, idempotency_key: str, db: Executor = sql
) -> tuple[Payment, bool]:
    """(payment, created): a new pending payment for the package, or the one
    this user already made with this key (created=False: a repeated request
    returns the first result). A key already used for another package is a
    Conflict, as a generation's key with another prompt is: answering the
    first payment would send the payer to pay for what they did not ask.

    An unknown or retired package raises InvalidRequest("unknown package"):
    the client asked for something that cannot be bought, a 4xx
    invalid_request, not a missing resource of its own. A device linked into
    an account (even by a link that commits while this runs) raises
    DeviceLinked: nothing it bought could reach the account.
    """
    try:
        row = await db.fetchrow(CREATE_PENDING_PAYMENT, user_id, package_id, idempotency_key)
    except Conflict as exc:
        if exc.constraint != PAYMENTS_IDEMPOTENCY_KEY:
            raise
        # a concurrent first request committed the key: now we see its payment
        row = await db.fetchrow(CREATE_PENDING_PAYMENT, user_id, package_id, idempotency_key)
    if row is None:
        # rare enough for a second statement: which of the two refusals
        if await db.fetchval(LINKED_TO, user_id) is not None:
            raise DeviceLinked("This device was linked into an account; sign in to that account")
        raise InvalidRequest("unknown package", details={"package_id": package_id})
    payment = _payment(row)
    if not row["created"] and payment.package_id != package_id:
        raise Conflict(
            f"Idempotency key already used for package {payment.package_id!r}",
            constraint=PAYMENTS_IDEMPOTENCY_KEY,
        )
    return payment, bool(row["created"])


async def attach_provider_payment(
    payment_id: UUID, provider_payment_id: str, confirmation_url: str | None, db: Executor = sql
) -> Payment:
    """Record the provider's payment for ours. Attaching the same provider id
    again changes nothing; a different one is a Conflict (the first sticks),
    and so is attaching to a payment that was abandoned (canceled) first."""
    for _ in range(2):
        row = await db.fetchrow(ATTACH_PROVIDER_PAYMENT, payment_id, provider_payment_id, confirmation_url)
        if row is None:
            raise NotFound(f"No payment {payment_id}")
        if row["provider_payment_id"] == provider_payment_id:
            return _payment(row)
        if row["provider_payment_id"] is not None:
            raise Conflict(f"Payment {payment_id} already has provider payment {row['provider_payment_id']}")
        if row["status"] != "pending":
            raise Conflict(ABANDONED)
        # a concurrent attach committed after this statement's snapshot: look again
    raise Conflict(f"Payment {payment_id} is being attached concurrently")


async def get_payment(user_id: UUID, payment_id: UUID, db: Executor = sql) -> Payment:
    """One of the user's payments; another user's is NotFound, like a missing one."""
    row = await db.fetchrow(GET_PAYMENT, payment_id, user_id)
    if row is None:
        raise NotFound(f"No payment {payment_id}")
    return _payment(row)


async def get_payment_by_provider_id(provider_payment_id: str, db: Executor = sql) -> Payment | None:
    row = await db.fetchrow(GET_PAYMENT_BY_PROVIDER_ID, provider_payment_id)
    return _payment(row) if row else None


async def apply_provider_status(
    provider_payment_id: str,
    status: str,
    amount: int | None = None,
    currency: str | None = None,
    db: Executor = sql,
) -> ApplyResult:
    """Move the payment to the provider's status if that is forward; on
    `succeeded` credit the package (tokens, plan) in the same statement.

    With `amount` (minor units) and `currency` as the provider reports them,
    a payment whose amount differs from ours is not moved (changed=False).

    Anything else (a repeat, canceled after succeeded, a step backwards)
    changes nothing and reports changed=False. An unknown provider id gives
    ApplyResult(None, False, 0).
    """
    if status not in PROVIDER_STATUSES:
        raise InvalidRequest(f"Unknown payment status {status!r}")
    try:
        row = await db.fetchrow(APPLY_PROVIDER_STATUS, provider_payment_id, status, amount, currency)
    except Conflict as exc:
        if exc.constraint not in DUPLICATE_GUARDS:
            raise
        # the ledger key caught a second credit: the first one stands
        return await _unchanged(provider_payment_id, db)
    if row is None:
        return ApplyResult(payment=None, changed=False, credited_tokens=0)
    payment = _payment(row)
    if row["changed"]:
        if row["credited_tokens"]:
            invalidate_balance(payment.user_id)
        return ApplyResult(payment=payment, changed=True, credited_tokens=row["credited_tokens"])
    if (payment.status, status) in FORWARD:
        # we lost a race: the row we read predates the winner's commit
        payment = await get_payment_by_provider_id(provider_payment_id, db) or payment
    if payment.status == "succeeded":
        # the credit may be this very call's, its commit acknowledged on a
        # connection that dropped and the retry finding it made: the payer's
        # cached balance is dropped as for a credit (a dict pop)
        invalidate_balance(payment.user_id)
    return ApplyResult(payment=payment, changed=False, credited_tokens=0)


async def apply_refund(
    provider_payment_id: str, provider_refund_id: str, refund_amount: int, db: Executor = sql
) -> ApplyResult:
    """Apply the provider's refund of `refund_amount` minor units, once per
    refund id, to a succeeded (possibly partly refunded) payment.

    Takes back floor(tokens * refunded / amount) tokens counted cumulatively
    (a full refund takes all), but never more than the wallet holds: the rest
    is added to the payment's refund_shortfall. refunded_amount accumulates
    (capped at the amount); a fully refunded payment becomes `refunded`.
    For a plan package the same share of the plan's period comes off the
    active subscription, and when no paid time is left the plan ends now
    (status canceled). credited_tokens is minus the tokens taken back.
    """
    if refund_amount <= 0:
        raise InvalidRequest("A refund amount must be positive")
    if not provider_refund_id:
        raise InvalidRequest("A refund needs the provider's refund id")
    try:
        row = await db.fetchrow(APPLY_REFUND, provider_payment_id, provider_refund_id, refund_amount)
    except Conflict as exc:
        if exc.constraint not in DUPLICATE_GUARDS:
            raise
        # a concurrent delivery of the same refund won
        return await _unchanged(provider_payment_id, db)
    if row is None:
        return ApplyResult(payment=None, changed=False, credited_tokens=0)
    payment = _payment(row)
    if row["changed"] and row["credited_tokens"]:
        invalidate_balance(payment.user_id)
    return ApplyResult(payment=payment, changed=bool(row["changed"]), credited_tokens=row["credited_tokens"])


async def open_payments(
    older_than: datetime, limit: int = 100, skip: Sequence[UUID] = (), db: Executor = sql
) -> list[Payment]:
    """Payments still pending or waiting for capture at the provider, created
    before `older_than` and not in `skip`: those the reconciler asked about
    least recently first (mark_reconciled), then the oldest."""
    if not 1 <= limit <= MAX_OPEN_PAYMENTS:
        raise InvalidRequest(f"limit must be between 1 and {MAX_OPEN_PAYMENTS}")
    rows = await db.fetch(OPEN_PAYMENTS, older_than, limit, list(skip))
    return [_payment(row) for row in rows]


async def mark_reconciled(payment_ids: Sequence[UUID], db: Executor = sql) -> None:
    """Note that the reconciler asked YooKassa about these payments now."""
    if payment_ids:
        await db.execute(MARK_RECONCILED, list(payment_ids))


async def cancel_abandoned_payments(older_than: datetime, limit: int = 100, db: Executor = sql) -> int:
    """Cancel up to `limit` payments created before `older_than` that never
    got a provider payment; how many were canceled."""
    if not 1 <= limit <= MAX_OPEN_PAYMENTS:
        raise InvalidRequest(f"limit must be between 1 and {MAX_OPEN_PAYMENTS}")
    return len(await db.fetch(CANCEL_ABANDONED_PAYMENTS, older_than, limit))


async def applied_refunds_and_our_payments(
    provider_refund_ids: list[str], provider_payment_ids: list[str], db: Executor = sql
) -> tuple[set[str], set[str]]:
    """(the refunds among these already applied here, the payments among
    these that are ours), in one round trip."""
    if not provider_refund_ids and not provider_payment_ids:
        return set(), set()
    rows = await db.fetch(APPLIED_AND_OURS, provider_refund_ids, provider_payment_ids)
    applied = {row["id"] for row in rows if row["kind"] == "refund"}
    ours = {row["id"] for row in rows if row["kind"] == "payment"}
    return applied, ours
