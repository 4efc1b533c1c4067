-- A refund of a plan payment took back the package's period priced from the
-- catalogue at the refund, and took it whether or not the payment's time had
-- already been used: refunding a plan that had run out cut the plan bought
-- after it. Each grant now records what it added and where its time ends
-- (plan_grants; schema.sql has the same), every change of the plan's
-- timeline moves those ends with it, and a refund takes back the refunded
-- share of what the grant added, never more than is left of it.
-- plan_time_in and plan_merge convert in seconds, and a plan kept keeps its
-- end as it is, so no end moves by an hour across a clock change.
-- The new table's reference to payments and the new column hold short locks;
-- never wait long for them behind a transaction in flight.
set local lock_timeout = '5s';

-- What each plan payment's grant added, so that its refund takes back that
-- and not the catalogue's price of today: the time, as time on the plan it
-- runs on (the payment's own plan, or the higher one it was converted into),
-- where that time ends on the plan's timeline (its grant put it last; a
-- conversion, a link or a refund of time before it moves it), and what
-- refunds took back.
create table if not exists plan_grants (
    payment_id  uuid primary key references payments (id),
    plan        text not null,                     -- a subscriptions.plan
    added       interval not null check (added > interval '0'),
    ends_at     timestamptz not null,
    taken_back  interval not null default interval '0' check (taken_back >= interval '0'),
    created_at  timestamptz not null default now()
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
-- an activation of a higher plan) takes its grants with it: each one still
-- running becomes time on the new plan, ending where its time now ends.
-- Grants already on the new plan (the one being made) are left alone.
create or replace function plan_grants_follow_their_plan() returns trigger
language plpgsql as $$
begin
    update plan_grants g
       set plan       = new.plan,
           added      = plan_time_in(old.plan, new.plan, g.added),
           taken_back = plan_time_in(old.plan, new.plan, g.taken_back),
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
-- overwritten. A payment's refunds take back in all the refunded share
-- (share_after of its amount) of what its grant added, never more than is
-- left of it; the time after it moves up by what is taken. A payment
-- granted before plan_grants existed: the share refunded now
-- (share_after - share_before) of its period.
create or replace function plan_refund(payer uuid, refunded uuid, paid_plan text, paid_days integer,
                                       share_before float8, share_after float8)
returns interval
language plpgsql as $$
declare
    running    record;
    made       record;
    cut        interval;
    moved_from timestamptz;
    moment     timestamptz;
begin
    select s.id, s.plan into running
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

    select g.plan, g.added, g.ends_at, g.taken_back into made
      from plan_grants g
     where g.payment_id = refunded
       for update;
    if found then
        cut := greatest(least(made.added * share_after - made.taken_back,
                              made.ends_at - moment,
                              made.added - made.taken_back),
                        interval '0');
        if cut > interval '0' then
            update plan_grants set taken_back = taken_back + cut where payment_id = refunded;
        end if;
        cut := plan_time_in(made.plan, running.plan, cut);
        moved_from := made.ends_at;
    else
        cut := plan_time_in(paid_plan, running.plan,
                            make_interval(days => paid_days) * (share_after - share_before));
        moved_from := moment;
    end if;
    if cut <= interval '0' then
        return interval '0';
    end if;

    -- this grant's time ends earlier, and all time after it moves up
    update plan_grants g
       set ends_at = greatest(g.ends_at - cut, moment)
      from payments p
     where p.id = g.payment_id
       and p.user_id = payer
       and g.ends_at >= moved_from;

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
