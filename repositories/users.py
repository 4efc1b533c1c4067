"""Users: get-or-create by Clerk id or device id, and linking a device into a
Clerk account. The welcome bonus is granted by the database trigger on insert.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Any
from uuid import UUID

from database import (
    Conflict,
    DeviceLinked,
    Executor,
    InvalidRequest,
    NotFound,
    RateLimited,
    Transaction,
    invalidate_balance,
    run_in_transaction,
    sql,
)
from database.model import Model

# pg_advisory_xact_lock(namespace, key): the two-int form is a key space of its
# own, apart from the schema lock's single bigint; "SIGN"
SIGNUP_LOCK_NAMESPACE = 0x5349474E

# A Clerk account receives the welcome bonus of one linked device at most:
# every later device keeps this much of its balance (its own welcome bonus).
DEVICE_BONUS_KEPT = 5


class User(Model):
    id: UUID
    clerk_id: str | None
    device_id: str | None
    email: str | None
    created_at: datetime
    linked_to_user_id: UUID | None
    created: bool = False


class LinkResult(Model):
    user: User
    moved_tokens: int


def _user(row: Any) -> User:
    return User(
        id=row["id"],
        clerk_id=row["clerk_id"],
        device_id=row["device_id"],
        email=row["email"],
        created_at=row["created_at"],
        linked_to_user_id=row["linked_to_user_id"],
        created=row["created"],
    )


GET_USER = """
-- name: get_user
select id, clerk_id, device_id, email, created_at, linked_to_user_id, false as created
  from users
 where id = $1
"""


async def get_user(user_id: UUID, db: Executor = sql) -> User:
    row = await db.fetchrow(GET_USER, user_id)
    if row is None:
        raise NotFound("No such user")
    return _user(row)


class BalanceAndPlan(Model):
    balance: int
    plan: str


GET_BALANCE_AND_PLAN = """
-- name: get_balance_and_plan
-- what GET /api/user adds to the caller, in one statement: the wallet as it
-- is now (never the display cache) and the active, unexpired plan, else free
select t.balance,
       coalesce((select s.plan
                   from subscriptions s
                  where s.user_id = t.user_id
                    and s.status = 'active'
                    and s.current_period_end > now()), 'free') as plan
  from user_tokens t
 where t.user_id = $1
"""


async def get_balance_and_plan(user_id: UUID, db: Executor = sql) -> BalanceAndPlan:
    """The user's balance, read fresh, and plan id (`free` without an active one)."""
    row = await db.fetchrow(GET_BALANCE_AND_PLAN, user_id)
    if row is None:
        raise NotFound("No such user")
    return BalanceAndPlan(balance=row["balance"], plan=row["plan"])


GET_OR_CREATE_CLERK_USER = """
-- name: get_or_create_clerk_user
-- One round trip and no write when the user exists: the insert runs only when
-- this statement's snapshot shows no such user. When a concurrent insert of
-- the same clerk id wins, "on conflict do nothing" waits for it and returns
-- nothing, and the snapshot cannot see the winner: the caller runs this once more.
with existing as (
    select id, clerk_id, device_id, email, created_at, linked_to_user_id, false as created
      from users
     where clerk_id = $1
),
inserted as (
    insert into users (clerk_id, email)
    select $1, $2
     where not exists (select 1 from existing)
        on conflict (clerk_id) do nothing
 returning id, clerk_id, device_id, email, created_at, linked_to_user_id, true as created
)
select * from existing
 union all
select * from inserted
"""


async def get_or_create_clerk_user(clerk_id: str, email: str | None = None, db: Executor = sql) -> User:
    """The Clerk user, created (with the welcome bonus) on first sight.

    The email is recorded when the user is created and not updated after.
    """
    if not clerk_id:
        raise InvalidRequest("clerk id is empty")
    for _ in range(2):
        row = await db.fetchrow(GET_OR_CREATE_CLERK_USER, clerk_id, email)
        if row is not None:
            return _user(row)
    raise Conflict("The user is being created by another request; try again")


