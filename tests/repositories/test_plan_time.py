"""Plan time against a model of it: random purchases, refunds, gifts, days
passing, expiries and a link, and after every step the database must hold
what the model says the user paid for.

The model counts plan time as its worth in roubles at the plans' prices per
day, so a conversion between plans changes nothing in it. The time runs in
parts, first to last: each is one payment's grant, or time that no grant
records (a month credited before migration 0007, or `activate_plan`). Days
passing use the parts up from the front. A refund of a recorded payment
takes back the refunded share of its worth, never more than its part has
left; a refund of an unrecorded one takes its share from the unrecorded
parts, earliest first, and never from a grant's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from uuid import UUID, uuid4

import asyncpg
import pytest

from repositories.payments import apply_refund
from repositories.subscriptions import activate_plan, expire_ended
from repositories.users import get_or_create_clerk_user, get_or_create_device_user, link_device
from tests import db
from tests.repositories import days_pass, paid_payment

PLANS = ("pro", "premium")
AMOUNT = {"pro": 49900, "premium": 149900}  # kopecks, as the packages cost
WORTH_PER_DAY = {"pro": 499 / 30, "premium": 1499 / 30}
RANK = {"pro": 1, "premium": 2}  # the higher daily limit is kept
CLOSE = 0.05  # roubles: about 4 minutes of premium


@dataclass
class Paid:
    plan: str
    recorded: bool
    refunded: int = 0  # kopecks
    taken: float = 0.0  # roubles of plan time taken back


@dataclass
class Part:
    payment_id: UUID | None  # None: time no grant records
    worth: float  # roubles of it left


@dataclass
class PlanTime:
    plan: str | None = None
    parts: list[Part] = field(default_factory=list)
    paid: dict[UUID, Paid] = field(default_factory=dict)

    def left(self) -> float:
        return sum(part.worth for part in self.parts)

    def add(self, payment_id: UUID | None, plan: str, worth: float) -> None:
        if self.plan is None or self.left() <= 1e-9:
            self.plan, self.parts = plan, []
        elif RANK[plan] > RANK[self.plan]:
            self.plan = plan
        self.parts.append(Part(payment_id, worth))

    def buy(self, payment_id: UUID, plan: str, recorded: bool) -> None:
        self.paid[payment_id] = Paid(plan, recorded)
        self.add(payment_id if recorded else None, plan, 30 * WORTH_PER_DAY[plan])

    def days_pass(self, days: int) -> None:
        if self.plan is None:
            return
        using = days * WORTH_PER_DAY[self.plan]
        for part in self.parts:
            used = min(using, part.worth)
            part.worth -= used
            using -= used

    def refund(self, payment_id: UUID, amount: int) -> None:
        paid = self.paid[payment_id]
        share_before = paid.refunded / AMOUNT[paid.plan]
        paid.refunded = min(AMOUNT[paid.plan], paid.refunded + amount)
        share_after = paid.refunded / AMOUNT[paid.plan]
        worth = 30 * WORTH_PER_DAY[paid.plan]
        if self.plan is None:
            return
        if paid.recorded:
            own = [part for part in self.parts if part.payment_id == payment_id]
            cut = max(0.0, min(share_after * worth - paid.taken, own[0].worth if own else 0.0))
            if own:
                own[0].worth -= cut
            paid.taken += cut
        else:
            wanted = (share_after - share_before) * worth
            for part in self.parts:
                if part.payment_id is None:
                    cut = min(wanted, part.worth)
                    part.worth -= cut
                    wanted -= cut
        if self.left() <= 1e-9:
            self.plan, self.parts = None, []

    def take_in(self, device: PlanTime) -> None:
        """The link: the device's payments become the account's, and its time
        comes after the account's on the higher of the two plans."""
        self.paid.update(device.paid)
        if device.plan is not None and device.left() > 1e-9:
            for part in device.parts:
                self.add(part.payment_id, device.plan, part.worth)
        device.plan, device.parts = None, []


