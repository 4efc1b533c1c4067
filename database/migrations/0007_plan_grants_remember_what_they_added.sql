-- A refund of a plan payment took back the package's period priced from the
-- catalogue at the refund, and took it whether or not the payment's time had
-- already been used: refunding a plan that had run out cut the plan bought
-- after it. Each grant now records what it added and where its time lies
-- (plan_grants; schema.sql has the same), every change of the plan's
-- timeline moves it along, and a refund takes back the refunded share of
-- what the grant added, never more than is left of it. The months of plans
-- still running that were credited before are recorded at the end.
-- plan_time_in and plan_merge convert in seconds, and a plan kept keeps its
-- end as it is, so no end moves by an hour across a clock change.
-- The new table's reference to payments and the new column hold short locks;
-- never wait long for them behind a transaction in flight.
set local lock_timeout = '5s';

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

-- the plan time each refund took back, as time on the plan then running
alter table payment_refunds add column if not exists plan_taken interval;

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

-- Plan payments credited before this migration have no grant recorded. Each
-- one of a plan still running gets one now, so that its refunds too take
-- back only its own time. Where each month's time lies is found by playing
-- the plan's history again, as the code before this migration wrote it:
-- - a credit (at paid_at) puts the month's period last on its payer's plan,
--   or starts the plan when none runs; a higher plan converts what is left
--   of the one held (plan_merge);
-- - a refund (at its payment_refunds.created_at) took the refunded share of
--   the period off the plan's end, whether or not the month was used: it is
--   played as taking what the month had left first, the rest from the end;
-- - a link (at linked_at, its transaction's start: a device's credit that
--   committed while the link waited counts as before it) put what was left
--   of the device's plan after the account's, converted into the plan
--   kept, or made it the account's.
-- A month paid on a device is told apart by its credit's ledger row, which
-- the link left with the device (a package with no tokens has none: the
-- link cleared its payment's idempotency key, which the API always sets,
-- and stamped its updated_at with linked_at).
-- Time given with no payment (activate_plan) is not in that history: time
-- the months do not cover is left to no grant, and a month played past the
-- plan's end is cut at it. No credit or refund moves a plan meanwhile: the
-- trigger and the foreign key above already hold subscriptions and payments
-- against every writer (a row lock here would only wait for a link holding
-- its plan, which waits for those: a deadlock).
create temporary table plan_replay_timelines (
    id       uuid primary key,      -- the user whose plan it is (an account or a device)
    plan     text not null,
    ends_at  timestamptz not null
) on commit drop;

create temporary table plan_replay_months (
    payment_id uuid primary key,
    timeline   uuid not null,       -- the plan the month's time lies on now
    plan       text not null,
    starts_at  timestamptz not null,
    ends_at    timestamptz not null
) on commit drop;

-- Time on `added_plan` added at `at_time` to the plan running on
-- `on_timeline`: the plan kept, by plan_merge's rule (the higher daily
-- limit; the one held on a tie). When that is the added one, what is left of
-- the held plan, and of each of its months, is converted into it.
create function pg_temp.plan_replay_keep(on_timeline uuid, at_time timestamptz, added_plan text)
returns text
language plpgsql as $$
declare
    held_plan text;
begin
    select t.plan into held_plan from plan_replay_timelines t where t.id = on_timeline;
    if not coalesce((select p.daily_generation_limit from plans p where p.id = added_plan)
                    > (select p.daily_generation_limit from plans p where p.id = held_plan), false) then
        return held_plan;
    end if;
    update plan_replay_months m
       set plan      = added_plan,
           starts_at = at_time + plan_time_in(m.plan, added_plan, greatest(m.starts_at, at_time) - at_time),
           ends_at   = at_time + plan_time_in(m.plan, added_plan, m.ends_at - at_time)
     where m.timeline = on_timeline
       and m.ends_at > at_time;
    update plan_replay_timelines t
       set plan    = added_plan,
           ends_at = at_time + plan_time_in(t.plan, added_plan, t.ends_at - at_time)
     where t.id = on_timeline;
    return added_plan;
