-- DreamLens schema: the whole of it, idempotent.
--
-- Applied by init_database() (database/migrations.py) inside one transaction
-- that holds an advisory lock; re-running it on an initialized database
-- changes nothing (every statement is "if not exists", "or replace", or a
-- seed insert that leaves existing rows alone, so prices and packages changed
-- in production survive).
--
-- Conventions:
--   * enum-like values are lowercase text guarded by a CHECK;
--   * tokens are integers, money is integer minor units (kopecks);
--   * every foreign key has an index; partial indexes serve the queries that
--     filter on a state (the worker queue, the payment reconciler);
--   * the ledger (token_transactions) is the truth: for every user the sum of
--     amounts equals user_tokens.balance and balance_after is the running sum
--     in id order. user_tokens.total_spent moves with `spend` and `refund`
--     rows, total_earned with every other type, so balance = earned - spent.

-- ---------------------------------------------------------------- catalogue

create table if not exists plans (
    id                      text primary key check (id ~ '^[a-z0-9_]+$'),
    name                    text not null,
    daily_generation_limit  integer not null check (daily_generation_limit >= 0)
);

insert into plans (id, name, daily_generation_limit) values
    ('free',    'Free',    20),
    ('pro',     'Pro',     200),
    ('premium', 'Premium', 1000)
on conflict (id) do nothing;

create table if not exists generation_prices (
    quality text primary key check (quality ~ '^[a-z0-9_]+$'),
    cost    integer not null check (cost > 0)
);

insert into generation_prices (quality, cost) values
    ('standard', 1),
    ('hd',       2)
on conflict (quality) do nothing;

create table if not exists token_packages (
    id          text primary key check (id ~ '^[a-z0-9_]+$'),
    kind        text not null check (kind in ('tokens', 'plan')),
    tokens      integer not null check (tokens >= 0),
    plan        text references plans (id),
    period_days integer check (period_days > 0),
    amount      bigint not null check (amount > 0),          -- minor units
    currency    text not null default 'RUB' check (currency ~ '^[A-Z]{3}$'),
    description text not null,
    active      boolean not null default true,
    sort_order  integer not null default 0,
    check ((kind = 'plan') = (plan is not null and period_days is not null))
);

create index if not exists token_packages_plan_idx on token_packages (plan);

insert into token_packages (id, kind, tokens, plan, period_days, amount, currency, description, sort_order) values
    ('tokens_50',     'tokens',  50, null,      null,   9900, 'RUB', '50 tokens',                     10),
    ('tokens_200',    'tokens', 200, null,      null,  29900, 'RUB', '200 tokens',                    20),
    ('pro_month',     'plan',   200, 'pro',       30,  49900, 'RUB', 'Pro for 30 days + 200 tokens',  30),
    ('premium_month', 'plan',  1000, 'premium',   30, 149900, 'RUB', 'Premium for 30 days + 1000 tokens', 40)
on conflict (id) do nothing;

-- -------------------------------------------------------------------- users

create table if not exists users (
    id                uuid primary key default gen_random_uuid(),
    clerk_id          text unique,
    device_id         text unique,
    email             text,
    signup_ip         inet,
    -- a device account linked into a Clerk account can no longer act alone
    linked_to_user_id uuid references users (id),
    linked_at         timestamptz,
    linked_tokens     integer check (linked_tokens >= 0),   -- what moved, reported on a repeat
    created_at        timestamptz not null default now(),
    check (num_nonnulls(clerk_id, device_id) = 1),
    check (device_id is null or device_id ~ '^[A-Za-z0-9_-]{8,128}$'),
    check ((linked_to_user_id is null) = (linked_at is null)),
    check (linked_to_user_id is null or device_id is not null)
);

create index if not exists users_linked_to_user_id_idx
    on users (linked_to_user_id) where linked_to_user_id is not null;

-- ------------------------------------------------------------ subscriptions

create table if not exists subscriptions (
    id                   uuid primary key default gen_random_uuid(),
    user_id              uuid not null references users (id),
    plan                 text not null references plans (id),
    status               text not null check (status in ('active', 'expired', 'canceled')),
    current_period_start timestamptz not null default now(),
    current_period_end   timestamptz not null,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now(),
    check (current_period_end > current_period_start)
);

create index if not exists subscriptions_user_id_idx on subscriptions (user_id);
create index if not exists subscriptions_plan_idx on subscriptions (plan);
-- at most one active plan per user
create unique index if not exists subscriptions_one_active_per_user
    on subscriptions (user_id) where status = 'active';
-- the expiry job scans only active rows by end date
create index if not exists subscriptions_active_period_end_idx
    on subscriptions (current_period_end) where status = 'active';

