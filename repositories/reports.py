"""Figures for an operator (`dreamlens stats`): read-only, one statement."""

from __future__ import annotations

from datetime import datetime

from database import Executor, sql
from database.model import Model


class OperatorStats(Model):
    users: int
    clerk_users: int
    device_users: int
    balances_outstanding: int
    tokens_sold_today: int
    tokens_spent_today: int
    tokens_refunded_today: int
    payments_succeeded_today: int
    revenue_today_minor_units: int
    generations_pending: int
    generations_processing: int
    as_of: datetime


OPERATOR_STATS = """
-- name: operator_stats
-- "today" is the UTC day, like the daily generation limit
with today as (
    select date_trunc('day', now() at time zone 'utc') at time zone 'utc' as starts
),
ledger_today as (
    select coalesce(sum(amount) filter (where type in ('purchase', 'plan_grant')), 0) as sold,
           coalesce(-sum(amount) filter (where type = 'spend'), 0) as spent,
           coalesce(sum(amount) filter (where type = 'refund'), 0) as refunded
      from token_transactions
     where created_at >= (select starts from today)
),
payments_today as (
    select count(*) as succeeded, coalesce(sum(amount), 0) as revenue
      from payments
     where status in ('succeeded', 'refunded')
       and paid_at >= (select starts from today)
)
select (select count(*) from users) as users,
       (select count(*) from users where clerk_id is not null) as clerk_users,
       (select count(*) from users where device_id is not null) as device_users,
       (select coalesce(sum(balance), 0) from user_tokens) as balances_outstanding,
       l.sold as tokens_sold_today,
       l.spent as tokens_spent_today,
       l.refunded as tokens_refunded_today,
       p.succeeded as payments_succeeded_today,
       p.revenue as revenue_today_minor_units,
       (select count(*) from generations where status = 'pending') as generations_pending,
       (select count(*) from generations where status = 'processing') as generations_processing,
       now() as as_of
  from ledger_today l, payments_today p
"""


async def operator_stats(db: Executor = sql) -> OperatorStats:
    row = await db.fetchrow(OPERATOR_STATS)
    assert row is not None  # an aggregate always returns its one row
    return OperatorStats.model_validate(dict(row))
