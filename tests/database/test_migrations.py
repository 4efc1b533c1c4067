"""Lazy initialization and schema versioning on a fresh, empty database."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from database import SchemaTooNew, init_database, migration_status, sql
from database import migrations as migrations_module


async def has_column(table: str, column: str) -> bool:
    found: bool = await sql.fetchval(
        "select exists (select 1 from information_schema.columns where table_name = $1 and column_name = $2)",
        table,
        column,
    )
    return found


async def test_fifty_concurrent_first_queries_initialize_once(fresh_database: str) -> None:
    results = await asyncio.gather(
        *(sql.fetchval("select count(*) from plans") for _ in range(50)),
        return_exceptions=True,
    )
    assert results == [3] * 50
    connection = await asyncpg.connect(fresh_database)
    try:
        rows = await connection.fetch("select version, name from schema_migrations order by version")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in migrations_module.known_migrations()
        ]
        assert await connection.fetchval("select count(*) from token_packages") == 4
    finally:
        await connection.close()


async def test_concurrent_init_from_many_processes_applies_once(fresh_database: str) -> None:
    """Separate connections stand in for separate Lambdas: the advisory lock,
    not the in-process lock, must make exactly one of them apply."""
    applied = await asyncio.gather(*(init_database() for _ in range(10)))
    non_empty = [names for names in applied if names]
    assert len(non_empty) == 1
    assert non_empty[0][0] == "schema.sql"
    assert await init_database() == []


async def test_init_refuses_a_database_newer_than_the_code(fresh_database: str) -> None:
    await init_database()
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute(
            "insert into schema_migrations (version, name) values (9999, '9999_future.sql')"
        )
    finally:
        await connection.close()
    with pytest.raises(SchemaTooNew, match="9999"):
        await init_database()
    status = await migration_status()
    assert (9999, "9999_future.sql", "unknown (newer code)") in status


async def test_newer_migration_is_applied_once_in_order(
    fresh_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await init_database()
    # the shipped migrations, then a new one after them
    for shipped in migrations_module.known_migrations()[1:]:
        (tmp_path / shipped.name).write_text(shipped.text())
    name = f"{migrations_module.known_migrations()[-1].version + 1:04}_add_marker.sql"
    (tmp_path / name).write_text(
        "create table if not exists migration_marker (id int primary key);"
        "insert into migration_marker values (2) on conflict do nothing;"
    )
    monkeypatch.setattr(migrations_module, "MIGRATIONS_DIR", tmp_path)
    assert [s[2] for s in await migration_status()][-1] == "pending"
    assert await init_database() == [name]
    assert await init_database() == []
    assert await sql.fetchval("select count(*) from migration_marker") == 1
    assert all(state.startswith("applied") for _, _, state in await migration_status())


async def test_badly_named_migration_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "add_column.sql").write_text("select 1;")
    monkeypatch.setattr(migrations_module, "MIGRATIONS_DIR", tmp_path)
    with pytest.raises(ValueError, match="NNNN_description"):
        migrations_module.known_migrations()


async def test_0002_gives_payments_made_before_it_their_plan(admin: asyncpg.Connection) -> None:
    """Run again over payments written without plan columns filled (as
    before it): plan payments get their package's plan, token packs none."""
    user_id = await admin.fetchval("insert into users (device_id) values ('device-mig-0002') returning id")
    for package_id in ("pro_month", "tokens_50"):
        await admin.execute(
            "insert into payments (user_id, package_id, amount, currency, tokens)"
            " values ($1, $2, 100, 'RUB', 1)",
            user_id,
            package_id,
        )
    await admin.execute("update payments set plan = null, period_days = null")
    [migration] = [m for m in migrations_module.known_migrations() if m.version == 2]
    await admin.execute(migration.text())
    rows = await admin.fetch("select package_id, plan, period_days from payments order by package_id")
    assert [tuple(row) for row in rows] == [("pro_month", "pro", 30), ("tokens_50", None, None)]


async def test_code_deployed_before_its_migration_applies_it_on_first_need(fresh_database: str) -> None:
    """A deploy that reached the database before `init-db`: the first
    statement naming a new column applies the missing migration, then runs."""
    from repositories.payments import apply_provider_status, attach_provider_payment, create_pending_payment

    await init_database()
    connection = await asyncpg.connect(fresh_database)
    try:
        # the schema as it was before 0002 (and the migrations after it)
        await connection.execute(
            "drop trigger trigger_payments_keep_their_plan on payments;"
            " alter table payments drop column plan, drop column period_days;"
            " alter table usage_logs drop column idempotency_key;"
            " alter table payments drop column reconciled_at;"
            " delete from schema_migrations where version >= 2"
        )
        user_id = await connection.fetchval(
            "insert into users (device_id) values ('device-before-0002') returning id"
        )
    finally:
        await connection.close()
    migrations_module.forget_initialized()
    payment, _ = await create_pending_payment(user_id, "pro_month", "before-0002")
    await attach_provider_payment(payment.id, "pp-before-0002", None)

    result = await apply_provider_status("pp-before-0002", "succeeded")
    assert result.changed and result.credited_tokens == 200
    assert await sql.fetchval("select plan from subscriptions where user_id = $1", user_id) == "pro"
    assert all(state.startswith("applied") for _, _, state in await migration_status())
    assert await has_column("usage_logs", "idempotency_key")


