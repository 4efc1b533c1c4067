-- The reconciler asks YooKassa about the open payments it asked about least
-- recently first (schema.sql has the same column), so that payments which
-- stay open for hours cannot keep the same ones at the head of every run.
-- A nullable column without a default changes only the catalogue; never wait
-- long for the instant's lock behind a transaction in flight.
set local lock_timeout = '5s';

alter table payments add column if not exists reconciled_at timestamptz;
