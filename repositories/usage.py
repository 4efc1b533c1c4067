"""usage_logs: what users did and from where, for rate limits and retention.

Counting is served by the indexes in schema.sql: per user by
(user_id, action, created_at); anonymous signups per source address by the
partial index on (source_ip, created_at) where action = 'signup', which the
planner can use only when the query names 'signup' literally, hence a
statement of its own. The daily generation limit is not counted here: it is
decided on the wallet row by the spend (repositories/generations.py), with
the limit per plan from the `plans` table.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from database import Executor, InvalidRequest, sql

ACTIONS = frozenset({"generation", "download", "signup"})

LOG_USAGE = """
insert into usage_logs (user_id, action, source_ip, reference)
values ($1, $2, $3::inet, $4)
"""


LOG_USAGE_ONCE = """
-- name: log_usage_once
-- The same request again (the client's Idempotency-Key, or sql() retrying a
-- statement whose commit it did not hear of) finds its row and adds none; a
-- key reused for another reference (another generation) is another request.
-- The user's rows of the action are reached through (user_id, action, created_at).
-- Two requests with one key at the same instant may both be logged: a usage
-- row moves no tokens, and a unique index would lock the table to build.
insert into usage_logs (user_id, action, source_ip, reference, idempotency_key)
select $1, $2, $3::inet, $4, $5
 where not exists (select 1
                     from usage_logs
                    where user_id = $1
                      and action = $2
                      and idempotency_key = $5
                      and reference is not distinct from $4)
"""


async def log_usage(
    user_id: UUID | None,
    action: str,
    source_ip: str | None,
    reference: str | None = None,
    key: str | None = None,
    db: Executor = sql,
) -> None:
    """Record one action; with a `key`, once per user, action, key and reference.
    `source_ip` is an address ("203.0.113.7", "::1"); a malformed one is an
    InvalidRequest."""
    if action not in ACTIONS:
        raise InvalidRequest(f"Unknown usage action {action!r}")
    if key is None:
        await db.execute(LOG_USAGE, user_id, action, source_ip, reference)
    else:
        await db.execute(LOG_USAGE_ONCE, user_id, action, source_ip, reference, key)


COUNT_USAGE_BY_USER = """
-- name: count_usage_by_user
select count(*)
  from usage_logs
 where user_id = $1
   and action = $2
   and created_at >= $3
   and ($4::inet is null or source_ip = $4::inet)
"""

COUNT_SIGNUPS_BY_IP = """
-- name: count_signups_by_ip
select count(*)
  from usage_logs
 where action = 'signup'
   and source_ip = $1::inet
   and created_at >= $2
"""

# other actions by address alone are rare (abuse checks): the created_at
# index bounds the scan to the window
COUNT_USAGE_BY_IP = """
-- name: count_usage_by_ip
select count(*)
  from usage_logs
 where created_at >= $3
   and action = $1
   and source_ip = $2::inet
"""

COUNT_USAGE = """
-- name: count_usage
select count(*)
  from usage_logs
 where created_at >= $2
   and action = $1
"""


async def count_usage(
    action: str,
    since: datetime,
    user_id: UUID | None = None,
    source_ip: str | None = None,
    db: Executor = sql,
) -> int:
    """How many `action` rows since `since`, for a user and/or a source address
    (neither: everyone's)."""
    if action not in ACTIONS:
        raise InvalidRequest(f"Unknown usage action {action!r}")
    count: int
    if user_id is not None:
        count = await db.fetchval(COUNT_USAGE_BY_USER, user_id, action, since, source_ip)
    elif source_ip is not None and action == "signup":
        count = await db.fetchval(COUNT_SIGNUPS_BY_IP, source_ip, since)
    elif source_ip is not None:
        count = await db.fetchval(COUNT_USAGE_BY_IP, action, source_ip, since)
    else:
        count = await db.fetchval(COUNT_USAGE, action, since)
    return count


PRUNE_USAGE = """
-- name: prune_usage
-- one bounded batch so a large backlog never holds locks for long; rows a
-- concurrent prune holds are left to it
with doomed as (
    select id
      from usage_logs
     where created_at < $1
     order by created_at
     limit $2
       for update skip locked
),
deleted as (
    delete from usage_logs
     where id in (select id from doomed)
 returning 1
)
select count(*) from deleted
"""


async def prune_usage(older_than: datetime, batch_size: int = 5000, db: Executor = sql) -> int:
    """Delete at most `batch_size` rows created before `older_than`; how many.
    The scheduled job calls it until it returns 0."""
    if batch_size <= 0:
        raise InvalidRequest("batch_size must be positive")
    deleted: int = await db.fetchval(PRUNE_USAGE, older_than, batch_size)
    return deleted