end
$$;

do $replay$
declare
    happening record;
    held      record;
    device    record;
    refunded  record;
    cut       interval;
    kept      text;
    added     interval;
    merged_to timestamptz;
begin
    for happening in
        with running as (
            select s.user_id
              from subscriptions s
             where s.status = 'active'
               and s.current_period_end > now()
        ),
        paid as (
            select p.id, p.user_id as account, p.plan, p.amount,
                   make_interval(days => p.period_days) as period, p.paid_at,
                   coalesce(d.id, p.user_id) as payer, d.linked_at
              from payments p
              join running r on r.user_id = p.user_id
              left join lateral (
                  select u.id, u.linked_at
                    from users u
                   where u.linked_to_user_id = p.user_id
                     and (exists (select 1
                                    from token_transactions x
                                   where x.user_id = u.id
                                     and x.idempotency_key = 'payment:' || p.id)
                          or (p.tokens = 0 and p.idempotency_key is null
                              and u.created_at <= p.created_at and u.linked_at >= p.paid_at))
                   -- the link stamped the payments it moved with its time
                   order by p.updated_at = u.linked_at desc, u.linked_at
                   limit 1
              ) d on true
             where p.plan is not null
               and p.status in ('succeeded', 'refunded')
               and p.paid_at is not null
        )
        -- a device's credit that committed while its link waited for the
        -- payment (linked_at is the link's transaction start) was before it
        select 'credit' as kind, least(p.paid_at, p.linked_at - interval '1 microsecond') as at,
               p.account, p.payer as timeline, p.id as payment_id,
               p.plan, p.period as span
          from paid p
        union all
        -- each refund's share of the period, counted cumulatively as the refund did
        select 'refund', r.created_at, p.account,
               case when r.created_at < p.linked_at then p.payer else p.account end,
               p.id, p.plan,
               p.period * ((least(p.amount, r.through) - least(p.amount, r.through - r.amount))::float8
                           / p.amount)
          from paid p
          join (select x.payment_id, x.amount, x.created_at,
                       sum(x.amount) over (partition by x.payment_id
                                           order by x.created_at, x.provider_refund_id) as through
                  from payment_refunds x) r on r.payment_id = p.id
        union all
        select 'link', u.linked_at, u.linked_to_user_id, u.id, null, null, null
          from users u
          join running r on r.user_id = u.linked_to_user_id
         order by account, at, kind
    loop
        select t.plan, t.ends_at into held
          from plan_replay_timelines t
         where t.id = happening.timeline;

        if happening.kind = 'credit' then
            if held.ends_at is null or held.ends_at <= happening.at then
                insert into plan_replay_timelines (id, plan, ends_at)
                values (happening.timeline, happening.plan, happening.at + happening.span)
                on conflict (id) do update set plan = excluded.plan, ends_at = excluded.ends_at;
                insert into plan_replay_months
                values (happening.payment_id, happening.timeline, happening.plan,
                        happening.at, happening.at + happening.span);
                continue;
            end if;
            kept := pg_temp.plan_replay_keep(happening.timeline, happening.at, happening.plan);
            select t.plan, t.ends_at into held
              from plan_replay_timelines t
             where t.id = happening.timeline;
            added := plan_time_in(happening.plan, kept, happening.span);
            insert into plan_replay_months
            values (happening.payment_id, happening.timeline, kept, held.ends_at, held.ends_at + added);
            update plan_replay_timelines
               set plan = kept, ends_at = held.ends_at + added
             where id = happening.timeline;

        elsif happening.kind = 'refund' then
            if held.ends_at is not null and held.ends_at > happening.at then
                cut := plan_time_in(happening.plan, held.plan, happening.span);
                -- what the cut takes is the refunded month's own time first,
                -- what it has left, and the months after it move up by that;
                -- the rest of the cut is what older code took from others
                select m.ends_at, least(cut, greatest(m.ends_at - greatest(m.starts_at, happening.at),
                                                      interval '0')) as own
                  into refunded
                  from plan_replay_months m
                 where m.payment_id = happening.payment_id
                   and m.timeline = happening.timeline;
                if refunded.own > interval '0' then
                    update plan_replay_months m
                       set starts_at = case when m.payment_id = happening.payment_id then m.starts_at
                                            else greatest(m.starts_at - refunded.own, happening.at) end,
                           ends_at   = greatest(m.ends_at - refunded.own, happening.at)
                     where m.timeline = happening.timeline
                       and (m.payment_id = happening.payment_id or m.ends_at > refunded.ends_at);
                end if;
                held.ends_at := greatest(held.ends_at - cut, happening.at);
                update plan_replay_timelines set ends_at = held.ends_at where id = happening.timeline;
                update plan_replay_months m
                   set starts_at = least(m.starts_at, held.ends_at),
                       ends_at   = least(m.ends_at, held.ends_at)
                 where m.timeline = happening.timeline;
            end if;

        else  -- a link: timeline is the device, account the account
            select t.plan, t.ends_at into device
              from plan_replay_timelines t
             where t.id = happening.timeline;
            select t.plan, t.ends_at into held
              from plan_replay_timelines t
             where t.id = happening.account;
            if device.ends_at is null or device.ends_at <= happening.at then
                continue;   -- the device's plan had run out: nothing moved
            end if;
            if held.ends_at is null or held.ends_at <= happening.at then
                -- the device's plan became the account's
                update plan_replay_months set timeline = happening.account
                 where timeline = happening.timeline;
                insert into plan_replay_timelines (id, plan, ends_at)
                values (happening.account, device.plan, device.ends_at)
                on conflict (id) do update set plan = excluded.plan, ends_at = excluded.ends_at;
            else
                kept := pg_temp.plan_replay_keep(happening.account, happening.at, device.plan);
                select t.plan, t.ends_at into held
                  from plan_replay_timelines t
                 where t.id = happening.account;
                merged_to := held.ends_at + plan_time_in(device.plan, kept, device.ends_at - happening.at);
                update plan_replay_months m
                   set timeline  = happening.account,
                       plan      = kept,
                       starts_at = merged_to
                                   - plan_time_in(m.plan, kept, device.ends_at - greatest(m.starts_at, happening.at)),
                       ends_at   = merged_to - plan_time_in(m.plan, kept, device.ends_at - m.ends_at)
                 where m.timeline = happening.timeline
                   and m.ends_at > happening.at;
                update plan_replay_timelines set plan = kept, ends_at = merged_to where id = happening.account;
            end if;
            update plan_replay_timelines set ends_at = happening.at where id = happening.timeline;
        end if;
    end loop;
end
$replay$;

-- Each month of a running plan as the history puts it, as time on the plan
-- kept: what is still to come converted into it (when time given with no
-- payment changed the plan), cut at the plan's end.
insert into plan_grants (payment_id, plan, added, starts_at, ends_at, taken_back)
select p.id, s.plan,
       plan_time_in(p.plan, s.plan, make_interval(days => p.period_days)),
       least(case when m.ends_at > now()
                  then now() + plan_time_in(m.plan, s.plan, greatest(m.starts_at, now()) - now())
                  else m.starts_at
             end, s.current_period_end),
       least(case when m.ends_at > now()
                  then now() + plan_time_in(m.plan, s.plan, m.ends_at - now())
                  else m.ends_at
             end, s.current_period_end),
       plan_time_in(p.plan, s.plan, make_interval(days => p.period_days)
                                    * (least(p.refunded_amount, p.amount)::float8 / p.amount))
  from plan_replay_months m
  join payments p on p.id = m.payment_id
  join subscriptions s on s.user_id = p.user_id
                      and s.status = 'active'
                      and s.current_period_end > now()
 where p.status = 'succeeded'
on conflict (payment_id) do nothing;

-- the replay's helper lives in this session's temporary schema, which a
-- pooled connection keeps
drop function pg_temp.plan_replay_keep(uuid, timestamptz, text);