GET_CLERK_USER = """
-- name: get_clerk_user
select id, clerk_id, device_id, email, created_at, linked_to_user_id, false as created
  from users
 where clerk_id = $1
"""


async def find_clerk_user(clerk_id: str, db: Executor = sql) -> User | None:
    """The Clerk user if it was ever seen, else None: never creates one."""
    row = await db.fetchrow(GET_CLERK_USER, clerk_id)
    return None if row is None else _user(row)


GET_DEVICE_USER = """
-- name: get_device_user
select id, clerk_id, device_id, email, created_at, linked_to_user_id, false as created
  from users
 where device_id = $1
"""


async def find_device_user(device_id: str, db: Executor = sql) -> User | None:
    """The device's user if it was ever seen, else None: never creates one.
    Raises DeviceLinked for a device that was linked into a Clerk account."""
    row = await db.fetchrow(GET_DEVICE_USER, device_id)
    return None if row is None else _active_device(row)


# $1 the lock namespace, $2 the signup network
LOCK_SIGNUPS_FROM_NETWORK = """
-- name: lock_signups_from_network
-- transaction-scoped, so it is released at commit and holds behind PgBouncer
-- in transaction mode (a session lock would stay with the server connection).
-- Keyed by the network's address: an IPv4 /32 keys as its address did before
-- networks were counted, so old and new code lock alike during a deploy.
select pg_advisory_xact_lock($1, hashtext(host($2::cidr)))
"""

# $1 device id, $2 source ip (null: a local call, no limit), $3 signups
# allowed per hour, $4 the signup network of $2 (null with it)
SIGN_UP_DEVICE = """
-- name: sign_up_device
-- Runs after this network's advisory lock is taken (a statement of its own,
-- so this statement's snapshot is newer than the lock): the count sees every
-- signup from the network committed before us, and no other can commit until
-- we do, so the limit is exact however many new devices arrive at once.
-- Time is statement_timestamp(), not now(): now() is when the transaction
-- began, before the wait for the lock, and may precede the very signups this
-- counts (a retry_after longer than the window).
with existing as (
    select id, clerk_id, device_id, email, created_at, linked_to_user_id, false as created
      from users
     where device_id = $1
),
recent as (
    select count(*) as signups,
           min(created_at) as oldest
      from usage_logs
     where action = 'signup'
       -- <<= decides; the two bounds around it let the (source_ip, created_at)
       -- index find the network in a generic plan too (a prepared statement
       -- reused), as the planner derives such bounds from <<= only for a literal
       and source_ip >= $4::cidr
       and source_ip <= set_masklen(broadcast($4::cidr), -1)
       and source_ip <<= $4::cidr
       and created_at > statement_timestamp() - interval '1 hour'
),
inserted as (
    insert into users (device_id, signup_ip)
    select $1, $2::inet
      from recent
     where ($2 is null or recent.signups < $3)
       and not exists (select 1 from existing)
        on conflict (device_id) do nothing
 returning id, clerk_id, device_id, email, created_at, linked_to_user_id, true as created
),
logged as (
    insert into usage_logs (user_id, action, source_ip, created_at)
    select id, 'signup', $2, statement_timestamp()
      from inserted
)
select u.id, u.clerk_id, u.device_id, u.email, u.created_at, u.linked_to_user_id, u.created,
       ($2 is not null and r.signups >= $3) as refused,
       -- seconds until the oldest counted signup leaves the window
       ceil(extract(epoch from coalesce(r.oldest + interval '1 hour' - statement_timestamp(),
                                    interval '1 hour')))::integer
           as retry_after
  from recent r
  left join (select * from existing union all select * from inserted) u on true
"""


def _active_device(row: Any) -> User:
    if row["linked_to_user_id"] is not None:
        raise DeviceLinked("This device was linked into an account; sign in to that account")
    return _user(row)


