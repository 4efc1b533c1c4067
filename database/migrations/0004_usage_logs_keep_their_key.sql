-- A download repeated with its Idempotency-Key (or retried by sql() after a
-- commit it did not hear of) is logged once: usage_logs keeps the request's
-- key (schema.sql has the same column). A nullable column without a default
-- changes only the catalogue, so the table is locked for an instant; never
-- wait long for that instant behind a transaction in flight. It comes after
-- 0003 on purpose: every spend writes usage_logs, so it is the table locked
-- last, when init-db is about to commit, not held through another wait.
set local lock_timeout = '5s';

alter table usage_logs add column if not exists idempotency_key text;
