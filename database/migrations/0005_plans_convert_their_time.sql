-- Time on one plan becomes time on another at the two plans' prices per day
-- (schema.sql has the same functions). When a purchase or a link meets a
-- different running plan, the higher plan is kept and the other's time is
-- converted into it: a premium user buying pro keeps premium and gains the
-- pro month's worth of premium days; a pro user buying premium gets premium
-- now and the pro days left at their worth. Before, time was added day for
-- day to whichever plan came last: buying pro cut a premium user's remaining
-- premium days down to pro, and months of pro bought first all became
-- premium with one premium purchase.
-- Functions only: no table is locked.

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
-- same plan, or when either price is unknown
create or replace function plan_time_in(from_plan text, to_plan text, span interval) returns interval
language sql stable as $$
    select case when from_plan = to_plan then span
                else span * coalesce(plan_day_price(from_plan) / nullif(plan_day_price(to_plan), 0), 1)
           end
$$;

-- a held plan (running until held_end, or already past it) and time added on
-- another: the plan kept (the added one when the held one has ended or has
-- the lower daily limit) and its new end, both times converted into it
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
           now() + plan_time_in(held_plan, k.plan, greatest(held_end, now()) - now())
                 + plan_time_in(added_plan, k.plan, added_time)
      from kept k
$$;