-- ------------------------------------------------------------------- wallet

create table if not exists user_tokens (
    user_id              uuid primary key references users (id),
    balance              integer not null default 0 check (balance >= 0),
    total_earned         integer not null default 0 check (total_earned >= 0),
    total_spent          integer not null default 0 check (total_spent >= 0),
    -- the daily generation counter lives on the row every spend locks, so
    -- the plan limit is decided exactly under concurrency
    generations_today    integer not null default 0 check (generations_today >= 0),
    generations_day      date,
    updated_at           timestamptz not null default now()
);

create table if not exists token_transactions (
    id              bigint generated always as identity primary key,
    user_id         uuid not null references users (id),
    amount          integer not null check (amount <> 0),
    balance_after   integer not null check (balance_after >= 0),
    type            text not null check (type in ('bonus', 'purchase', 'plan_grant', 'spend', 'refund',
                                                  'reversal', 'transfer_in', 'transfer_out', 'adjustment')),
    description     text,
    reference       text,
    -- a duplicate or retried write applies once: the key is unique per user
    idempotency_key text not null check (length(idempotency_key) between 1 and 200),
    created_at      timestamptz not null default now(),
    constraint token_transactions_idempotency_key unique (user_id, idempotency_key)
);

-- the ledger page (newest first, keyset on id) and the audit's running sum
create index if not exists token_transactions_user_id_id_idx on token_transactions (user_id, id desc);
create index if not exists token_transactions_created_at_idx on token_transactions (created_at);

-- -------------------------------------------------------------- generations

create table if not exists generations (
    id               uuid primary key default gen_random_uuid(),
    user_id          uuid not null references users (id),
    prompt           text not null check (length(prompt) between 1 and 2000),
    quality          text not null references generation_prices (quality),
    cost             integer not null check (cost > 0),
    status           text not null default 'pending'
                     check (status in ('pending', 'processing', 'succeeded', 'failed')),
    attempt          integer not null default 0 check (attempt >= 0),
    lease_expires_at timestamptz,
    image_key        text,
    error            text,
    idempotency_key  text check (length(idempotency_key) between 1 and 200),
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    finished_at      timestamptz,
    constraint generations_idempotency_key unique (user_id, idempotency_key),
    check (status <> 'succeeded' or image_key is not null),
    check ((status = 'processing') = (lease_expires_at is not null))
);

-- the worker's claim id: a claim retried after an unknown outcome returns the
-- rows that claim already took instead of taking a second batch
alter table generations add column if not exists claim_id uuid;

create index if not exists generations_user_id_created_at_idx on generations (user_id, created_at desc, id desc);
create index if not exists generations_quality_idx on generations (quality);
-- the table is the worker's queue: oldest pending first
create index if not exists generations_pending_idx on generations (created_at) where status = 'pending';
-- the lease reaper scans only processing rows by lease end
create index if not exists generations_processing_lease_idx
    on generations (lease_expires_at) where status = 'processing';
-- a repeated claim finds its own rows
create index if not exists generations_processing_claim_idx
    on generations (claim_id) where status = 'processing';

-- The worker's claim, as a function so that it may wait for a repeat of itself
-- and still see what that repeat took: a plpgsql statement takes its snapshot
-- when it starts, after the lock above it is held, where one SQL statement
-- would have taken its snapshot before the wait. A claim repeated with its
-- key while the first is still running (the worker's timeout was shorter than
-- the database's) then answers the first's batch instead of taking a second
-- one that nobody would report on until its lease ran out. The lock is the
-- transaction's (the statement's own, in autocommit), keyed by the claim id in
-- a key space of its own ("CLAI").
create or replace function claim_generations(batch_size integer, lease_seconds integer, claim uuid)
returns table (id uuid, prompt text, quality text, attempt integer, lease_expires_at timestamptz)
language plpgsql volatile as $$
#variable_conflict use_column
begin
    perform pg_advisory_xact_lock(1129070921, hashtext(claim::text));
    -- the table is the queue: the oldest pending rows no other worker holds
    -- move to processing under a lease; a claim id that already holds rows
    -- gets those back and takes nothing more
    return query
    with already as (
        select g.id, g.prompt, g.quality, g.attempt, g.lease_expires_at, g.created_at
          from generations g
         where g.status = 'processing'
           and g.claim_id = claim
    ),
    next as (
        select g.id
          from generations g
         where g.status = 'pending'
           and not exists (select 1 from already)
         order by g.created_at
         limit batch_size
           for update skip locked
    ),
    claimed as (
        update generations g
           set status           = 'processing',
               attempt          = g.attempt + 1,
               lease_expires_at = now() + lease_seconds * interval '1 second',
               claim_id         = claim,
               updated_at       = now()
          from next n
         where g.id = n.id
     returning g.id, g.prompt, g.quality, g.attempt, g.lease_expires_at, g.created_at
    )
    select t.id, t.prompt, t.quality, t.attempt, t.lease_expires_at
      from (select * from already
            union all
            select * from claimed) t
     order by t.created_at, t.id;
