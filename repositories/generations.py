"""generations: the spend that queues an image, the worker's queue, results.

The table is the queue. States: pending -> processing -> succeeded | failed.
A generation's cost is spent in the statement that creates it and refunded
(once, key `refund:<id>`) in the statement that fails it, whichever path
fails it: the worker's result, or the reaper for a lease that ran out too
often or a generation nobody picked up in time. Every transition is guarded
by the state it leaves, so duplicates and overlapping runs change nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from database import (
    Conflict,
    DeviceLinked,
    Executor,
    InsufficientTokens,
    InvalidRequest,
    NotFound,
    RateLimited,
    invalidate_balance,
    sql,
)
from database.model import Model

GENERATIONS_IDEMPOTENCY_KEY = "generations_idempotency_key"
# outcomes of create_generation that spend nothing because of the wallet
REFUSALS = frozenset({"insufficient_tokens", "daily_limit"})
MAX_PAGE_SIZE = 100
RESULT_STATUSES = frozenset({"succeeded", "failed"})


class Generation(Model):
    id: UUID
    user_id: UUID
    prompt: str
    quality: str
    cost: int
    status: str
    attempt: int
    image_key: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class CreatedGeneration(Model):
    generation: Generation
    balance: int
    replayed: bool


class GenerationPage(Model):
    items: list[Generation]
    next_before: UUID | None


class ClaimedGeneration(Model):
    id: UUID
    prompt: str
    quality: str
    attempt: int
    lease_expires_at: datetime


class ReapResult(Model):
    returned: int
    failed: int
    more: bool = False  # a batch was full: there may be more to reap


GENERATION_FIELDS = tuple(Generation.model_fields)


def _generation(row: Any) -> Generation:
    return Generation.model_validate({field: row[field] for field in GENERATION_FIELDS})


# -------------------------------------------------------------------- create

CREATE_GENERATION = """
-- name: create_generation
-- One statement: the spend, the generation, its ledger row and the usage log
-- commit together or not at all. The wallet row is locked first (skipped on a
-- replay): its newest values decide the spend and name the refusal exactly,
-- and the daily counter on it makes the plan limit exact under concurrency.
-- Two first uses of one key both pass `existing`; the unique constraint on
-- (user_id, idempotency_key) refuses the second, which then replays.
-- The user row is read `for share`, before the wallet: a link holds it until
-- it commits, and a locking read returns the latest row, so a spend racing a
-- link of its device sees the link and is refused instead of spending what
-- the device keeps (nobody could see that generation afterwards).
with account as (
    select u.linked_to_user_id
      from users u
     where u.id = $1
       for share
),
existing as (
    select g.id, g.user_id, g.prompt, g.quality, g.cost, g.status, g.attempt, g.image_key,
           g.error, g.created_at, g.updated_at, g.finished_at
      from generations g
     where g.user_id = $1
       and g.idempotency_key = $4::text
),
price as (
    select p.cost
      from generation_prices p
     where p.quality = $3::text
),
daily_limit as (
    select p.daily_generation_limit
      from plans p
     where p.id = coalesce((select s.plan
                              from subscriptions s
                             where s.user_id = $1
                               and s.status = 'active'
                               and s.current_period_end > now()), 'free')
),
wallet as (
    select t.user_id,
           t.balance,
           -- a spend whose transaction began before UTC midnight but took
           -- the lock after one made after it counts on that later day, so
           -- it never resets the new day's count to its own
           greatest(t.generations_day, (now() at time zone 'utc')::date) as day,
           case when t.generations_day >= (now() at time zone 'utc')::date
                then t.generations_today else 0 end as used_today
      from user_tokens t
     where t.user_id = $1
       and not exists (select 1 from existing)
       and exists (select 1 from account a where a.linked_to_user_id is null)
       and exists (select 1 from price)
       for update
),
spent as (
    update user_tokens t
       -- from the locked row (w), not from t: the new row is checked
       -- against balance >= 0 before PostgreSQL rechecks a row changed since
       -- the snapshot, so a credit that committed while this spend waited
       -- would otherwise refuse it
       set balance           = w.balance - p.cost,
           total_spent       = t.total_spent + p.cost,
           generations_today = w.used_today + 1,
           generations_day   = w.day,
           updated_at        = now()
      from wallet w, price p, daily_limit l
     where t.user_id = w.user_id
       and w.balance >= p.cost
       and w.used_today < l.daily_generation_limit
 returning t.balance, p.cost
),
created as (
    insert into generations (user_id, prompt, quality, cost, idempotency_key)
    select $1, $2::text, $3::text, s.cost, $4::text
      from spent s
 returning id, user_id, prompt, quality, cost, status, attempt, image_key,
           error, created_at, updated_at, finished_at
),
spend_entry as (
    insert into token_transactions (user_id, amount, balance_after, type, description, reference,
                                    idempotency_key)
    select $1, -g.cost, s.balance, 'spend', 'Image generation', g.id::text, 'generation:' || g.id
      from created g, spent s
),
usage_entry as (
    insert into usage_logs (user_id, action, reference)
    select $1, 'generation', g.id::text
      from created g
)
select case
           when not exists (select 1 from account)                      then 'not_found'
           when (select a.linked_to_user_id from account a) is not null then 'device_linked'
           when e.id is not null and e.prompt = $2::text and e.quality = $3::text
                                                                        then 'replayed'
           when e.id is not null                                        then 'key_conflict'
           when not exists (select 1 from price)                        then 'unknown_quality'
           when c.id is not null                                        then 'created'
           when w.user_id is null                                       then 'not_found'
           when w.used_today >= (select l.daily_generation_limit from daily_limit l)
                                                                        then 'daily_limit'
           else 'insufficient_tokens'
       end as outcome,
       coalesce(c.id, e.id) as id,
       coalesce(c.user_id, e.user_id) as user_id,
       coalesce(c.prompt, e.prompt) as prompt,
       coalesce(c.quality, e.quality) as quality,
       coalesce(c.cost, e.cost) as cost,
       coalesce(c.status, e.status) as status,
       coalesce(c.attempt, e.attempt) as attempt,
       coalesce(c.image_key, e.image_key) as image_key,
       coalesce(c.error, e.error) as error,
       coalesce(c.created_at, e.created_at) as created_at,
       coalesce(c.updated_at, e.updated_at) as updated_at,
       coalesce(c.finished_at, e.finished_at) as finished_at,
       coalesce((select s.balance from spent s),
                (select x.balance_after
                   from token_transactions x
                  where x.user_id = $1
                    and x.idempotency_key = 'generation:' || e.id),
                -- the spend of a device before its link into this account
                -- (the generation moved, its ledger row stayed): a repeat is
                -- answered as the first answer was
                (select x.balance_after
                   from users d
                   join token_transactions x on x.user_id = d.id
                  where d.linked_to_user_id = $1
                    and x.idempotency_key = 'generation:' || e.id),
                w.balance) as balance,
       (select p.cost from price p) as price,
       -- a daily limit lifts at the next UTC midnight
       ceil(extract(epoch from date_trunc('day', now() at time zone 'utc') + interval '1 day'
                               - (now() at time zone 'utc')))::integer as retry_after
  from (select) as one
  left join created c on true
  left join existing e on true
  left join wallet w on true
