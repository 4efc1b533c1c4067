-- A refund of a plan payment took back the package's period priced from the
-- catalogue at the refund, and took it whether or not the payment's time had
-- already been used: refunding a plan that had run out cut the plan bought
-- after it. Each grant now records what it added (plan_grants; schema.sql has
-- the same), and its refunds take back the refunded share of that, never more
-- than is left of it. plan_time_in and plan_merge convert in seconds, and a
-- plan kept keeps its end as it is, so no end moves by an hour across a clock
-- change.
-- The new table's reference to payments holds a short lock on payments; never
-- wait long for it behind a transaction in flight.
set local lock_timeout = '5s';

-- What each plan payment's grant added, so that its refund takes back that
-- and not the catalogue's price of today: the time, as time on the plan kept
-- (the payment's own plan, or the higher one it was converted into), the
-- period end right after the grant (that time is the last of the period, so
-- none of it is used before ends_at - added), and what refunds took back.
create table if not exists plan_grants (
    payment_id  uuid primary key references payments (id),
    plan        text not null,                     -- a subscriptions.plan
    added       interval not null check (added > interval '0'),
    ends_at     timestamptz not null,
    taken_back  interval not null default interval '0' check (taken_back >= interval '0'),
    created_at  timestamptz not null default now()
);

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