end
$$;

-- --------------------------------------------------------------- usage_logs

create table if not exists usage_logs (
    id         bigint generated always as identity primary key,
    user_id    uuid references users (id),
    action     text not null check (action in ('generation', 'download', 'signup')),
    source_ip  inet,
    reference  text,
    -- a keyed request (a download) is logged once per key (migration 0004)
    idempotency_key text,
    created_at timestamptz not null default now()
);

create index if not exists usage_logs_user_action_created_idx on usage_logs (user_id, action, created_at);
-- the anonymous signup limit counts by source address
create index if not exists usage_logs_signup_ip_created_idx
    on usage_logs (source_ip, created_at) where action = 'signup';
-- retention pruning walks the oldest rows
create index if not exists usage_logs_created_at_idx on usage_logs (created_at);

-- ----------------------------------------------------------------- payments

create table if not exists payments (
    id                  uuid primary key default gen_random_uuid(),
    user_id             uuid not null references users (id),
    package_id          text not null references token_packages (id),
    provider            text not null default 'yookassa' check (provider in ('yookassa')),
    provider_payment_id text unique,
    status              text not null default 'pending'
                        check (status in ('pending', 'waiting_for_capture', 'succeeded', 'canceled', 'refunded')),
    amount              bigint not null check (amount > 0),          -- minor units
    currency            text not null check (currency ~ '^[A-Z]{3}$'),
    tokens              integer not null check (tokens >= 0),
    -- the plan and period a plan package was priced with (null for tokens):
    -- the catalogue may change between the purchase and its credit or refund
    plan                text references plans (id),
    period_days         integer check (period_days > 0),
    confirmation_url    text,
    idempotency_key     text check (length(idempotency_key) between 1 and 200),
    refunded_amount     bigint not null default 0 check (refunded_amount >= 0),
    -- tokens a refund could not take back because they were already spent
    refund_shortfall    integer not null default 0 check (refund_shortfall >= 0),
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now(),
    paid_at             timestamptz,
    -- when the reconciler last asked YooKassa about it (migration 0003)
    reconciled_at       timestamptz,
    constraint payments_idempotency_key unique (user_id, idempotency_key)
);

create index if not exists payments_user_id_created_at_idx on payments (user_id, created_at desc);
create index if not exists payments_package_id_idx on payments (package_id);
create index if not exists payments_plan_idx on payments (plan);
-- the reconciler asks the provider about payments still open after a while
create index if not exists payments_open_created_at_idx
    on payments (created_at) where status in ('pending', 'waiting_for_capture');

-- Every provider refund applied to a payment, so each applies exactly once
-- even when it can take no tokens back (an empty wallet leaves no ledger
-- row to carry the key), and finance can see what each refund took.
create table if not exists payment_refunds (
    provider_refund_id text primary key,
    payment_id         uuid not null references payments (id),
    amount             bigint not null check (amount > 0),             -- minor units
    tokens_taken       integer not null check (tokens_taken >= 0),
    tokens_short       integer not null check (tokens_short >= 0),     -- already spent
    plan_taken         interval,     -- plan time taken back, on the plan then running (0007)
    created_at         timestamptz not null default now()
);

create index if not exists payment_refunds_payment_id_idx on payment_refunds (payment_id);

-- A payment keeps the plan and period its package had when it was made, as
-- it keeps its amount and tokens: the catalogue may change (without a
-- deploy) between a purchase and its credit or refund. Filled here rather
-- than by the insert so that every writer of payments gets it, code still
-- running from before the columns existed included.
create or replace function payments_keep_their_plan() returns trigger
language plpgsql as $$
begin
    if new.plan is null then
        select k.plan, k.period_days
          into new.plan, new.period_days
          from token_packages k
         where k.id = new.package_id
           and k.kind = 'plan';
    end if;
    return new;
end
$$;

create or replace trigger trigger_payments_keep_their_plan
    before insert on payments
    for each row execute function payments_keep_their_plan();

-- ------------------------------------------------------ plans bought on plans

-- Time on one plan becomes time on another at the two plans' prices per day
-- (migrations 0005 and 0007): a purchase or a link that meets a different
-- running plan keeps the higher plan and converts the other's time into it.