@pytest.mark.parametrize("missing", ["payments.reconciled_at", "usage_logs.idempotency_key"])
async def test_a_statement_naming_a_newer_column_applies_its_migration_first(
    fresh_database: str, missing: str
) -> None:
    """0003's and 0004's columns, each met first by the statement that needs
    it (the reconciler's page, the keyed usage log) on a database without it."""
    from repositories import payments, usage

    await init_database()
    table, column = missing.split(".")
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute(
            f"alter table {table} drop column {column}; delete from schema_migrations where version >= 3"
        )
        user_id = await connection.fetchval(
            "insert into users (device_id) values ('device-newer-col') returning id"
        )
    finally:
        await connection.close()
    migrations_module.forget_initialized()
    if table == "payments":
        assert await payments.open_payments(datetime.now(UTC)) == []
    else:
        await usage.log_usage(user_id, "download", None, reference="g1", key="k1")
        await usage.log_usage(user_id, "download", None, reference="g1", key="k1")
        assert await sql.fetchval("select count(*) from usage_logs where action = 'download'") == 1
    assert await has_column(table, column)
    assert all(state.startswith("applied") for _, _, state in await migration_status())


async def test_a_statement_calling_a_newer_function_applies_its_migration_first(fresh_database: str) -> None:
    """0005's functions, met first by a plan purchase's credit on a database without them."""
    from repositories.payments import apply_provider_status, attach_provider_payment, create_pending_payment

    await init_database()
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute(
            "drop function plan_merge, plan_time_in, plan_day_price;"
            " delete from schema_migrations where version >= 5"
        )
        user_id = await connection.fetchval(
            "insert into users (device_id) values ('device-newer-fn') returning id"
        )
    finally:
        await connection.close()
    migrations_module.forget_initialized()
    for n, package_id in enumerate(("pro_month", "premium_month")):
        payment, _ = await create_pending_payment(user_id, package_id, f"newer-fn-{n}")
        await attach_provider_payment(payment.id, f"pp-newer-fn-{n}", None)
        assert (await apply_provider_status(f"pp-newer-fn-{n}", "succeeded")).changed
    assert await sql.fetchval("select plan from subscriptions where user_id = $1", user_id) == "premium"
    assert all(state.startswith("applied") for _, _, state in await migration_status())


async def test_a_claim_on_a_database_without_its_function_applies_its_migration_first(
    fresh_database: str,
) -> None:
    """0006's claim_generations(), met first by a worker's claim."""
    from repositories.generations import claim_generations

    await init_database()
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute(
            "drop function claim_generations(integer, integer, uuid);"
            " delete from schema_migrations where version >= 6"
        )
        user_id = await connection.fetchval(
            "insert into users (device_id) values ('device-newer-claim') returning id"
        )
        queued = await connection.fetchval(
            "insert into generations (user_id, prompt, quality, cost)"
            " values ($1, 'a lighthouse', 'standard', 1) returning id",
            user_id,
        )
    finally:
        await connection.close()
    migrations_module.forget_initialized()
    [claimed] = await claim_generations(limit=5, lease_seconds=60, claim_id=uuid.uuid4())
    assert claimed.id == queued and claimed.attempt == 1
    assert await sql.fetchval("select status from generations where id = $1", queued) == "processing"
    assert all(state.startswith("applied") for _, _, state in await migration_status())


async def test_a_plan_credit_on_a_database_without_plan_grants_applies_its_migration_first(
    fresh_database: str,
) -> None:
    """0007's table, met first by a plan purchase's credit, which records its grant."""
    from repositories.payments import apply_provider_status, attach_provider_payment, create_pending_payment

    await init_database()
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute("drop table plan_grants; delete from schema_migrations where version >= 7")
        user_id = await connection.fetchval(
            "insert into users (device_id) values ('device-newer-grants') returning id"
        )
    finally:
        await connection.close()
    migrations_module.forget_initialized()
    payment, _ = await create_pending_payment(user_id, "pro_month", "newer-grants")
    await attach_provider_payment(payment.id, "pp-newer-grants", None)
    assert (await apply_provider_status("pp-newer-grants", "succeeded")).changed
    grant = await sql.fetchrow("select plan, added from plan_grants where payment_id = $1", payment.id)
    assert (grant["plan"], grant["added"].days) == ("pro", 30)
    assert all(state.startswith("applied") for _, _, state in await migration_status())


# what 0007 adds, taken away again: the database as older code left it
async def test_a_plan_refund_on_a_database_without_plan_refund_applies_its_migration_first(
    fresh_database: str,
) -> None:
    """0007's function and payment_refunds column, met first by a plan
    refund, which then takes back the plan's time."""
    from repositories.payments import (
        apply_provider_status,
        apply_refund,
        attach_provider_payment,
        create_pending_payment,
    )

    await init_database()
    connection = await asyncpg.connect(fresh_database)
    try:
        user_id = await connection.fetchval(
            "insert into users (device_id) values ('device-newer-refund') returning id"
        )
    finally:
        await connection.close()
    payment, _ = await create_pending_payment(user_id, "pro_month", "newer-refund")
    await attach_provider_payment(payment.id, "pp-newer-refund", None)
    assert (await apply_provider_status("pp-newer-refund", "succeeded")).changed
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute(
            "drop function plan_refund; alter table payment_refunds drop column plan_taken;"
            " delete from schema_migrations where version >= 7"
        )
    finally:
        await connection.close()
    migrations_module.forget_initialized()

    assert (await apply_refund("pp-newer-refund", "rf-newer-refund", 49900)).changed

    taken = await sql.fetchval(
        "select plan_taken from payment_refunds where provider_refund_id = 'rf-newer-refund'"
    )
    assert 30 * 86400 - 60 < taken.total_seconds() <= 30 * 86400
    status = await sql.fetchval("select status from subscriptions where user_id = $1", user_id)
    assert status == "canceled"
    assert all(state.startswith("applied") for _, _, state in await migration_status())
