"""The ledger audit: the money invariants, checked for every user at once.

For every user: a wallet exists; the ledger's amounts add up to the balance;
balance = total_earned - total_spent; every ledger row's balance_after is the
running sum of amounts in id order; no balance, now or in the history, below
zero. `dreamlens audit` prints what this finds.

Every invariant is about one user's wallet and ledger, so the audit goes
through the users in batches of AUDIT_BATCH_USERS, in id order: one
statement lists a batch, one checks its books (each user's wallet and ledger
read in one snapshot). A statement's work is bounded by the batch, not by the
whole ledger, so the hourly job stays inside the statement timeout however
far the ledger grows (bench/audit.py).
"""

from __future__ import annotations

from uuid import UUID

from database import Executor, sql
from database.model import Model


class Violation(Model):
    user_id: UUID
    problem: str
    detail: str


AUDIT_BATCH_USERS = 1000

NEXT_USERS = """
-- name: next_users_to_audit
-- keyset over the primary key: a batch costs the same wherever it starts
-- (coalesce keeps the range usable by the index under a generic plan; the
-- nil UUID is never a user's, whose ids are gen_random_uuid()'s version 4)
select id
  from users
 where id > coalesce($1::uuid, '00000000-0000-0000-0000-000000000000'::uuid)
 order by id
 limit $2
"""

# $1 the batch's user ids
FIND_VIOLATIONS = """
-- name: find_ledger_violations
-- Set-based over one batch of users: one pass over their ledger rows (a
-- window function gives each row's running sum in id order, read through the
-- (user_id, id) index), folded to one row per user, then every check is a row
-- of a lateral VALUES list so each failed check reads as one violation. One
-- statement, so every check of a user sees the same snapshot.
with running as (
    select user_id, id, amount, balance_after,
           sum(amount) over (partition by user_id order by id) as running_sum
      from token_transactions
     where user_id = any($1::uuid[])
),
ledger as (
    select user_id,
           sum(amount) as total,
           min(running_sum) as lowest,
           count(*) filter (where balance_after <> running_sum) as out_of_step,
           (array_agg(format('id %s has balance_after %s, running sum %s', id, balance_after, running_sum)
                      order by id)
                filter (where balance_after <> running_sum))[1] as first_out_of_step
      from running
     group by user_id
)
select u.id as user_id, c.problem, c.detail
  from users u
  left join user_tokens t on t.user_id = u.id
  left join ledger l on l.user_id = u.id
 cross join lateral (values
       ('missing_wallet',
        t.user_id is null,
        'no user_tokens row'),
       ('ledger_sum',
        t.balance <> coalesce(l.total, 0),
        format('balance %s, ledger sum %s', t.balance, coalesce(l.total, 0))),
       ('totals',
        t.balance <> t.total_earned - t.total_spent,
        format('balance %s, total_earned %s - total_spent %s = %s',
               t.balance, t.total_earned, t.total_spent, t.total_earned - t.total_spent)),
       ('balance_after',
        l.out_of_step > 0,
        format('%s ledger rows out of step; first: %s', l.out_of_step, l.first_out_of_step)),
       ('negative_balance',
        t.balance < 0 or l.lowest < 0,
        format('balance %s, lowest running balance %s', t.balance, l.lowest))
       ) as c (problem, failed, detail)
 where u.id = any($1::uuid[])
   and c.failed
 order by u.id, c.problem
"""


async def find_violations(db: Executor = sql, batch_users: int = AUDIT_BATCH_USERS) -> list[Violation]:
    """Every broken invariant, by user; empty when the books balance.

    Users are audited `batch_users` at a time, two statements a batch; a
    user created meanwhile behind the batch under way waits for the next run."""
    violations: list[Violation] = []
    after = None
    while True:
        batch = [row["id"] for row in await db.fetch(NEXT_USERS, after, batch_users)]
        if not batch:
            return violations
        rows = await db.fetch(FIND_VIOLATIONS, batch)
        violations += [Violation.model_validate(dict(row)) for row in rows]
        if len(batch) < batch_users:
            return violations
        after = batch[-1]


COUNT_USERS = """
-- name: count_users
select count(*) from users
"""


async def count_users(db: Executor = sql) -> int:
    count: int = await db.fetchval(COUNT_USERS)
    return count