-- what a day of the plan costs now: its cheapest package on sale, else its
-- cheapest package ever (a retired plan), else nothing known
create or replace function plan_day_price(plan_id text) returns float8
language sql stable as $$
    select coalesce(
        (select min(k.amount::float8 / k.period_days)
           from token_packages k
          where k.plan = plan_id and k.kind = 'plan' and k.active),
        (select min(k.amount::float8 / k.period_days)
           from token_packages k
          where k.plan = plan_id and k.kind = 'plan'))
$$;

-- `span` of `from_plan`'s time as time on `to_plan`; unchanged between the
-- same plan, or when either price is unknown. Converted in seconds, so the
-- result is absolute time: days added across a clock change stay 24 hours.
create or replace function plan_time_in(from_plan text, to_plan text, span interval) returns interval
language sql stable as $$
    select case when from_plan = to_plan then span
                else make_interval(secs => extract(epoch from span)::float8
                                           * coalesce(plan_day_price(from_plan)
                                                      / nullif(plan_day_price(to_plan), 0), 1))
           end
$$;

-- a held plan (running until held_end, or already past it) and time added on
-- another: the plan kept (the added one when the held one has ended or has
-- the lower daily limit) and its new end, both times converted into it. A
-- held plan that is kept keeps its end as it is, not turned into time and back.
create or replace function plan_merge(held_plan text, held_end timestamptz, added_plan text, added_time interval)
returns table (plan text, period_end timestamptz)
language sql stable as $$
    with kept as (
        select case when held_end <= now()
                      or (select p.daily_generation_limit from plans p where p.id = added_plan)
                         > (select p.daily_generation_limit from plans p where p.id = held_plan)
                    then added_plan
                    else held_plan
               end as plan
    )
    select k.plan,
           case when k.plan = held_plan then greatest(held_end, now())
                else now() + plan_time_in(held_plan, k.plan, greatest(held_end, now()) - now())
           end
           + plan_time_in(added_plan, k.plan, added_time)
      from kept k
$$;

-- What each plan payment's grant added, so that its refund takes back that
-- and not the catalogue's price of today: the time, as time on the plan it
-- runs on (the payment's own plan, or the higher one it was converted into),
-- where that time lies on the plan's timeline (its grant put it last; a
-- conversion, a link or a refund of time before it moves it), and what
-- refunds took back. Of [starts_at, ends_at) the part before now is used:
-- what is left of the grant is ends_at - greatest(starts_at, now()).
create table if not exists plan_grants (
    payment_id  uuid primary key references payments (id),
    plan        text not null,                     -- a subscriptions.plan
    added       interval not null check (added > interval '0'),
    starts_at   timestamptz not null,
    ends_at     timestamptz not null,
    taken_back  interval not null default interval '0' check (taken_back >= interval '0'),
    created_at  timestamptz not null default now(),
    check (starts_at <= ends_at)
);

-- A running plan converted into another (plan_merge: a purchase, a link or
-- an activation of a higher plan) takes its grants with it: the part of each
-- one not yet used becomes time on the new plan, lying where its time now
-- lies. Grants already on the new plan (the one being made) are left alone.
create or replace function plan_grants_follow_their_plan() returns trigger
language plpgsql as $$
begin
    update plan_grants g
       set plan       = new.plan,
           added      = plan_time_in(old.plan, new.plan, g.added),
           taken_back = plan_time_in(old.plan, new.plan, g.taken_back),
           starts_at  = now() + plan_time_in(old.plan, new.plan, greatest(g.starts_at, now()) - now()),
           ends_at    = now() + plan_time_in(old.plan, new.plan, g.ends_at - now())
      from payments p
     where p.id = g.payment_id
       and p.user_id = new.user_id
       and g.plan = old.plan
       and g.ends_at > now();
    return null;
end
$$;

create or replace trigger subscriptions_take_their_grants_along
    after update of plan on subscriptions
    for each row
    when (old.plan is distinct from new.plan and old.status = 'active' and new.status = 'active')
    execute function plan_grants_follow_their_plan();

-- The plan time a refund takes back from `payer`'s running plan, as time on
-- that plan. Called by the refund's statement; each statement here takes
-- its own snapshot, so the plan is locked first and its grants read after:
-- a grant, a link or another refund committed meanwhile is seen, not
-- overwritten.
-- A payment's refunds take back in all the refunded share (share_after of
-- its amount) of what its grant added, never more than is left of it; the
-- grants after it move up by what is taken.
-- A payment granted before plan_grants existed has no record of where its
-- time lies. The share refunded now (share_after - share_before) of its
-- period comes out of the plan time that no grant covers, earliest first,
-- never out of a grant's: a month bought before the grants were recorded
-- that has run out costs nothing bought after it.
create or replace function plan_refund(payer uuid, refunded uuid, paid_plan text, paid_days integer,
                                       share_before float8, share_after float8)