def _host(source_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # API Gateway samples carry "1.2.3.4/32": keep the address, drop the mask
    try:
        address = ipaddress.ip_interface(source_ip.strip()).ip
    except ValueError as exc:
        raise InvalidRequest("source ip is not an IP address") from exc
    # ::ffff:1.2.3.4 is how a dual-stack socket reports an IPv4 client: it is
    # stored and counted as 1.2.3.4
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# An IPv6 client is given a whole /64 and its privacy addresses rotate inside
# it: counted per address, one client could farm welcome bonuses.
SIGNUP_PREFIX = {4: 32, 6: 64}


def _signup_network(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network the signup limit counts: the address itself for IPv4, its /64 for IPv6."""
    return ipaddress.ip_network((address, SIGNUP_PREFIX[address.version]), strict=False)


async def get_or_create_device_user(
    device_id: str, source_ip: str | None, signups_per_ip_per_hour: int, db: Executor = sql
) -> User:
    """The anonymous user of a device, created (with the welcome bonus) on first sight.

    A known device costs one round trip. A new one is created only while its
    source's signup network (an IPv4 address, IPv4-mapped ones included, or an
    IPv6 address's /64) has made fewer than `signups_per_ip_per_hour` signups
    in the last hour (RateLimited otherwise); `source_ip` None (a local call)
    has no limit. The signup row and the user keep the exact address.
    Raises DeviceLinked for a device that was linked into a Clerk account.
    """
    known = await find_device_user(device_id, db)
    if known is not None:
        return known
    host = _host(source_ip) if source_ip is not None else None
    network = _signup_network(host) if host is not None else None

    async def sign_up(tx: Executor) -> Any:
        if network is not None:
            await tx.execute(LOCK_SIGNUPS_FROM_NETWORK, SIGNUP_LOCK_NAMESPACE, network)
        for _ in range(2):
            result = await tx.fetchrow(SIGN_UP_DEVICE, device_id, host, signups_per_ip_per_hour, network)
            if result is not None and (result["id"] is not None or result["refused"]):
                return result
            # allowed, yet no row: a concurrent insert of this device (from
            # another address) won, and the next statement's snapshot sees it
        raise Conflict("The device is being registered by another request; try again")

    # inside a caller's transaction the lock is held until the caller commits
    result = await sign_up(db) if isinstance(db, Transaction) else await run_in_transaction(sign_up)
    if result["id"] is None:
        raise RateLimited(
            "Too many new anonymous users from this address; try again later",
            retry_after=max(1, result["retry_after"]),
        )
    return _active_device(result)


# $1 device id
LOCK_LINK_DEVICE_ROWS = """
-- name: lock_link_device_rows
-- The device's payments and generations, before the users and wallets
-- below. YooKassa's word on a payment takes its row, then its wallet
-- (apply_provider_status, apply_refund); a failed generation's result (and
-- the reaper) takes the generation, then its wallet. The link moves both
-- after taking the wallets, so without this each side held what the other
-- waited for: a deadlock, which PostgreSQL breaks after a second by failing
-- one of them. (A CTE that is a plain SELECT runs only when referenced: the
-- counts make both run, payments first.)
with device as (
    select u.id
      from users u
     where u.device_id = $1
),
device_payments as (
    select p.id
      from payments p
     where p.user_id in (select id from device)
     order by p.id
       for update
),
device_generations as (
    select g.id
      from generations g
     where g.user_id in (select id from device)
     order by g.id
       for update
)
select (select count(*) from device_payments) as payments,
       (select count(*) from device_generations) as generations
"""

# $1 Clerk user id, $2 device id
LOCK_LINK_PARTIES = """
-- name: lock_link_parties
-- Both users and both wallets, locked in user id order so that two links
-- sharing a user (two devices into one account, or one device twice) queue
-- instead of deadlocking. A locking read returns the latest committed rows,
-- so a link that committed while we waited shows up here as linked.
-- "no key update" is what the updates below take anyway, and unlike
-- "for update" it lets inserts that reference these users go on meanwhile.
select u.id, u.clerk_id, u.device_id, u.email, u.created_at, u.linked_to_user_id,
       u.linked_tokens, false as created
  from users u
  join user_tokens t on t.user_id = u.id
 where u.id = $1
    or u.device_id = $2
 order by u.id
   for no key update of u, t
"""

# $1 Clerk user id, $2 device user id
LOCK_LINK_PLANS = """
-- name: lock_link_plans
-- The active plans of both, so that the expiry job cannot end one between
-- the move's snapshot and its update (it waits, then finds the plan moved
-- or extended). Taken after the wallets: a purchase takes its wallet before
-- its plan, so the two queue on the wallet.
select id
  from subscriptions
 where user_id in ($1, $2)
   and status = 'active'
 order by id
   for update
