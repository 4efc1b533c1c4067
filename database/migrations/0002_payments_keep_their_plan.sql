-- Payments keep the plan and period they were priced with (schema.sql has
-- the same columns and trigger). Payments made before this migration take
-- them from the catalogue as it is now, the best record there is of what
-- they bought.
--
-- The ALTERs lock payments (and plans, for the foreign key) until init-db
-- commits: never wait long for a transaction in flight, which would queue
-- every payment's statement behind this one. On a timeout, run init-db again.
set local lock_timeout = '5s';

alter table payments add column if not exists plan text references plans (id);
alter table payments add column if not exists period_days integer check (period_days > 0);
create index if not exists payments_plan_idx on payments (plan);

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

update payments p
   set plan = k.plan,
       period_days = k.period_days
  from token_packages k
 where k.id = p.package_id
   and k.kind = 'plan'
   and p.plan is null;
