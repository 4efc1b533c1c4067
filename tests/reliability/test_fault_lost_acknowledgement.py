"""A lost commit acknowledgement: the statement committed, the connection
dropped before its answer arrived, and sql() ran it again. The retry finds
the write already made, so the write stands once; and the request, which
cannot tell its own write from a concurrent repeat's, still drops the
cached balance it may have changed.

Real faults only: tests/reliability/lossy_proxy.py lets the server finish a
command and closes the client's connection instead of passing the reply on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from database import config, pool
from repositories import generations, payments
from repositories import tokens as wallet
from tests import db
from tests.reliability.lossy_proxy import LossyProxy, lossy_proxy


@pytest.fixture
async def lossy(direct_url: str) -> AsyncIterator[LossyProxy]:
    async with lossy_proxy(direct_url) as proxy:
        await pool.close_pool()
        config.configure(url=proxy.url, non_pooling_url=direct_url, pool_min_size=1, pool_max_size=1)
        try:
            yield proxy
        finally:
            await pool.close_pool()


async def test_a_spend_whose_commit_ack_was_lost_is_made_once_and_shown_at_once(
    lossy: LossyProxy, admin: asyncpg.Connection
) -> None:
    """GET /api/tokens shows the caller's own spends at once. The retry used
    to answer 'replayed' and keep the cached 5 for 30 s after a 201 that said 4."""
    user_id = await db.insert_user(admin, device_id="device-lost-ack-spend")
    assert (await wallet.get_cached_balance(user_id)).balance == 5  # displayed, cached

    lossy.arm(b"SELECT")
    created = await generations.create_generation(user_id, "a lighthouse", "standard", "spend-lost-ack")

    assert lossy.dropped == 1
    assert created.balance == 4
    assert await db.balance(admin, user_id) == 4
    assert await admin.fetchval("select count(*) from generations where user_id = $1", user_id) == 1
    spends = await admin.fetchval(
        "select count(*) from token_transactions where user_id = $1 and type = 'spend'", user_id
    )
    assert spends == 1
    assert (await wallet.get_cached_balance(user_id)).balance == 4
    assert await db.audit_problems(admin) == []


async def test_a_credit_whose_commit_ack_was_lost_is_made_once_and_shown_at_once(
    lossy: LossyProxy, admin: asyncpg.Connection
) -> None:
    """The webhook's credit committed, its answer was lost, the retry found
    the payment succeeded: the tokens are credited once and the payer's
    cached balance no longer shows the balance before them."""
    user_id = await db.insert_user(admin, device_id="device-lost-ack-credit")
    payment, _ = await payments.create_pending_payment(user_id, "tokens_50", "buy-lost-ack")
    await payments.attach_provider_payment(payment.id, "prov-lost-ack-1", "https://pay.example/1")
    assert (await wallet.get_cached_balance(user_id)).balance == 5

    lossy.arm(b"SELECT")
    result = await payments.apply_provider_status(
        "prov-lost-ack-1", "succeeded", amount=payment.amount, currency=payment.currency
    )

    assert lossy.dropped == 1
    assert result.payment is not None and result.payment.status == "succeeded"
    assert await db.balance(admin, user_id) == 5 + payment.tokens
    credits = await admin.fetchval(
        "select count(*) from token_transactions where user_id = $1 and type = 'purchase'", user_id
    )
    assert credits == 1
    assert (await wallet.get_cached_balance(user_id)).balance == 5 + payment.tokens
    assert await db.audit_problems(admin) == []
