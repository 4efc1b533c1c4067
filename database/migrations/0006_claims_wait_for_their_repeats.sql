-- A worker's claim repeated with its key while the first is still running
-- took a second batch: both statements started before either committed, so
-- neither saw the other's rows. The claim is now a function that takes an
-- advisory lock on its claim id before its query (schema.sql has the same).
-- Functions only: no table is locked.

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