"""


async def create_generation(
    user_id: UUID, prompt: str, quality: str, idempotency_key: str, db: Executor = sql
) -> CreatedGeneration:
    """Spend the price of `quality` and queue a generation, in one statement.

    The same key again returns the first generation (replayed, with the
    balance right after its spend) and applies nothing; with another prompt
    or quality it is a Conflict. Refusals write nothing.
    """
    try:
        row = await db.fetchrow(CREATE_GENERATION, user_id, prompt, quality, idempotency_key)
    except Conflict as exc:
        if exc.constraint != GENERATIONS_IDEMPOTENCY_KEY:
            raise
        # a concurrent first use of this key won: this run finds and replays it
        row = await db.fetchrow(CREATE_GENERATION, user_id, prompt, quality, idempotency_key)
    assert row is not None  # the final select always yields its one row
    if row["outcome"] in REFUSALS:
        # A concurrent first use of this key may have spent the last tokens
        # (or the day's last generation) while this statement waited for the
        # wallet's lock: its snapshot predates that commit, so it saw no
        # generation under the key, and as it inserted nothing the unique
        # constraint could not tell it either. A refusal is therefore asked
        # once more, on a fresh snapshot: that replays the first use, or
        # refuses again (only a refusal pays this second round trip).
        row = await db.fetchrow(CREATE_GENERATION, user_id, prompt, quality, idempotency_key)
        assert row is not None
    outcome = row["outcome"]
    if outcome == "created":
        invalidate_balance(user_id)
        return CreatedGeneration(generation=_generation(row), balance=row["balance"], replayed=False)
    if outcome == "replayed":
        # perhaps our own spend after all: sql() retrying a statement that
        # committed, its answer lost with its connection, finds it here. The
        # cached balance is dropped as for a spend (a dict pop, no round trip)
        invalidate_balance(user_id)
        return CreatedGeneration(generation=_generation(row), balance=row["balance"], replayed=True)
    if outcome == "not_found":
        raise NotFound("User not found")
    if outcome == "device_linked":
        raise DeviceLinked("This device was linked into an account; sign in to use it")
    if outcome == "key_conflict":
        raise Conflict(
            "Idempotency key already used with a different prompt or quality",
            constraint=GENERATIONS_IDEMPOTENCY_KEY,
        )
    if outcome == "unknown_quality":
        raise InvalidRequest(f"Unknown quality {quality!r}")
    if outcome == "daily_limit":
        raise RateLimited("Daily generation limit reached", retry_after=max(1, row["retry_after"]))
    raise InsufficientTokens(balance=row["balance"], cost=row["price"])


# ---------------------------------------------------------------------- read

GET_GENERATION = """
select id, user_id, prompt, quality, cost, status, attempt, image_key, error,
       created_at, updated_at, finished_at
  from generations
 where id = $1
   and user_id = $2
