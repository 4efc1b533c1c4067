"""repositories/payments.py against real PostgreSQL: pricing, idempotent
creation, forward-only status, exactly-once credit and refunds, the audit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import asyncpg
import pytest

from database import Conflict, InvalidRequest, NotFound, cache, config, pool, stats
from repositories.payments import (
    ApplyResult,
    apply_provider_status,
    apply_refund,
    attach_provider_payment,
    cancel_abandoned_payments,
    create_pending_payment,
    get_payment,
    get_payment_by_provider_id,
    mark_reconciled,
    open_payments,
)
from repositories.subscriptions import ACTIVATE_PLAN
from repositories.users import get_or_create_clerk_user, get_or_create_device_user, link_device
from tests import db
from tests.repositories import (
    attached_payment,
    days_pass,
    paid_payment,
    side_by_side,
    until_waiting_on_a_lock,
)

DAY = 86400.0


async def wide_pool(size: int = 20) -> None:
    """Concurrent calls on separate connections, not queued on one."""
    await pool.close_pool()
    config.configure(pool_max_size=size)


async def new_user(admin: asyncpg.Connection) -> UUID:
    return await db.insert_user(admin, clerk_id=f"user_{uuid4().hex[:12]}")


async def spend(admin: asyncpg.Connection, user_id: UUID, cost: int) -> None:
    """A spend by the user_tokens rule, as the generations code would make it."""
    await admin.execute(
        """
        with w as (
            update user_tokens
               set balance = balance - $2, total_spent = total_spent + $2, updated_at = now()
             where user_id = $1
            returning balance
        )
        insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)
        select $1, -$2, balance, 'spend', $3 from w
        """,
        user_id,
        cost,
        f"generation:{uuid4()}",
    )


async def subscription(admin: asyncpg.Connection, user_id: UUID) -> list[dict[str, object]]:
    rows = await admin.fetch(
        "select plan, status, extract(epoch from current_period_end - now())::float8 as seconds_left"
        "  from subscriptions where user_id = $1 order by created_at",
        user_id,
    )
    return [dict(row) for row in rows]


# ------------------------------------------------------------------ creation


async def test_pending_payment_copies_the_package_price(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment, created = await create_pending_payment(user_id, "tokens_200", "key-1")
    assert created is True
    assert (payment.user_id, payment.package_id, payment.status) == (user_id, "tokens_200", "pending")
    assert (payment.amount, payment.currency, payment.tokens) == (29900, "RUB", 200)
    assert (payment.provider_payment_id, payment.confirmation_url, payment.paid_at) == (None, None, None)
    assert (payment.refunded_amount, payment.refund_shortfall) == (0, 0)
    # a later price change does not touch the payment already made
    await admin.execute("update token_packages set amount = 1 where id = 'tokens_200'")
    assert (await get_payment(user_id, payment.id)).amount == 29900


async def test_same_key_returns_the_first_payment(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    first, created = await create_pending_payment(user_id, "tokens_50", "key-same")
    again, created_again = await create_pending_payment(user_id, "tokens_50", "key-same")
    assert created and not created_again
    assert again == first
    # the same key for another package is refused, and writes nothing
    with pytest.raises(Conflict):
        await create_pending_payment(user_id, "tokens_200", "key-same")
    other, created_other = await create_pending_payment(user_id, "tokens_50", "key-other")
    assert created_other and other.id != first.id
    # the key is per user: another user's same key is their own payment
    stranger = await new_user(admin)
    theirs, created_theirs = await create_pending_payment(stranger, "tokens_50", "key-same")
    assert created_theirs and theirs.id != first.id
    assert await admin.fetchval("select count(*) from payments") == 3


@pytest.mark.parametrize("package_id", ["tokens_999", "retired"])
async def test_unknown_or_retired_package_is_an_invalid_request(
    admin: asyncpg.Connection, package_id: str
) -> None:
    await admin.execute(
        "insert into token_packages (id, kind, tokens, amount, description, active)"
        " values ('retired', 'tokens', 1, 100, 'gone', false)"
    )
    user_id = await new_user(admin)
    with pytest.raises(InvalidRequest, match="unknown package"):
        await create_pending_payment(user_id, package_id, "key-x")
    assert await admin.fetchval("select count(*) from payments") == 0


async def test_same_key_twenty_times_concurrently_makes_one_payment(admin: asyncpg.Connection) -> None:
    await wide_pool()
    user_id = await new_user(admin)
    results = await asyncio.gather(
        *(create_pending_payment(user_id, "tokens_50", "key-race") for _ in range(20))
    )
    assert len({payment.id for payment, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert await admin.fetchval("select count(*) from payments") == 1


# ---------------------------------------------------------------- attachment


async def test_attach_records_the_provider_payment_once(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment, _ = await create_pending_payment(user_id, "tokens_50", "key-attach")
    attached = await attach_provider_payment(payment.id, "pp-1", "https://yoomoney.test/pp-1")
    assert (attached.provider_payment_id, attached.confirmation_url) == ("pp-1", "https://yoomoney.test/pp-1")
    again = await attach_provider_payment(payment.id, "pp-1", "https://yoomoney.test/pp-1")
    assert again == attached
    with pytest.raises(Conflict):
        await attach_provider_payment(payment.id, "pp-2", "https://yoomoney.test/pp-2")
    assert (await get_payment(user_id, payment.id)).provider_payment_id == "pp-1"


async def test_attach_unknown_payment_is_not_found() -> None:
    with pytest.raises(NotFound):
        await attach_provider_payment(uuid4(), "pp-none", None)


async def test_one_provider_payment_cannot_serve_two_payments(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    await attached_payment(user_id, provider_id="pp-shared")
    second, _ = await create_pending_payment(user_id, "tokens_50", "key-second")
    with pytest.raises(Conflict):
        await attach_provider_payment(second.id, "pp-shared", None)


async def test_another_users_payment_is_not_found(admin: asyncpg.Connection) -> None:
    owner, stranger = await new_user(admin), await new_user(admin)
    payment = await attached_payment(owner, provider_id="pp-owner")
    assert (await get_payment(owner, payment.id)).id == payment.id
    with pytest.raises(NotFound):
        await get_payment(stranger, payment.id)
    assert await get_payment_by_provider_id("pp-owner") == payment
    assert await get_payment_by_provider_id("pp-nobody") is None


# -------------------------------------------------------------------- status


async def test_success_credits_tokens_with_one_purchase_row(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment = await attached_payment(user_id, provider_id="pp-ok")
    result = await apply_provider_status("pp-ok", "succeeded")
    assert result.changed and result.credited_tokens == 50
    assert result.payment is not None
    assert result.payment.status == "succeeded" and result.payment.paid_at is not None
    assert await db.balance(admin, user_id) == 10 + 50
    purchase = (await db.ledger(admin, user_id))[-1]
    assert purchase == {
        "id": purchase["id"],
        "amount": 50,
        "balance_after": 60,
        "type": "purchase",
        "reference": str(payment.id),
        "idempotency_key": f"payment:{payment.id}",
    }
    description = "select description from token_transactions where id = $1"
    assert await admin.fetchval(description, purchase["id"]) == "50 tokens"
    assert await db.audit_problems(admin) == []


async def test_success_with_a_different_amount_at_the_provider_credits_nothing(
    admin: asyncpg.Connection,
) -> None:
    user_id = await new_user(admin)
    await attached_payment(user_id, provider_id="pp-altered")
    altered = await apply_provider_status("pp-altered", "succeeded", amount=100, currency="RUB")
    wrong_currency = await apply_provider_status("pp-altered", "succeeded", amount=9900, currency="USD")
    assert not altered.changed and not wrong_currency.changed
    assert altered.payment is not None and altered.payment.status == "pending"
    assert await db.balance(admin, user_id) == 10
    matching = await apply_provider_status("pp-altered", "succeeded", amount=9900, currency="RUB")
    assert matching.changed and matching.credited_tokens == 50
    assert await db.audit_problems(admin) == []


async def test_success_is_one_round_trip(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    await attached_payment(user_id, "pro_month", provider_id="pp-trip")
    with stats.collect() as counted:
        result = await apply_provider_status("pp-trip", "succeeded")
    assert result.changed
    assert (counted.statements, counted.round_trips) == (1, db.trips(1))


async def test_success_twenty_times_concurrently_credits_once(admin: asyncpg.Connection) -> None:
    await wide_pool()
    user_id = await new_user(admin)
    payment = await attached_payment(user_id, provider_id="pp-race")
    results = await asyncio.gather(*(apply_provider_status("pp-race", "succeeded") for _ in range(20)))
    assert sum(r.changed for r in results) == 1
    assert sum(r.credited_tokens for r in results) == 50
    # every caller, winner or not, sees the settled payment
    assert {r.payment.status for r in results if r.payment} == {"succeeded"}
    assert await db.balance(admin, user_id) == 60
    keys = [row["idempotency_key"] for row in await db.ledger(admin, user_id)]
    assert keys == ["welcome_bonus", f"payment:{payment.id}"]
    assert await db.audit_problems(admin) == []


async def test_ledger_key_stops_a_second_credit_of_the_same_payment(admin: asyncpg.Connection) -> None:
    """The second guard: tokens already credited under payment:<id> (say by an
    operator) are not credited again, yet the payment still settles."""
    user_id = await new_user(admin)
    payment = await attached_payment(user_id, provider_id="pp-credited")
    await admin.execute(
        """
        with w as (
            update user_tokens set balance = balance + 50, total_earned = total_earned + 50
             where user_id = $1
            returning balance
        )
        insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)
        select $1, 50, balance, 'adjustment', $2 from w
        """,
        user_id,
        f"payment:{payment.id}",
    )
    result = await apply_provider_status("pp-credited", "succeeded")
    assert result.changed and result.credited_tokens == 0
    assert result.payment is not None and result.payment.status == "succeeded"
    assert await db.balance(admin, user_id) == 60
    assert await db.audit_problems(admin) == []


async def test_canceled_after_succeeded_changes_nothing(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment = await paid_payment(user_id)
    before = await db.ledger(admin, user_id)
    for status in ("canceled", "waiting_for_capture", "pending", "succeeded"):
        result = await apply_provider_status(payment.provider_payment_id or "", status)
        assert (result.changed, result.credited_tokens) == (False, 0)
        assert result.payment is not None and result.payment.status == "succeeded"
    assert await db.ledger(admin, user_id) == before
    assert await db.audit_problems(admin) == []


async def test_waiting_for_capture_then_succeeded_credits_once(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    await attached_payment(user_id, provider_id="pp-two-step")
    waiting = await apply_provider_status("pp-two-step", "waiting_for_capture")
    assert waiting.changed and waiting.credited_tokens == 0
    assert waiting.payment is not None and waiting.payment.status == "waiting_for_capture"
    assert waiting.payment.paid_at is None
    assert await db.balance(admin, user_id) == 10
    again = await apply_provider_status("pp-two-step", "waiting_for_capture")
    assert not again.changed
    succeeded = await apply_provider_status("pp-two-step", "succeeded")
    assert succeeded.changed and succeeded.credited_tokens == 50
    repeat = await apply_provider_status("pp-two-step", "succeeded")
    assert not repeat.changed and repeat.credited_tokens == 0
    assert await db.balance(admin, user_id) == 60
    assert await db.audit_problems(admin) == []


async def test_canceled_payment_credits_nothing_ever(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    await attached_payment(user_id, provider_id="pp-cancel")
    canceled = await apply_provider_status("pp-cancel", "canceled")
    assert canceled.changed and canceled.payment is not None and canceled.payment.status == "canceled"
    late = await apply_provider_status("pp-cancel", "succeeded")
    assert not late.changed
    assert late.payment is not None and late.payment.status == "canceled"
    assert await db.balance(admin, user_id) == 10


async def test_plan_package_activates_the_plan_and_a_second_extends_it(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    first = await paid_payment(user_id, "pro_month")
    assert await db.balance(admin, user_id) == 10 + 200
    assert (await db.ledger(admin, user_id))[-1]["type"] == "plan_grant"
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY  # type: ignore[arg-type]

    await paid_payment(user_id, "premium_month")
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("premium", "active")
    # premium's 30 days, and pro's 30 at their worth in premium (499.00 / 1499.00)
    converted = 30 * DAY + 30 * DAY * 49900 / 149900
    assert converted - 60 < float(plan["seconds_left"]) <= converted + 1  # type: ignore[arg-type]
    assert await db.balance(admin, user_id) == 10 + 200 + 1000
    keys = [row["idempotency_key"] for row in await db.ledger(admin, user_id)]
    assert keys[1] == f"payment:{first.id}"
    assert await db.audit_problems(admin) == []


async def test_a_plan_is_granted_and_refunded_as_it_was_priced_whatever_the_catalogue_says_since(
    admin: asyncpg.Connection,
) -> None:
    """The operator reworks pro_month (another plan, 7 days) while a payment
    for it is open: the payer still gets the Pro plan for 30 days they paid
    for, and a half refund takes back 15 of those days."""
    user_id = await new_user(admin)
    payment = await attached_payment(user_id, "pro_month")
    await admin.execute("update token_packages set plan = 'premium', period_days = 7 where id = 'pro_month'")
    await apply_provider_status(payment.provider_payment_id or "", "succeeded")
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY  # type: ignore[arg-type]

    await admin.execute(
        "update token_packages set kind = 'tokens', plan = null, period_days = null where id = 'pro_month'"
    )
    await apply_refund(payment.provider_payment_id or "", "rf-half-reworked", 24950)
    [plan] = await subscription(admin, user_id)
    assert 15 * DAY - 60 < float(plan["seconds_left"]) <= 15 * DAY  # type: ignore[arg-type]
    assert await db.audit_problems(admin) == []


async def test_every_writer_of_payments_records_the_plan_priced(admin: asyncpg.Connection) -> None:
    """An insert that names no plan (code from before the columns) gets the
    package's; a tokens package has none."""
    user_id = await new_user(admin)
    for package_id, expected in (("premium_month", ("premium", 30)), ("tokens_50", (None, None))):
        row = await admin.fetchrow(
            "insert into payments (user_id, package_id, amount, currency, tokens)"
            " values ($1, $2, 100, 'RUB', 1) returning plan, period_days",
            user_id,
            package_id,
        )
        assert (row["plan"], row["period_days"]) == expected