async def holds_what_the_model_says(
    admin: asyncpg.Connection, user_id: UUID, model: PlanTime, log: list[str]
) -> None:
    row = await admin.fetchrow(
        "select plan, extract(epoch from current_period_end - now())::float8 / 86400 as days_left"
        "  from subscriptions"
        " where user_id = $1 and status = 'active' and current_period_end > now()",
        user_id,
    )
    held = 0.0 if row is None else row["days_left"] * WORTH_PER_DAY[row["plan"]]
    assert abs(held - model.left()) < CLOSE, "; ".join(log)
    if model.left() > CLOSE:
        assert row is not None and row["plan"] == model.plan, "; ".join(log)
    for payment_id, paid in model.paid.items():
        if not paid.recorded:
            continue
        grant = await admin.fetchrow(
            "select plan, extract(epoch from taken_back)::float8 / 86400 as days"
            "  from plan_grants where payment_id = $1",
            payment_id,
        )
        assert grant is not None, "; ".join(log)
        taken = grant["days"] * WORTH_PER_DAY[grant["plan"]]
        assert abs(taken - paid.taken) < CLOSE, "; ".join(log)


async def random_step(
    admin: asyncpg.Connection,
    rng: random.Random,
    user_id: UUID,
    users: list[UUID],
    model: dict[UUID, PlanTime],
) -> str:
    """One random thing happening to `user_id`'s plan; what it was, for the log."""
    step = rng.choice(["buy", "buy", "buy before 0007", "refund", "refund", "days", "expire", "gift"])
    if step.startswith("buy"):
        plan = rng.choice(PLANS)
        payment = await paid_payment(user_id, f"{plan}_month")
        recorded = step == "buy"
        if not recorded:  # credited by code from before plan_grants
            await admin.execute("delete from plan_grants where payment_id = $1", payment.id)
        model[user_id].buy(payment.id, plan, recorded)
        return f"{step} {plan} {payment.provider_payment_id}"
    if step == "refund":
        if not model[user_id].paid:
            return "no refund: nothing paid"
        payment_id = rng.choice(list(model[user_id].paid))
        amount = AMOUNT[model[user_id].paid[payment_id].plan] * rng.choice([1, 2, 4]) // 4
        provider_id = await admin.fetchval(
            "select provider_payment_id from payments where id = $1", payment_id
        )
        await apply_refund(provider_id, f"rf-{uuid4()}", amount)
        model[user_id].refund(payment_id, amount)
        return f"refund {amount} of {provider_id}"
    if step == "days":
        days = rng.randint(1, 20)
        for someone in users:
            await days_pass(admin, someone, days)
            model[someone].days_pass(days)
        return f"{days} days pass"
    if step == "expire":
        await expire_ended()
        return "expire"
    plan, days = rng.choice(PLANS), rng.randint(1, 20)
    await activate_plan(user_id, plan, days)
    model[user_id].add(None, plan, days * WORTH_PER_DAY[plan])
    return f"gift {plan} {days} days"


@pytest.mark.parametrize("seed", range(120))
async def test_one_users_plan_time_is_what_they_paid_for(admin: asyncpg.Connection, seed: int) -> None:
    rng = random.Random(seed)
    user_id = await db.insert_user(admin, clerk_id=f"user_{uuid4().hex[:12]}")
    model = {user_id: PlanTime()}
    log: list[str] = []
    for _ in range(20):
        log.append(await random_step(admin, rng, user_id, [user_id], model))
        await holds_what_the_model_says(admin, user_id, model[user_id], log)
    assert await db.audit_problems(admin) == []


@pytest.mark.parametrize("seed", range(120))
async def test_a_linked_accounts_plan_time_is_what_it_and_its_device_paid_for(
    admin: asyncpg.Connection, seed: int
) -> None:
    rng = random.Random(seed)
    account = await get_or_create_clerk_user(f"user_{uuid4().hex[:12]}")
    device = await get_or_create_device_user(f"device-{uuid4().hex[:12]}", None, 5)
    users = [account.id, device.id]
    model = {account.id: PlanTime(), device.id: PlanTime()}
    log: list[str] = []
    for _ in range(10):
        someone = rng.choice(users)
        log.append(
            f"{'account' if someone == account.id else 'device'}: "
            + await random_step(admin, rng, someone, users, model)
        )
        for user_id in users:
            await holds_what_the_model_says(admin, user_id, model[user_id], log)
    await link_device(account.id, device.device_id or "")
    model[account.id].take_in(model[device.id])
    log.append("link")
    await holds_what_the_model_says(admin, account.id, model[account.id], log)
    for _ in range(10):
        log.append(await random_step(admin, rng, account.id, [account.id], model))
        await holds_what_the_model_says(admin, account.id, model[account.id], log)
    assert await db.audit_problems(admin) == []