"""


async def get_generation(user_id: UUID, generation_id: UUID, db: Executor = sql) -> Generation:
    """One of the user's generations; another user's is NotFound."""
    row = await db.fetchrow(GET_GENERATION, generation_id, user_id)
    if row is None:
        raise NotFound("Generation not found")
    return _generation(row)


LIST_GENERATIONS = """
-- name: list_generations
select id, user_id, prompt, quality, cost, status, attempt, image_key, error,
       created_at, updated_at, finished_at
  from generations
 where user_id = $1
 order by created_at desc, id desc
 limit $2
"""

# keyset on (created_at, id) after the `before` row; an unknown `before`
# (or another user's) gives an empty page
LIST_GENERATIONS_BEFORE = """
-- name: list_generations_before
select g.id, g.user_id, g.prompt, g.quality, g.cost, g.status, g.attempt, g.image_key, g.error,
       g.created_at, g.updated_at, g.finished_at
  from generations g
 where g.user_id = $1
   and (g.created_at, g.id) < (select b.created_at, b.id
                                 from generations b
                                where b.id = $3
                                  and b.user_id = $1)
 order by g.created_at desc, g.id desc
 limit $2
"""


async def list_generations(
    user_id: UUID, limit: int = 50, before: UUID | None = None, db: Executor = sql
) -> GenerationPage:
    """The user's generations, newest first; `before` is the previous page's
    `next_before`."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    # one row more than asked tells whether another page follows
    if before is None:
        rows = await db.fetch(LIST_GENERATIONS, user_id, limit + 1)
    else:
        rows = await db.fetch(LIST_GENERATIONS_BEFORE, user_id, limit + 1, before)
    items = [_generation(row) for row in rows[:limit]]
    next_before = items[-1].id if len(rows) > limit else None
    return GenerationPage(items=items, next_before=next_before)


# -------------------------------------------------------------------- worker