async def test_expired_plan_is_renewed_from_now_not_from_its_old_end(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    await admin.execute(
        "insert into subscriptions (user_id, plan, status, current_period_start, current_period_end)"
        " values ($1, 'pro', 'active', now() - interval '40 days', now() - interval '10 days')",
        user_id,
    )
    await paid_payment(user_id, "pro_month")
    [plan] = await subscription(admin, user_id)
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY  # type: ignore[arg-type]


async def test_unknown_provider_payment_changes_nothing(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    await attached_payment(user_id, provider_id="pp-known")
    result = await apply_provider_status("pp-unknown", "succeeded")
    assert result == ApplyResult(payment=None, changed=False, credited_tokens=0)
    assert await db.balance(admin, user_id) == 10


async def test_unknown_status_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        await apply_provider_status("pp-any", "refunded")


async def test_credit_invalidates_the_cached_balance(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    await attached_payment(user_id, provider_id="pp-cache")
    cache.remember_balance(user_id, 10)
    await apply_provider_status("pp-cache", "succeeded")
    assert cache.cached_balance(user_id) is None


# ------------------------------------------------------------------- refunds


async def test_full_refund_after_a_partial_spend_never_goes_negative(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment = await paid_payment(user_id)  # 10 + 50
    await spend(admin, user_id, 55)
    cache.remember_balance(user_id, 5)
    result = await apply_refund(payment.provider_payment_id or "", "rf-1", 9900)
    assert result.changed and result.credited_tokens == -5
    assert result.payment is not None
    assert (result.payment.status, result.payment.refunded_amount, result.payment.refund_shortfall) == (
        "refunded",
        9900,
        45,
    )
    assert await db.balance(admin, user_id) == 0
    reversal = (await db.ledger(admin, user_id))[-1]
    assert (reversal["amount"], reversal["balance_after"], reversal["type"]) == (-5, 0, "reversal")
    assert reversal["idempotency_key"] == f"reversal:{payment.id}:rf-1"
    assert reversal["reference"] == str(payment.id)
    recorded = await admin.fetchrow("select * from payment_refunds where provider_refund_id = 'rf-1'")
    assert (recorded["amount"], recorded["tokens_taken"], recorded["tokens_short"]) == (9900, 5, 45)
    assert cache.cached_balance(user_id) is None
    assert await db.audit_problems(admin) == []


async def test_same_refund_twice_applies_once(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment = await paid_payment(user_id)
    provider_id = payment.provider_payment_id or ""
    first = await apply_refund(provider_id, "rf-twice", 4950)
    second = await apply_refund(provider_id, "rf-twice", 4950)
    assert (first.changed, first.credited_tokens) == (True, -25)
    assert (second.changed, second.credited_tokens) == (False, 0)
    assert second.payment is not None
    assert (second.payment.status, second.payment.refunded_amount) == ("succeeded", 4950)
    assert await db.balance(admin, user_id) == 60 - 25
    assert await db.audit_problems(admin) == []


async def test_refund_of_an_empty_wallet_is_recorded_once_as_shortfall(admin: asyncpg.Connection) -> None:
    """No ledger row can carry the key when nothing is taken back: the refund
    id itself must stop a second delivery from doubling the shortfall."""
    user_id = await new_user(admin)
    payment = await paid_payment(user_id)
    await spend(admin, user_id, 60)
    provider_id = payment.provider_payment_id or ""
    first = await apply_refund(provider_id, "rf-empty", 9900)
    second = await apply_refund(provider_id, "rf-empty", 9900)
    assert (first.changed, first.credited_tokens) == (True, 0)
    assert not second.changed
    assert second.payment is not None and second.payment.refund_shortfall == 50
    assert [row["type"] for row in await db.ledger(admin, user_id)] == ["bonus", "purchase", "spend"]
    assert await db.audit_problems(admin) == []


async def test_same_refund_ten_times_concurrently_applies_once(admin: asyncpg.Connection) -> None:
    await wide_pool()
    user_id = await new_user(admin)
    payment = await paid_payment(user_id)
    provider_id = payment.provider_payment_id or ""
    results = await asyncio.gather(*(apply_refund(provider_id, "rf-race", 9900) for _ in range(10)))
    assert sum(r.changed for r in results) == 1
    assert await db.balance(admin, user_id) == 10
    assert await admin.fetchval("select count(*) from payment_refunds") == 1
    assert await db.audit_problems(admin) == []


async def test_partial_refunds_add_up_to_all_the_tokens(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment = await paid_payment(user_id)  # 50 tokens for 9900
    provider_id = payment.provider_payment_id or ""
    taken = []
    for refund_id, amount in (("rf-a", 100), ("rf-b", 3300), ("rf-c", 6500)):
        result = await apply_refund(provider_id, refund_id, amount)
        assert result.changed
        taken.append(-result.credited_tokens)
    # floor(50*100/9900) = 0, floor(50*3400/9900) = 17, then all 50
    assert taken == [0, 17, 33]
    final = await get_payment(user_id, payment.id)
    assert (final.status, final.refunded_amount, final.refund_shortfall) == ("refunded", 9900, 0)
    assert await db.balance(admin, user_id) == 10
    late = await apply_refund(provider_id, "rf-d", 100)
    assert not late.changed
    assert await db.audit_problems(admin) == []


async def test_refund_over_the_amount_is_capped(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment = await paid_payment(user_id)
    result = await apply_refund(payment.provider_payment_id or "", "rf-big", 20000)
    assert result.payment is not None
    assert (result.payment.refunded_amount, result.payment.status) == (9900, "refunded")
    assert result.credited_tokens == -50


async def test_refund_of_an_unpaid_or_unknown_payment_changes_nothing(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    pending = await attached_payment(user_id, provider_id="pp-unpaid")
    result = await apply_refund("pp-unpaid", "rf-unpaid", 9900)
    assert not result.changed and result.payment == pending
    assert await apply_refund("pp-nobody", "rf-nobody", 100) == ApplyResult(
        payment=None, changed=False, credited_tokens=0
    )
    assert await admin.fetchval("select count(*) from payment_refunds") == 0


@pytest.mark.parametrize(("refund_id", "amount"), [("rf-zero", 0), ("rf-negative", -1), ("", 100)])
async def test_malformed_refund_is_an_invalid_request(refund_id: str, amount: int) -> None:
    with pytest.raises(InvalidRequest):
        await apply_refund("pp-any", refund_id, amount)


async def test_full_refund_of_the_only_plan_purchase_ends_the_plan_now(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment = await paid_payment(user_id, "pro_month")
    await apply_refund(payment.provider_payment_id or "", "rf-plan", 49900)
    [plan] = await subscription(admin, user_id)
    assert plan["status"] == "canceled"
    assert float(plan["seconds_left"]) <= 0  # type: ignore[arg-type]
    assert await db.balance(admin, user_id) == 10
    assert await db.audit_problems(admin) == []


async def test_partial_plan_refund_gives_back_the_same_share_of_the_period(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment = await paid_payment(user_id, "pro_month")
    result = await apply_refund(payment.provider_payment_id or "", "rf-half", 24950)
    assert result.credited_tokens == -100
    [plan] = await subscription(admin, user_id)
    assert plan["status"] == "active"
    assert 15 * DAY - 60 < float(plan["seconds_left"]) <= 15 * DAY  # type: ignore[arg-type]


async def test_refunding_one_of_two_plan_purchases_keeps_the_other_period(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    first = await paid_payment(user_id, "pro_month")
    await paid_payment(user_id, "pro_month")
    await apply_refund(first.provider_payment_id or "", "rf-one-of-two", 49900)
    [plan] = await subscription(admin, user_id)
    assert plan["status"] == "active"
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY  # type: ignore[arg-type]
    assert await db.balance(admin, user_id) == 10 + 200
    assert await db.audit_problems(admin) == []


async def test_refunding_a_plan_bought_on_another_takes_back_what_it_added(admin: asyncpg.Connection) -> None:
    """Pro bought during premium added its worth in premium days (a third of
    30); its refund takes back just those, not 30 premium days."""
    user_id = await new_user(admin)
    await paid_payment(user_id, "premium_month")
    pro = await paid_payment(user_id, "pro_month")
    [plan] = await subscription(admin, user_id)
    pro_in_premium = 30 * DAY * 49900 / 149900
    assert plan["plan"] == "premium"
    assert 30 * DAY + pro_in_premium - 60 < float(plan["seconds_left"]) <= 30 * DAY + pro_in_premium + 1  # type: ignore[arg-type]

    await apply_refund(pro.provider_payment_id or "", "rf-pro-on-premium", 49900)
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("premium", "active")
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY + 1  # type: ignore[arg-type]
    assert await db.balance(admin, user_id) == 10 + 1000
    assert await db.audit_problems(admin) == []


async def taken_back(admin: asyncpg.Connection, payment_id: UUID) -> float:
    seconds = await admin.fetchval(
        "select extract(epoch from taken_back)::float8 from plan_grants where payment_id = $1", payment_id
    )
    return float(seconds)


async def test_refunding_a_plan_whose_time_ran_out_takes_nothing_from_the_next(
    admin: asyncpg.Connection,
) -> None:
    """Premium ran its 30 days, pro was bought after it; premium's chargeback
    takes its tokens back but none of the pro time paid for since."""
    user_id = await new_user(admin)
    premium = await paid_payment(user_id, "premium_month")
    await days_pass(admin, user_id, 31)
    await paid_payment(user_id, "pro_month")
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")

    await apply_refund(premium.provider_payment_id or "", "rf-used-premium", 149900)
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY  # type: ignore[arg-type]
    assert await taken_back(admin, premium.id) == 0
    assert await db.balance(admin, user_id) == 10 + 200
    assert await db.audit_problems(admin) == []


async def test_partial_refunds_of_a_plan_in_use_take_back_only_what_was_left(
    admin: asyncpg.Connection,
) -> None:
    """Ten of thirty pro days used: a half refund takes back 15 of the 20
    left, the other half the last 5, and the plan ends."""
    user_id = await new_user(admin)
    payment = await paid_payment(user_id, "pro_month")
    await days_pass(admin, user_id, 10)
    provider_id = payment.provider_payment_id or ""

    await apply_refund(provider_id, "rf-used-half-1", 24950)
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 5 * DAY - 60 < float(plan["seconds_left"]) <= 5 * DAY  # type: ignore[arg-type]
    assert await taken_back(admin, payment.id) == 15 * DAY

    await apply_refund(provider_id, "rf-used-half-2", 24950)
    [plan] = await subscription(admin, user_id)
    assert plan["status"] == "canceled"
    assert float(plan["seconds_left"]) <= 0  # type: ignore[arg-type]
    assert 20 * DAY - 60 < await taken_back(admin, payment.id) <= 20 * DAY
    assert await db.audit_problems(admin) == []


async def test_a_refund_takes_back_what_the_grant_added_whatever_the_prices_are_now(
    admin: asyncpg.Connection,
) -> None:
    """Pro bought during premium added its worth then (499/1499 of 30 premium
    days); repricing pro since changes nothing its refund takes back."""
    user_id = await new_user(admin)
    await paid_payment(user_id, "premium_month")
    pro = await paid_payment(user_id, "pro_month")
    await admin.execute("update token_packages set amount = 99900 where id = 'pro_month'")

    await apply_refund(pro.provider_payment_id or "", "rf-repriced", 49900)
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("premium", "active")
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY + 1  # type: ignore[arg-type]
    added = 30 * DAY * 49900 / 149900
    assert abs(await taken_back(admin, pro.id) - added) < 1
    assert await db.audit_problems(admin) == []


async def test_ten_partial_refunds_at_once_take_back_one_payments_time_once(
    admin: asyncpg.Connection,
) -> None:
    """Two pro months; the first's ten tenths refunded concurrently take back
    its 30 days exactly, and the second month stays whole."""
    await wide_pool()
    user_id = await new_user(admin)
    first = await paid_payment(user_id, "pro_month")
    await paid_payment(user_id, "pro_month")
    provider_id = first.provider_payment_id or ""

    results = await asyncio.gather(*(apply_refund(provider_id, f"rf-tenth-{n}", 4990) for n in range(10)))

    assert all(r.changed for r in results)
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY  # type: ignore[arg-type]
    # all of its 30 days but the moments the test has run (its time is used first)
    assert 30 * DAY - 60 < await taken_back(admin, first.id) <= 30 * DAY
    assert await admin.fetchval("select count(*) from payment_refunds") == 10
    assert await db.balance(admin, user_id) == 10 + 200
    assert await db.audit_problems(admin) == []


async def test_a_plan_granted_before_plan_grants_is_refunded_by_its_period(admin: asyncpg.Connection) -> None:
    """A payment credited by code from before migration 0007 has no grant
    recorded: a half refund takes back half of its package's 30 days."""
    user_id = await new_user(admin)
    payment = await paid_payment(user_id, "pro_month")
    await admin.execute("delete from plan_grants where payment_id = $1", payment.id)
    await apply_refund(payment.provider_payment_id or "", "rf-before-grants", 24950)
    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 15 * DAY - 60 < float(plan["seconds_left"]) <= 15 * DAY  # type: ignore[arg-type]
    assert await admin.fetchval("select count(*) from plan_grants") == 0
    assert await db.audit_problems(admin) == []


async def test_a_used_up_plan_granted_before_plan_grants_costs_nothing_bought_after_it(
    admin: asyncpg.Connection,
) -> None:
    """A pro month credited before 0007 ran out and a new one was bought: the
    old month's chargeback takes its tokens back but none of the new month,
    for no time but the new grant's is left."""
    user_id = await new_user(admin)
    legacy = await paid_payment(user_id, "pro_month")
    await admin.execute("delete from plan_grants where payment_id = $1", legacy.id)
    await days_pass(admin, user_id, 31)
    await paid_payment(user_id, "pro_month")

    await apply_refund(legacy.provider_payment_id or "", "rf-legacy-used", 49900)

    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY  # type: ignore[arg-type]
    assert await plan_taken(admin, "rf-legacy-used") == 0
    assert await db.balance(admin, user_id) == 10 + 200
    assert await db.audit_problems(admin) == []


async def test_a_plan_granted_before_plan_grants_is_taken_from_the_time_no_grant_covers(
    admin: asyncpg.Connection,
) -> None:
    """Month G is granted, then month L is credited by code from before 0007
    still running in a deploy (no grant recorded): L's time is days 30-60.
    L's chargeback takes those days and leaves G where it is, so G's own
    chargeback then ends the plan."""
    user_id = await new_user(admin)
    granted = await paid_payment(user_id, "pro_month")
    older = await paid_payment(user_id, "pro_month")
    await admin.execute("delete from plan_grants where payment_id = $1", older.id)

    await apply_refund(older.provider_payment_id or "", "rf-older", 49900)
    [plan] = await subscription(admin, user_id)
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY  # type: ignore[arg-type]

    await apply_refund(granted.provider_payment_id or "", "rf-granted", 49900)
    [plan] = await subscription(admin, user_id)
    assert plan["status"] == "canceled"
    assert 30 * DAY - 60 < await plan_taken(admin, "rf-granted") <= 30 * DAY
    assert await db.audit_problems(admin) == []


async def test_a_plan_granted_before_plan_grants_moves_the_grants_after_it_up(
    admin: asyncpg.Connection,
) -> None:
    """Month L, credited before 0007, then month G granted: L's half refund
    takes 15 days from L's time, which comes first, and G's 30 days move up
    with it; G's chargeback then takes all 30 and leaves L's other 15."""
    user_id = await new_user(admin)
    legacy = await paid_payment(user_id, "pro_month")
    await admin.execute("delete from plan_grants where payment_id = $1", legacy.id)
    granted = await paid_payment(user_id, "pro_month")

    await apply_refund(legacy.provider_payment_id or "", "rf-legacy-half", 24950)
    assert abs(await plan_taken(admin, "rf-legacy-half") - 15 * DAY) < 1
    await apply_refund(granted.provider_payment_id or "", "rf-granted-after", 49900)

    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 15 * DAY - 60 < float(plan["seconds_left"]) <= 15 * DAY  # type: ignore[arg-type]
    assert 30 * DAY - 60 < await plan_taken(admin, "rf-granted-after") <= 30 * DAY
    assert await db.audit_problems(admin) == []


async def test_a_refund_racing_a_grant_of_another_plan_takes_back_its_worth_in_the_plan_kept(
    admin: asyncpg.Connection,
) -> None:
    """Pro's refund and a premium purchase arrive together, ten users at once.
    In either order premium keeps just its own 30 days: pro's time is taken
    back as pro, or as its worth in premium once premium holds it, never as
    30 premium days."""
    await wide_pool()
    users = [await new_user(admin) for _ in range(10)]
    pros = [await paid_payment(user_id, "pro_month") for user_id in users]
    premiums = [await attached_payment(user_id, "premium_month") for user_id in users]

    await asyncio.gather(
        *(apply_refund(pro.provider_payment_id or "", f"rf-race-{n}", 49900) for n, pro in enumerate(pros)),
        *(apply_provider_status(premium.provider_payment_id or "", "succeeded") for premium in premiums),
    )

    for user_id in users:
        active = [plan for plan in await subscription(admin, user_id) if plan["status"] == "active"]
        [plan] = active
        assert plan["plan"] == "premium"
        assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY + 1  # type: ignore[arg-type]
        assert await db.balance(admin, user_id) == 10 + 1000
    assert await db.audit_problems(admin) == []


async def plan_taken(admin: asyncpg.Connection, refund_id: str) -> float:
    """The plan time a refund recorded taking back, in seconds."""
    seconds = await admin.fetchval(
        "select extract(epoch from plan_taken)::float8 from payment_refunds where provider_refund_id = $1",
        refund_id,
    )
    return float(seconds)


async def test_a_refund_before_a_grant_moves_the_grants_after_it_up(admin: asyncpg.Connection) -> None:
    """Three pro months; the first refunded at once makes the second's time
    days 0-30 and the third's 30-60. On day 45 the second has run out: its
    refund takes nothing, and the third keeps its 15 days."""
    user_id = await new_user(admin)
    first = await paid_payment(user_id, "pro_month")
    second = await paid_payment(user_id, "pro_month")
    await paid_payment(user_id, "pro_month")
    await apply_refund(first.provider_payment_id or "", "rf-stack-1", 49900)
    await days_pass(admin, user_id, 45)

    await apply_refund(second.provider_payment_id or "", "rf-stack-2", 49900)

    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 15 * DAY - 60 < float(plan["seconds_left"]) <= 15 * DAY  # type: ignore[arg-type]
    assert 30 * DAY - 60 < await plan_taken(admin, "rf-stack-1") <= 30 * DAY
    assert await plan_taken(admin, "rf-stack-2") == 0
    assert await taken_back(admin, second.id) == 0
    assert await db.audit_problems(admin) == []


async def test_a_plan_converted_into_a_higher_one_and_used_up_is_refunded_without_cutting_it(
    admin: asyncpg.Connection,
) -> None:
    """Pro for 10 days, then premium: pro's 20 days left become 20 * 499/1499
    (6.66) premium days, used by day 16.66. Pro's refund on day 20 takes none
    of premium's own 30 days."""
    user_id = await new_user(admin)
    pro = await paid_payment(user_id, "pro_month")
    await days_pass(admin, user_id, 10)
    await paid_payment(user_id, "premium_month")
    [converted] = await admin.fetch(
        "select plan, extract(epoch from ends_at - now())::float8 as seconds_left from plan_grants"
        " where payment_id = $1",
        pro.id,
    )
    assert converted["plan"] == "premium"
    assert abs(converted["seconds_left"] - 20 * DAY * 49900 / 149900) < 60
    await days_pass(admin, user_id, 10)
    [before] = await subscription(admin, user_id)

    await apply_refund(pro.provider_payment_id or "", "rf-converted-used", 49900)

    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("premium", "active")
    assert float(before["seconds_left"]) - float(plan["seconds_left"]) < 1  # type: ignore[arg-type]
    assert await plan_taken(admin, "rf-converted-used") == 0
    assert await db.audit_problems(admin) == []


async def test_a_refund_of_a_converted_plan_takes_its_worth_at_the_prices_of_the_conversion(
    admin: asyncpg.Connection,
) -> None:
    """Pro, then premium at once: pro's 30 days become 30 * 499/1499 (9.99)
    premium days. Pro is then repriced to 999.00; its refund still takes
    back those 9.99 premium days, not 30 * 999/1499."""
    user_id = await new_user(admin)
    pro = await paid_payment(user_id, "pro_month")
    await paid_payment(user_id, "premium_month")
    await admin.execute("update token_packages set amount = 99900 where id = 'pro_month'")

    await apply_refund(pro.provider_payment_id or "", "rf-converted-repriced", 49900)

    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("premium", "active")
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY + 1  # type: ignore[arg-type]
    assert abs(await plan_taken(admin, "rf-converted-repriced") - 30 * DAY * 49900 / 149900) < 60
    assert await db.audit_problems(admin) == []


async def test_a_device_plan_linked_after_the_accounts_is_refunded_from_where_it_moved(
    admin: asyncpg.Connection,
) -> None:
    """Account and device each buy pro; the link puts the device's 30 days
    after the account's. On day 35 the 25 days left are all the device
    payment's: its refund ends the plan. The account's refund took nothing."""
    account = await get_or_create_clerk_user(f"user_{uuid4().hex[:12]}")
    device = await get_or_create_device_user(f"device-{uuid4().hex[:12]}", None, 5)
    mine = await paid_payment(account.id, "pro_month")
    bought = await paid_payment(device.id, "pro_month")
    await link_device(account.id, device.device_id or "")
    await days_pass(admin, account.id, 35)

    await apply_refund(mine.provider_payment_id or "", "rf-link-account", 49900)
    [plan] = await subscription(admin, account.id)
    assert (plan["plan"], plan["status"]) == ("pro", "active")
    assert 25 * DAY - 60 < float(plan["seconds_left"]) <= 25 * DAY  # type: ignore[arg-type]

    await apply_refund(bought.provider_payment_id or "", "rf-link-device", 49900)
    [plan] = await subscription(admin, account.id)
    assert plan["status"] == "canceled"
    assert 25 * DAY - 60 < await plan_taken(admin, "rf-link-device") <= 25 * DAY
    assert await plan_taken(admin, "rf-link-account") == 0
    assert await db.audit_problems(admin) == []


async def test_a_device_month_partly_used_before_its_link_gives_back_only_what_was_left(
    admin: asyncpg.Connection,
) -> None:
    """Account and device each bought pro 20 days ago: the link makes 20
    days, the account's 10 then the device's 10. The device month's
    chargeback takes its 10 days, not the account's."""
    account = await get_or_create_clerk_user(f"user_{uuid4().hex[:12]}")
    device = await get_or_create_device_user(f"device-{uuid4().hex[:12]}", None, 5)
    await paid_payment(account.id, "pro_month")
    bought = await paid_payment(device.id, "pro_month")
    await days_pass(admin, account.id, 20)
    await days_pass(admin, device.id, 20)
    await link_device(account.id, device.device_id or "")
    [plan] = [p for p in await subscription(admin, account.id) if p["status"] == "active"]
    assert abs(float(plan["seconds_left"]) - 20 * DAY) < 60  # type: ignore[arg-type]

    await apply_refund(bought.provider_payment_id or "", "rf-device-used", 49900)

    assert 10 * DAY - 60 < await plan_taken(admin, "rf-device-used") <= 10 * DAY
    [plan] = [p for p in await subscription(admin, account.id) if p["status"] == "active"]
    assert abs(float(plan["seconds_left"]) - 10 * DAY) < 60  # type: ignore[arg-type]
    assert await db.audit_problems(admin) == []


async def test_a_higher_device_plan_linked_converts_the_accounts_grants(admin: asyncpg.Connection) -> None:
    """The account has pro, the device premium: the account keeps premium,
    its pro days become their worth in premium first, the device's 30 days
    come after. Each refund then takes back just its own payment's time."""
    account = await get_or_create_clerk_user(f"user_{uuid4().hex[:12]}")
    device = await get_or_create_device_user(f"device-{uuid4().hex[:12]}", None, 5)
    mine = await paid_payment(account.id, "pro_month")
    bought = await paid_payment(device.id, "premium_month")
    await link_device(account.id, device.device_id or "")
    pro_worth = 30 * DAY * 49900 / 149900
    [plan] = await subscription(admin, account.id)
    assert plan["plan"] == "premium"
    assert abs(float(plan["seconds_left"]) - (pro_worth + 30 * DAY)) < 60  # type: ignore[arg-type]

    await apply_refund(bought.provider_payment_id or "", "rf-up-device", 149900)
    [plan] = await subscription(admin, account.id)
    assert plan["status"] == "active"
    assert abs(float(plan["seconds_left"]) - pro_worth) < 60  # type: ignore[arg-type]

    await apply_refund(mine.provider_payment_id or "", "rf-up-account", 49900)
    [plan] = await subscription(admin, account.id)
    assert plan["status"] == "canceled"
    assert abs(await plan_taken(admin, "rf-up-account") - pro_worth) < 60
    assert await db.audit_problems(admin) == []


async def test_refunds_of_stacked_plans_at_once_each_take_back_what_was_left_of_its_own(
    admin: asyncpg.Connection,
) -> None:
    """Three pro months on day 45 of them (the first used, the second half,
    the third whole), all three refunded at once, ten users side by side: in
    any order the first takes nothing, the second 15 days, the third 30, and
    the plan ends."""
    await wide_pool()
    users = [await new_user(admin) for _ in range(10)]
    bought = {user_id: [await paid_payment(user_id, "pro_month") for _ in range(3)] for user_id in users}
    for user_id in users:
        await days_pass(admin, user_id, 45)

    await asyncio.gather(
        *(
            apply_refund(payment.provider_payment_id or "", f"rf-stacked-{payment.id}", 49900)
            for payments in bought.values()
            for payment in payments
        )
    )

    for user_id, (first, second, third) in bought.items():
        [plan] = await subscription(admin, user_id)
        assert plan["status"] == "canceled"
        assert await taken_back(admin, first.id) == 0
        assert 15 * DAY - 60 < await taken_back(admin, second.id) <= 15 * DAY
        assert 30 * DAY - 60 < await taken_back(admin, third.id) <= 30 * DAY
    assert await db.audit_problems(admin) == []


async def test_a_device_refund_racing_its_link_takes_back_the_device_month_either_way(
    admin: asyncpg.Connection,
) -> None:
    """Account and device each hold a pro month; the device payment's refund
    and the link arrive together, ten pairs. Refunded first, the device's
    plan ends and nothing moves; linked first, the refund finds the device's
    time after the account's. Either way the account keeps its own month."""
    await wide_pool()
    pairs = []
    for _ in range(10):
        account = await get_or_create_clerk_user(f"user_{uuid4().hex[:12]}")
        device = await get_or_create_device_user(f"device-{uuid4().hex[:12]}", None, 5)
        await paid_payment(account.id, "pro_month")
        pairs.append((account, device, await paid_payment(device.id, "pro_month")))

    await side_by_side(
        (
            link_device(account.id, device.device_id or ""),
            apply_refund(bought.provider_payment_id or "", f"rf-racing-link-{bought.id}", 49900),
        )
        for account, device, bought in pairs
    )

    for account, _, bought in pairs:
        [plan] = [p for p in await subscription(admin, account.id) if p["status"] == "active"]
        assert plan["plan"] == "pro"
        assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY  # type: ignore[arg-type]
        assert 30 * DAY - 60 < await taken_back(admin, bought.id) <= 30 * DAY
    assert await db.audit_problems(admin) == []


async def test_a_device_refund_waiting_on_its_link_takes_from_the_accounts_balance(
    admin: asyncpg.Connection,
) -> None:
    """The account holds 210 tokens and pro, the device 1,005 and a premium
    month. A half refund of the premium payment (500 tokens, 15 days) waits
    behind the link for that payment, and then must take its 500 from the
    1,215 the account holds: computed from the wallet as the refund's
    snapshot saw it (210 - 500), it failed the balance check and was refused.
    The account's pro month, as premium, and 15 of the device's 30 days are
    left."""
    await wide_pool(10)
    account = await get_or_create_clerk_user(f"user_{uuid4().hex[:12]}")
    device = await get_or_create_device_user(f"device-{uuid4().hex[:12]}", None, 5)
    await paid_payment(account.id, "pro_month")
    bought = await paid_payment(device.id, "premium_month")
    async with admin.transaction():
        # the link, then the refund, queue for the device's payment
        await admin.execute("select 1 from payments where id = $1 for update", bought.id)
        link = asyncio.ensure_future(link_device(account.id, device.device_id or ""))
        await until_waiting_on_a_lock(admin)
        refund = asyncio.ensure_future(
            apply_refund(bought.provider_payment_id or "", "rf-behind-link", 74950)
        )
        await until_waiting_on_a_lock(admin, 2)
    await link
    result = await refund

    assert result.changed and result.credited_tokens == -500
    assert await db.balance(admin, account.id) == 1215 - 500
    [plan] = [p for p in await subscription(admin, account.id) if p["status"] == "active"]
    assert plan["plan"] == "premium"
    pro_worth = 30 * DAY * 49900 / 149900
    assert abs(float(plan["seconds_left"]) - (pro_worth + 15 * DAY)) < 60  # type: ignore[arg-type]
    assert await db.audit_problems(admin) == []


async def test_a_refund_waiting_on_a_conversion_of_the_plan_cuts_the_plan_as_converted(
    admin: asyncpg.Connection,
) -> None:
    """A transaction converts the user's pro into premium (an activation of
    premium: pro's 30 days become their 9.99 days' worth, its grant with
    them) while pro's refund waits. The refund must read the plan after the
    wait: it takes back those 9.99 premium days, not 30 days' worth of pro
    read from before the conversion."""
    user_id = await new_user(admin)
    pro = await paid_payment(user_id, "pro_month")
    async with admin.transaction():
        await admin.execute(ACTIVATE_PLAN, user_id, "premium", 30)
        refund = asyncio.ensure_future(apply_refund(pro.provider_payment_id or "", "rf-waiting", 49900))
        await until_waiting_on_a_lock(admin)
    assert (await refund).changed

    [plan] = await subscription(admin, user_id)
    assert (plan["plan"], plan["status"]) == ("premium", "active")
    assert 30 * DAY - 60 < float(plan["seconds_left"]) <= 30 * DAY + 1  # type: ignore[arg-type]
    assert abs(await plan_taken(admin, "rf-waiting") - 30 * DAY * 49900 / 149900) < 60


def a_zone_whose_clocks_go_forward_in_ten_days() -> str:
    """A POSIX zone, UTC+1 and UTC+2 in its summer, whose clocks go forward
    ten days from today (Europe/Berlin at the end of March behaves alike)."""
    today = datetime.now(UTC).timetuple().tm_yday
    forward, back = (today + 9) % 365 + 1, (today + 199) % 365 + 1
    return f"AAA-1BBB,J{forward}/2,J{back}/3"


async def test_a_chargeback_ends_the_month_whatever_the_databases_time_zone(
    admin: asyncpg.Connection,
) -> None:
    """In a zone with a clock change in ten days a calendar month is 719
    hours, and a refund that took back 719 hours as days left an hour of
    plan: the app's sessions work in UTC, whatever the database's zone."""
    name = await admin.fetchval("select current_database()")
    await admin.execute(
        f"alter database \"{name}\" set timezone = '{a_zone_whose_clocks_go_forward_in_ten_days()}'"
    )
    await pool.close_pool()
    try:
        user_id = await new_user(admin)
        payment = await paid_payment(user_id, "pro_month")
        await apply_refund(payment.provider_payment_id or "", "rf-clock-change", 49900)
    finally:
        await admin.execute(f'alter database "{name}" reset timezone')
        await pool.close_pool()
    [plan] = await subscription(admin, user_id)
    assert plan["status"] == "canceled"
    assert float(plan["seconds_left"]) <= 0  # type: ignore[arg-type]
    assert 30 * DAY - 60 < await plan_taken(admin, "rf-clock-change") <= 30 * DAY


# --------------------------------------------------------------- reconciler


async def test_open_payments_are_the_unsettled_ones_with_a_provider_id(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    old_pending = await attached_payment(user_id, provider_id="pp-old-pending")
    old_waiting = await attached_payment(user_id, provider_id="pp-old-waiting")
    await apply_provider_status("pp-old-waiting", "waiting_for_capture")
    await attached_payment(user_id, provider_id="pp-old-paid")
    await apply_provider_status("pp-old-paid", "succeeded")
    await create_pending_payment(user_id, "tokens_50", "key-never-attached")
    await admin.execute("update payments set created_at = now() - interval '1 hour'")
    await attached_payment(user_id, provider_id="pp-fresh")
    await admin.execute(
        "update payments set created_at = created_at - interval '1 minute' where provider_payment_id = $1",
        "pp-old-pending",
    )
    cut_off = await admin.fetchval("select now() - interval '10 minutes'")
    found = await open_payments(cut_off)
    assert [p.id for p in found] == [old_pending.id, old_waiting.id]
    assert [p.id for p in await open_payments(cut_off, limit=1)] == [old_pending.id]
    assert await open_payments(cut_off - timedelta(days=1)) == []
    with pytest.raises(InvalidRequest):
        await open_payments(cut_off, limit=0)


async def test_open_payments_come_least_recently_asked_about_first(admin: asyncpg.Connection) -> None:
    """A backlog that stays open (unpaid for hours) must not hold the head of
    every run: once asked about, a payment goes behind the ones not asked
    about yet, whatever their age, and `skip` leaves out this run's."""
    user_id = await new_user(admin)
    made = [await attached_payment(user_id, provider_id=f"pp-turn-{n}") for n in range(4)]
    for n, payment in enumerate(made):
        # made[3] the oldest
        await admin.execute(
            "update payments set created_at = now() - interval '1 hour' - $2 * interval '1 minute'"
            " where id = $1",
            payment.id,
            n,
        )
    cut_off = await admin.fetchval("select now() - interval '10 minutes'")
    assert [p.id for p in await open_payments(cut_off)] == [made[3].id, made[2].id, made[1].id, made[0].id]
    rows_before = await admin.fetch("select id, status, updated_at from payments order by id")

    await mark_reconciled([made[3].id, made[2].id])
    assert [p.id for p in await open_payments(cut_off)] == [made[1].id, made[0].id, made[3].id, made[2].id]
    await mark_reconciled([made[1].id])
    await mark_reconciled([made[3].id])
    assert [p.id for p in await open_payments(cut_off)] == [made[0].id, made[2].id, made[1].id, made[3].id]
    skipping = await open_payments(cut_off, skip=[made[0].id, made[1].id])
    assert [p.id for p in skipping] == [made[2].id, made[3].id]
    assert await admin.fetchval("select count(*) from payments where reconciled_at is not null") == 3
    # asking moves nothing: status and updated_at are as they were
    assert await admin.fetch("select id, status, updated_at from payments order by id") == rows_before
    await mark_reconciled([])


async def test_only_old_payments_without_a_provider_payment_are_abandoned(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    old_unattached = [(await create_pending_payment(user_id, "tokens_50", f"old-{n}"))[0] for n in range(3)]
    old_attached = await attached_payment(user_id, provider_id="pp-old-attached")
    await admin.execute("update payments set created_at = now() - interval '2 days'")
    young, _ = await create_pending_payment(user_id, "tokens_50", "key-young")
    cut_off = await admin.fetchval("select now() - interval '1 day'")

    assert await cancel_abandoned_payments(cut_off, limit=2) == 2
    assert await cancel_abandoned_payments(cut_off, limit=2) == 1
    assert await cancel_abandoned_payments(cut_off) == 0
    statuses = dict(await admin.fetch("select id, status from payments"))
    assert [statuses[p.id] for p in old_unattached] == ["canceled"] * 3
    assert (statuses[old_attached.id], statuses[young.id]) == ("pending", "pending")
    with pytest.raises(InvalidRequest):
        await cancel_abandoned_payments(cut_off, limit=0)


async def test_an_abandoned_payment_is_never_attached(admin: asyncpg.Connection) -> None:
    user_id = await new_user(admin)
    payment, _ = await create_pending_payment(user_id, "tokens_50", "key-abandoned")
    await admin.execute("update payments set created_at = now() - interval '2 days'")
    assert await cancel_abandoned_payments(await admin.fetchval("select now() - interval '1 day'")) == 1
    with pytest.raises(Conflict):
        await attach_provider_payment(payment.id, "pp-too-late", "https://yoomoney.test/pp-too-late")
    row = await admin.fetchrow("select status, provider_payment_id from payments where id = $1", payment.id)
    assert (row["status"], row["provider_payment_id"]) == ("canceled", None)
    # a provider's word on the id it never got changes nothing either
    assert await apply_provider_status("pp-too-late", "succeeded") == ApplyResult(
        payment=None, changed=False, credited_tokens=0
    )


async def test_abandoning_and_attaching_at_once_never_both_win(admin: asyncpg.Connection) -> None:
    """The reconciler's cancel and a late client's attach race on each of 20
    payments: each ends either attached and pending or canceled without a
    provider payment, never canceled with one."""
    await wide_pool()
    user_id = await new_user(admin)
    racing = [(await create_pending_payment(user_id, "tokens_50", f"key-race-{n}"))[0] for n in range(20)]
    await admin.execute("update payments set created_at = now() - interval '2 days'")
    cut_off = await admin.fetchval("select now() - interval '1 day'")

    async def attach(payment_id: UUID) -> bool:
        try:
            await attach_provider_payment(payment_id, f"pp-{payment_id}", None)
        except Conflict:
            return False
        return True

    attached = await asyncio.gather(
        *(attach(p.id) for p in racing[::2]),
        cancel_abandoned_payments(cut_off, limit=20),
        *(attach(p.id) for p in racing[1::2]),
    )
    canceled = attached.pop(len(racing) // 2)
    rows = await admin.fetch("select status, provider_payment_id from payments")
    outcomes = sorted((row["status"], row["provider_payment_id"] is not None) for row in rows)
    assert outcomes == sorted([("pending", True)] * sum(attached) + [("canceled", False)] * canceled)
    assert sum(attached) + canceled == len(racing)
