"""Plans and subscriptions: which plan a user is on, and its daily limit.

A user without an active, unexpired subscription is on the `free` plan. The
daily generation limits live in the `plans` table (changeable without a
deploy); the count used today lives on the wallet row
(user_tokens.generations_today for the UTC day generations_day), where the
spend that increments it also decides the limit.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from database import Executor, InvalidRequest, NotFound, sql
from database.model import Model


class Plan(Model):
    id: str
    name: str
    daily_generation_limit: int


class Subscription(Model):
    plan: str
    status: str  # "active", or "none" on the free plan
    current_period_end: datetime | None
    daily_generation_limit: int
    used_today: int


LIST_PLANS = """
select id, name, daily_generation_limit
  from plans
 order by daily_generation_limit, id
"""


async def list_plans(db: Executor = sql) -> list[Plan]:
    return [Plan.model_validate(dict(row)) for row in await db.fetch(LIST_PLANS)]


GET_SUBSCRIPTION = """
-- name: get_subscription
-- one statement: the active, unexpired plan (else free), its limit, and
-- today's count from the wallet (a count from an earlier UTC day is 0)
with clock as (
    select coalesce($2::timestamptz, now()) as now
),
active as (
    select s.plan, s.current_period_end
      from subscriptions s, clock c
     where s.user_id = $1
       and s.status = 'active'
       and s.current_period_end > c.now
)
select p.id as plan,
       case when a.plan is null then 'none' else 'active' end as status,
       a.current_period_end,
       p.daily_generation_limit,
       case when t.generations_day = (c.now at time zone 'utc')::date
            then t.generations_today else 0 end as used_today
  from user_tokens t
 cross join clock c
  left join active a on true
  join plans p on p.id = coalesce(a.plan, 'free')
 where t.user_id = $1
"""


async def get_subscription(user_id: UUID, db: Executor = sql, now: datetime | None = None) -> Subscription:
    row = await db.fetchrow(GET_SUBSCRIPTION, user_id, now)
    if row is None:
        raise NotFound("User not found")
    return Subscription.model_validate(dict(row))


# The upsert that starts or extends a plan; the payments repository embeds it
# in the CTE that credits a plan purchase (`with activated as (<ACTIVATE_PLAN>)`).
# Parameters: $1 user id (uuid), $2 plan id (text, references plans),
# $3 days (integer > 0). Returns the subscription row: id, user_id, plan,
# status, current_period_start, current_period_end.
# Without an active subscription it inserts one running from now() for $3
# days. With one, the partial unique index (one active per user) turns the
# insert into an update: the same plan gets $3 days more at its end (or from
# now() if the period already ran out before the expiry job saw it); another
# plan is merged (plan_merge in schema.sql): the higher of the two is kept and
# the other's time converted into it at the plans' prices, so no paid time is
# lost and none gained by switching. No row when the
# user does not exist. Not idempotent on its own: a caller that may retry it
# must key it (the payment CTE does, by payment id).
ACTIVATE_PLAN = """
insert into subscriptions (user_id, plan, status, current_period_start, current_period_end)
select u.id, $2::text, 'active', now(), now() + make_interval(days => $3::integer)
  from users u
 where u.id = $1::uuid
    on conflict (user_id) where status = 'active'
    do update
   set (plan, current_period_end) = (
           select m.plan, m.period_end
             from plan_merge(subscriptions.plan, subscriptions.current_period_end, excluded.plan,
                             make_interval(days => $3::integer)) m),
       current_period_start = case when subscriptions.current_period_end > now()
                                   then subscriptions.current_period_start else now() end,
       updated_at           = now()
returning id, user_id, plan, status, current_period_start, current_period_end
"""

ACTIVATE_PLAN_RETURNING_SUBSCRIPTION = (
    """
-- name: activate_plan
with activated as ("""
    + ACTIVATE_PLAN
    + """)
select a.plan,
       a.status,
       a.current_period_end,
       p.daily_generation_limit,
       case when t.generations_day = (now() at time zone 'utc')::date
            then t.generations_today else 0 end as used_today
  from activated a
  join plans p on p.id = a.plan
  join user_tokens t on t.user_id = a.user_id
"""
)


async def activate_plan(user_id: UUID, plan: str, days: int, db: Executor = sql) -> Subscription:
    """Start `plan` for `days`, or add them to the active one (converted, and
    the higher plan kept, when it is another: ACTIVATE_PLAN).

    Not idempotent by key: a plan bought with money is activated inside the
    payment's keyed CTE (ACTIVATE_PLAN), not through this function.
    """
    if days <= 0:
        raise InvalidRequest("days must be positive")
    row = await db.fetchrow(ACTIVATE_PLAN_RETURNING_SUBSCRIPTION, user_id, plan, days)
    if row is None:
        raise NotFound("User not found")
    return Subscription.model_validate(dict(row))


EXPIRE_ENDED = """
-- name: expire_ended_subscriptions
with expired as (
    update subscriptions
       set status     = 'expired',
           updated_at = now()
     where status = 'active'
       and current_period_end <= coalesce($1::timestamptz, now())
 returning 1
)
select count(*) from expired
"""


async def expire_ended(now: datetime | None = None, db: Executor = sql) -> int:
    """Mark active subscriptions whose period has ended as expired; how many."""
    count: int = await db.fetchval(EXPIRE_ENDED, now)
    return count