CLAIM_GENERATIONS = """
-- name: claim_generations
-- schema.sql's claim_generations(): the oldest pending rows move to processing
-- under a lease; the same claim id again, even while the first is running,
-- returns what it took and takes nothing more
select id, prompt, quality, attempt, lease_expires_at
  from claim_generations($1, $2, $3)
"""


async def claim_generations(
    limit: int, lease_seconds: int, claim_id: UUID, db: Executor = sql
) -> list[ClaimedGeneration]:
    """Take up to `limit` pending generations for `lease_seconds`; the same
    `claim_id` again returns the same rows."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    if lease_seconds <= 0:
        raise InvalidRequest("lease_seconds must be positive")
    rows = await db.fetch(CLAIM_GENERATIONS, limit, lease_seconds, claim_id)
    return [ClaimedGeneration.model_validate(dict(row)) for row in rows]


RECORD_RESULT = """
-- name: record_generation_result
-- The row lock makes duplicate results queue up: the first finishes the
-- generation (and refunds a failure), the rest find it finished and return
-- it unchanged. The refund moves the wallet and writes its ledger row here.
with target as (
    select g.id, g.user_id, g.prompt, g.quality, g.cost, g.status, g.attempt, g.image_key,
           g.error, g.created_at, g.updated_at, g.finished_at
      from generations g
     where g.id = $1
       for update
),
finished as (
    update generations g
       set status           = $2::text,
           image_key        = $3::text,
           error            = $4::text,
           lease_expires_at = null,
           finished_at      = now(),
           updated_at       = now()
      from target t
     where g.id = t.id
       and t.status in ('pending', 'processing')
       and g.status in ('pending', 'processing')
 returning g.id, g.user_id, g.prompt, g.quality, g.cost, g.status, g.attempt, g.image_key,
           g.error, g.created_at, g.updated_at, g.finished_at
),
refund as (
    update user_tokens w
       set balance      = w.balance + f.cost,
           -- a generation moved in by link_device was spent on the device's
           -- wallet: what this wallet never spent comes back as earned
           total_spent  = greatest(w.total_spent - f.cost, 0),
           total_earned = w.total_earned + greatest(f.cost - w.total_spent, 0),
           updated_at   = now()
      from finished f
     where w.user_id = f.user_id
       and f.status = 'failed'
       and not exists (select 1
                         from token_transactions x
                        where x.user_id = f.user_id
                          and x.idempotency_key = 'refund:' || f.id)
 returning w.user_id, w.balance, f.cost, f.id
),
refund_entry as (
    insert into token_transactions (user_id, amount, balance_after, type, description, reference,
                                    idempotency_key)
    select r.user_id, r.cost, r.balance, 'refund', 'Refund: generation failed', r.id::text,
           'refund:' || r.id
      from refund r
)
select f.*, exists (select 1 from refund) as refunded
  from finished f
 union all
select t.*, false
  from target t
 where not exists (select 1 from finished)