returns interval
language plpgsql as $$
declare
    running    record;
    made       record;
    grant_row  record;
    taken      interval;
    cut        interval;
    wanted     interval;
    covered_to timestamptz;
    moment     timestamptz;
begin
    select s.id, s.plan, s.current_period_end into running
      from subscriptions s
     where s.user_id = payer
       and s.status = 'active'
       for update;
    if not found then
        return interval '0';   -- no plan running: the payment's time is used
    end if;
    -- what is left is what is left now, after the wait for the lock, not
    -- when the transaction began: of refunds that queued here, a later one
    -- would otherwise find time that the one before it saw used
    moment := clock_timestamp();

    select g.plan, g.added, g.starts_at, g.ends_at, g.taken_back into made
      from plan_grants g
     where g.payment_id = refunded
       for update;
    if found then
        taken := greatest(least(made.added * share_after - made.taken_back,
                                made.ends_at - greatest(made.starts_at, moment)),
                          interval '0');
        if taken <= interval '0' then
            return interval '0';
        end if;
        cut := plan_time_in(made.plan, running.plan, taken);
        update plan_grants
           set taken_back = taken_back + taken,
               ends_at    = greatest(ends_at - cut, starts_at)
         where payment_id = refunded;
        -- and the grants after it move up (with any refunded to nothing
        -- where it ends)
        update plan_grants g
           set starts_at = greatest(g.starts_at - cut, moment),
               ends_at   = greatest(g.ends_at - cut, moment)
          from payments p
         where p.id = g.payment_id
           and p.user_id = payer
           and g.payment_id <> refunded
           and g.ends_at >= made.ends_at;
    else
        wanted := plan_time_in(paid_plan, running.plan,
                               make_interval(days => paid_days) * (share_after - share_before));
        if wanted <= interval '0' then
            return interval '0';
        end if;
        -- walk the running grants in order, taking the time between them
        -- (and after the last) that none covers, until enough is taken;
        -- each grant moves up by what was taken before it
        cut := interval '0';
        covered_to := moment;
        for grant_row in
            select g.payment_id, greatest(g.starts_at, moment) as starts_at, g.ends_at
              from plan_grants g
              join payments p on p.id = g.payment_id
             where p.user_id = payer
               and g.ends_at > greatest(g.starts_at, moment)
             order by g.ends_at
        loop
            cut := cut + least(greatest(grant_row.starts_at - covered_to, interval '0'), wanted - cut);
            covered_to := greatest(covered_to, grant_row.ends_at);
            if cut > interval '0' then
                update plan_grants
                   set starts_at = greatest(starts_at - cut, moment),
                       ends_at   = greatest(ends_at - cut, moment)
                 where payment_id = grant_row.payment_id;
            end if;
        end loop;
        cut := cut + least(greatest(running.current_period_end - covered_to, interval '0'), wanted - cut);
        if cut <= interval '0' then
            return interval '0';
        end if;
    end if;

    -- when no paid time is left the plan ends now
    update subscriptions s
       set current_period_end = case when s.current_period_end - cut > moment
                                     then s.current_period_end - cut
                                     else least(s.current_period_end,
                                                greatest(moment,
                                                         s.current_period_start + interval '1 microsecond'))
                                end,
           status             = case when s.current_period_end - cut > moment
                                     then s.status
                                     else 'canceled'
                                end,
           updated_at         = now()
     where s.id = running.id;
    return cut;
end
$$;

-- --------------------------------------------------------- the welcome bonus

-- Every new user gets a wallet and the welcome bonus with its ledger row, in
-- the same transaction as the insert: 10 tokens for a Clerk user, 5 for an
-- anonymous device.
create or replace function initialize_new_user() returns trigger
language plpgsql as $$
declare
    welcome_bonus integer := case when new.clerk_id is not null then 10 else 5 end;
begin
    insert into user_tokens (user_id, balance, total_earned)
    values (new.id, welcome_bonus, welcome_bonus);

    insert into token_transactions (user_id, amount, balance_after, type, description, idempotency_key)
    values (new.id, welcome_bonus, welcome_bonus, 'bonus', 'Welcome bonus', 'welcome_bonus');

    return new;
end
$$;

create or replace trigger trigger_initialize_new_user
    after insert on users
    for each row execute function initialize_new_user();