"""

# $1 Clerk user id, $2 device user id, $3 tokens the device keeps when the
# account already has a linked device
MOVE_DEVICE_INTO_ACCOUNT = """
-- name: move_device_into_account
-- One statement, run while both users, wallets and active plans are locked
-- (this statement's snapshot is newer than the locks): what moves, both
-- wallets with their ledger rows, the device's generations, payments and
-- plan, and the link mark.
with moving as (
    -- the account gets the welcome bonus of its first linked device only;
    -- any later device keeps up to its own bonus
    select t.balance - case when exists (select 1 from users where linked_to_user_id = $1)
                            then least($3, t.balance) else 0 end as amount
      from user_tokens t
     where t.user_id = $2
),
device_wallet as (
    update user_tokens t
       set balance = t.balance - m.amount,
           total_earned = t.total_earned - m.amount,
           updated_at = now()
      from moving m
     where t.user_id = $2
       and m.amount > 0
 returning t.balance
),
device_entry as (
    insert into token_transactions
           (user_id, amount, balance_after, type, description, reference, idempotency_key)
    select $2, -m.amount, d.balance, 'transfer_out', 'Moved into the linked account', $1::text,
           'link:' || $2::text
      from device_wallet d, moving m
),
account_wallet as (
    update user_tokens t
       set balance = t.balance + m.amount,
           total_earned = t.total_earned + m.amount,
           updated_at = now()
      from moving m
     where t.user_id = $1
       and m.amount > 0
 returning t.balance
),
account_entry as (
    insert into token_transactions
           (user_id, amount, balance_after, type, description, reference, idempotency_key)
    select $1, m.amount, a.balance, 'transfer_in', 'Moved from a linked device', $2::text,
           'link:' || $2::text
      from account_wallet a, moving m
),
generations_moved as (
    -- The keys go along: an app that lost the answer to a spend and repeats
    -- it as the account after the link (the device now answers 403) must be
    -- answered the spend made, not charged again. Keys are unique per user,
    -- so one the account has used itself is dropped; no spend of the
    -- account can add one meanwhile, as a spend shares the user row this
    -- link holds.
    update generations g
       set user_id = $1,
           idempotency_key = case when exists (select 1
                                                 from generations a
                                                where a.user_id = $1
                                                  and a.idempotency_key = g.idempotency_key)
                                  then null else g.idempotency_key end,
           updated_at = now()
     where g.user_id = $2
),
payments_moved as (
    -- as for generations: a payment repeated as the account is the same one
    update payments p
       set user_id = $1,
           idempotency_key = case when exists (select 1
                                                 from payments a
                                                where a.user_id = $1
                                                  and a.idempotency_key = p.idempotency_key)
                                  then null else p.idempotency_key end,
           updated_at = now()
     where p.user_id = $2
),
device_plan as (
    -- a plan bought on the device is paid time: it goes with the device's
    -- payments (a refund of one of them then shortens the plan it paid for)
    select s.id, s.plan, s.current_period_end, s.current_period_end - now() as time_left
      from subscriptions s
     where s.user_id = $2
       and s.status = 'active'
       and s.current_period_end > now()
),
account_plan as (
    -- active, though perhaps past its end (the expiry job not yet run): the
    -- account can hold one active plan only
    select s.id
      from subscriptions s
     where s.user_id = $1
       and s.status = 'active'
),
plan_moved as (
    -- the account has no plan: the device's becomes its own
    update subscriptions s
       set user_id = $1, updated_at = now()
      from device_plan d
     where s.id = d.id
       and not exists (select 1 from account_plan)
),
plan_merged as (
    -- both have one: the account keeps one plan, the higher of the two (or
    -- the device's, when the account's has run out), and what was left of
    -- the device's time is added, converted at the plans' prices, as a
    -- purchase during a plan is (plan_merge)
    update subscriptions s
       set (plan, current_period_end) = (
               select m.plan, m.period_end
                 from plan_merge(s.plan, s.current_period_end, d.plan, d.time_left) m),
           updated_at = now()
      from device_plan d, account_plan a
     where s.id = a.id
    returning s.plan, s.current_period_end
),
device_grants_moved as (
    -- the device's time now comes after the account's: the part of each of
    -- its grants not yet used lies as long before the merged plan's end as
    -- it did before the device plan's end, converted into the plan kept.
    -- (The account's own grants, when its plan was converted, are the
    -- trigger's: plan_grants_follow_their_plan.)
    update plan_grants g
       set plan       = m.plan,
           added      = plan_time_in(g.plan, m.plan, g.added),
           taken_back = plan_time_in(g.plan, m.plan, g.taken_back),
           starts_at  = m.current_period_end
                        - plan_time_in(g.plan, m.plan, d.current_period_end - greatest(g.starts_at, now())),
           ends_at    = m.current_period_end
                        - plan_time_in(g.plan, m.plan, d.current_period_end - g.ends_at)
      from device_plan d, plan_merged m, payments p
     where p.id = g.payment_id
       and p.user_id = $2
       and g.ends_at > now()
),
device_plan_ended as (
    update subscriptions s
       set status             = 'canceled',
           current_period_end = greatest(now(), s.current_period_start + interval '1 microsecond'),
           updated_at         = now()
      from device_plan d
     where s.id = d.id
       and exists (select 1 from account_plan)
),
linked as (
    update users u
       set linked_to_user_id = $1, linked_at = now(), linked_tokens = m.amount
      from moving m
     where u.id = $2
)
select amount from moving
"""


async def link_device(clerk_user_id: UUID, device_id: str) -> LinkResult:
    """Move an anonymous device's account into a Clerk account, once.

    Its tokens move as a transfer_out / transfer_in pair keyed
    `link:<device user id>`, its generations and payments change owner, its
    active plan becomes the account's (when the account has one too, the
    account keeps the higher plan, extended by the device plan's time left),
    and the device can no longer act alone. Linking it again into the same account
    reports what moved the first time; into another account is a Conflict.
    """

    async def link(tx: Transaction) -> tuple[LinkResult, UUID]:
        await tx.fetch(LOCK_LINK_DEVICE_ROWS, device_id)
        rows = await tx.fetch(LOCK_LINK_PARTIES, clerk_user_id, device_id)
        account = next((r for r in rows if r["id"] == clerk_user_id), None)
        device = next((r for r in rows if r["device_id"] == device_id), None)
        if account is None:
            raise NotFound("No such account")
        if account["clerk_id"] is None:
            raise InvalidRequest("A device can be linked only into a signed-in (Clerk) account")
        if device is None:
            raise NotFound("No such device")
        if device["linked_to_user_id"] == clerk_user_id:
            return LinkResult(user=_user(account), moved_tokens=device["linked_tokens"]), device["id"]
        if device["linked_to_user_id"] is not None:
            raise Conflict("This device is linked to another account")
        await tx.fetch(LOCK_LINK_PLANS, clerk_user_id, device["id"])
        moved: int = await tx.fetchval(
            MOVE_DEVICE_INTO_ACCOUNT, clerk_user_id, device["id"], DEVICE_BONUS_KEPT
        )
        return LinkResult(user=_user(account), moved_tokens=moved), device["id"]

    # invalidated after commit: a display read before it could cache the old balance
    result, device_user_id = await run_in_transaction(link)
    invalidate_balance(clerk_user_id)
    invalidate_balance(device_user_id)
    return result