"""


async def record_result(
    generation_id: UUID, status: str, image_key: str | None, error: str | None, db: Executor = sql
) -> Generation:
    """The worker's result for a pending or processing generation; a failure
    refunds the cost once. A finished generation is returned unchanged."""
    if status not in RESULT_STATUSES:
        raise InvalidRequest("status must be 'succeeded' or 'failed'")
    if status == "succeeded" and not image_key:
        raise InvalidRequest("A succeeded result needs an image_key")
    if status == "succeeded":
        error = None
    else:
        image_key = None
    row = await db.fetchrow(RECORD_RESULT, generation_id, status, image_key, error)
    if row is None:
        raise NotFound("Generation not found")
    if row["refunded"]:
        invalidate_balance(row["user_id"])
    return _generation(row)


REAP_GENERATIONS = """
-- name: reap_generations
-- Leases that ran out go back to pending, or fail after the last attempt;
-- pending rows nobody took within the cut-off fail. Failures are refunded
-- here: one wallet update per user and one ledger row per generation, whose
-- balance_after is the running sum in insertion (id) order. Rows another run
-- or a result holds are skipped, and every update is guarded by the state it
-- leaves, so overlapping runs refund once. At most $4 rows of each kind, the
-- oldest first: a backlog of any size is taken in statements that finish
-- well inside the statement timeout, instead of one that never does.
with clock as (
    select coalesce($2::timestamptz, now()) as now
),
lapsed as (
    select g.id, g.attempt
      from generations g, clock c
     where g.status = 'processing'
       and g.lease_expires_at <= c.now
     order by g.lease_expires_at
     limit $4
       for update of g skip locked
),
stale as (
    -- pending since the cut-off: never taken, or returned and not taken again
    select g.id
      from generations g, clock c
     where g.status = 'pending'
       and g.created_at < c.now - $3::interval
       and g.updated_at < c.now - $3::interval
     order by g.created_at
     limit $4
       for update of g skip locked
),
requeued as (
    update generations g
       set status           = 'pending',
           lease_expires_at = null,
           claim_id         = null,
           updated_at       = now()
      from lapsed l
     where g.id = l.id
       and l.attempt < $1
       and g.status = 'processing'
 returning g.id
),
doomed as (
    select id, 'The generation did not finish after ' || attempt || ' attempts' as error
      from lapsed
     where attempt >= $1
     union all
    select id, 'No worker took the generation in time'
      from stale
),
failed as (
    update generations g
       set status           = 'failed',
           lease_expires_at = null,
           error            = d.error,
           finished_at      = now(),
           updated_at       = now()
      from doomed d
     where g.id = d.id
       and g.status in ('pending', 'processing')
 returning g.id, g.user_id, g.cost
),
refunds as (
    select f.id, f.user_id, f.cost,
           sum(f.cost) over (partition by f.user_id) as user_total,
           sum(f.cost) over (partition by f.user_id order by f.id) as running_total
      from failed f
     where not exists (select 1
                         from token_transactions x
                        where x.user_id = f.user_id
                          and x.idempotency_key = 'refund:' || f.id)
),
wallets as (
    update user_tokens w
       set balance      = w.balance + r.total,
           -- as in record_result: refunds of generations spent elsewhere
           -- (moved in by link_device) count as earned
           total_spent  = greatest(w.total_spent - r.total, 0),
           total_earned = w.total_earned + greatest(r.total - w.total_spent, 0),
           updated_at   = now()
      from (select user_id, sum(cost) as total from refunds group by user_id) r
     where w.user_id = r.user_id
 returning w.user_id, w.balance
),
refund_entries as (
    insert into token_transactions (user_id, amount, balance_after, type, description, reference,
                                    idempotency_key)
    select r.user_id, r.cost, w.balance - r.user_total + r.running_total, 'refund',
           'Refund: generation failed', r.id::text, 'refund:' || r.id
      from refunds r
      join wallets w on w.user_id = r.user_id
     order by r.user_id, r.id
)
select (select count(*) from requeued)::integer as returned,
       (select count(*) from failed)::integer as failed,
       array(select user_id from wallets) as refunded_users,
       (select count(*) from lapsed) = $4 or (select count(*) from stale) = $4 as more
"""


async def reap_generations(
    max_attempts: int = 3,
    pending_cutoff: timedelta = timedelta(minutes=15),
    now: datetime | None = None,
    batch_size: int = 1000,
    db: Executor = sql,
) -> ReapResult:
    """Return lapsed leases to the queue (up to `max_attempts`), and fail with
    a refund those out of attempts and those pending longer than
    `pending_cutoff`, at most `batch_size` of each, oldest first (`more`
    when a batch was full: call again). `now` defaults to the database's clock."""
    if max_attempts < 1:
        raise InvalidRequest("max_attempts must be at least 1")
    if batch_size < 1:
        raise InvalidRequest("batch_size must be at least 1")
    row = await db.fetchrow(REAP_GENERATIONS, max_attempts, now, pending_cutoff, batch_size)
    assert row is not None  # the final select always yields its one row
    for user_id in row["refunded_users"]:
        invalidate_balance(user_id)
    return ReapResult(returned=row["returned"], failed=row["failed"], more=row["more"])
