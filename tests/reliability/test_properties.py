"""The ledger under random sequences of everything that moves tokens.

Hypothesis generates lists of operations on a handful of users: get-or-create
(Clerk and device), credit, spend, generation create and result (a failure
refunds), link a device into an account, buy a package, the provider's
status for it and its refunds, and `again`: the previous operation repeated
exactly (same idempotency key, same provider ids, same result). Each runs
through the real repositories on the real database, against a small
in-memory model of what the rules in DESIGN.md say must happen. After every
operation its outcome must be the model's (applied, duplicate, refused with
which error); after every sequence each wallet's balance, its ledger keys,
every payment and generation must be the model's, and both audits (the
app's find_violations and tests/db.py's own) must be clean.

Every example starts from a truncated database (tests/db.reset on a direct
connection): the autouse fixture only runs once per test. The examples are
derandomized, so a failure reproduces on the next run; DREAMLENS_LEDGER_EXAMPLES
raises their number for a deeper local search.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from database import (
    Conflict,
    DeviceLinked,
    InsufficientTokens,
    NotFound,
    RateLimited,
    cache,
)
from repositories import audit, generations, payments, tokens, users
from tests import db

EXAMPLES = int(os.environ.get("DREAMLENS_LEDGER_EXAMPLES", "40"))

LEDGER_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # the same examples every run: a failure in CI is the failure on a laptop
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

CLERKS = ("user_prop_a", "user_prop_b")
DEVICES = ("device_prop_1", "device_prop_2", "device_prop_3")
NAMES = CLERKS + DEVICES
WELCOME = {"clerk": 10, "device": 5}
COSTS = {"standard": 1, "hd": 2}
FREE_DAILY_LIMIT = 20
DEVICE_BONUS_KEPT = users.DEVICE_BONUS_KEPT
# id, kind, tokens, period_days, amount (kopecks), as seeded by schema.sql
PACKAGES = {
    "tokens_50": ("tokens", 50, None, 9900),
    "tokens_200": ("tokens", 200, None, 29900),
    "pro_month": ("plan", 200, 30, 49900),
}
FORWARD = payments.FORWARD


# ------------------------------------------------------------------- model


@dataclass
class ModelUser:
    kind: str
    id: UUID | None = None
    balance: int = 0
    used_today: int = 0
    # the ledger's idempotency keys, with each caller-keyed row's amount
    keys: dict[str, int] = field(default_factory=dict)
    # generation key -> (generation id, prompt, quality, balance after its spend)
    generation_keys: dict[str, tuple[UUID, str, str, int]] = field(default_factory=dict)
    payment_keys: dict[str, UUID] = field(default_factory=dict)
    linked_to: str | None = None
    linked_tokens: int = 0
    # days of paid plan left (exact: the first refund share that matters is
    # tens of seconds, the test runs in milliseconds)
    plan_days: Fraction = Fraction(0)


@dataclass
class ModelGeneration:
    owner: str
    cost: int
    status: str = "pending"


@dataclass
class ModelPayment:
    owner: str
    package: str
    provider_id: str
    status: str = "pending"
    refunded: int = 0


@dataclass
class Model:
    users: dict[str, ModelUser] = field(default_factory=dict)
    generations: dict[UUID, ModelGeneration] = field(default_factory=dict)
    payments: list[UUID] = field(default_factory=list)
    payment_rows: dict[UUID, ModelPayment] = field(default_factory=dict)
    refund_ids: set[str] = field(default_factory=set)
    generation_order: list[UUID] = field(default_factory=list)

    def user(self, name: str) -> ModelUser | None:
        found = self.users.get(name)
        return found if found is not None and found.id is not None else None


# -------------------------------------------------------------- operations

names = st.sampled_from(NAMES)
caller_keys = st.sampled_from(("k0", "k1", "k2"))

operations = st.one_of(
    st.tuples(st.just("clerk"), st.sampled_from(CLERKS)),
    st.tuples(st.just("device"), st.sampled_from(DEVICES)),
    st.tuples(
        st.just("credit"),
        names,
        st.integers(1, 40),
        caller_keys,
        st.sampled_from(("purchase", "adjustment", "bonus")),
    ),
    st.tuples(st.just("spend"), names, st.integers(1, 12), caller_keys),
    st.tuples(
        st.just("generate"),
        names,
        st.sampled_from(("standard", "hd")),
        st.sampled_from(("g0", "g1", "g2")),
        st.sampled_from(("a cat", "a dog")),
    ),
    st.tuples(st.just("result"), st.integers(0, 20), st.sampled_from(("succeeded", "failed"))),
    # twice as likely: two devices into one account is where bonus farming hides
    st.tuples(st.just("link"), st.sampled_from(CLERKS), st.sampled_from(DEVICES)),
    st.tuples(st.just("link"), st.sampled_from(CLERKS), st.sampled_from(DEVICES)),
    st.tuples(st.just("buy"), names, st.sampled_from(sorted(PACKAGES)), st.sampled_from(("b0", "b1"))),
    st.tuples(
        st.just("provider"),
        st.integers(0, 10),
        st.sampled_from(("succeeded", "succeeded", "waiting_for_capture", "canceled")),
        # the provider's amount is ours, or (sometimes) not: never credited then
        st.sampled_from((True, True, True, False)),
    ),
    st.tuples(
        st.just("refund"),
        st.integers(0, 10),
        st.sampled_from(("r0", "r1", "r2", "r3")),
        st.sampled_from((Fraction(1, 4), Fraction(1, 2), Fraction(1))),
    ),
    st.tuples(st.just("again")),
)


# ------------------------------------------------------------------ runner


class Run:
    """Applies operations to the database and the model side by side."""

    def __init__(self) -> None:
        self.model = Model()
        self.previous: tuple[Any, ...] | None = None

    async def apply(self, op: tuple[Any, ...]) -> None:
        if op[0] == "again":
            if self.previous is None:
                return
            op = self.previous
        self.previous = op
        note(f"op {op}")
        outcome = await getattr(self, f"op_{op[0]}")(*op[1:])
        event(f"{op[0]}: {outcome or 'applied'}")

    # users

    async def ensure(self, name: str) -> ModelUser:
        """The user, made first (as the API's get-or-create would) when this
        is its first sight."""
        if self.model.user(name) is None:
            await (self.op_clerk(name) if name in CLERKS else self.op_device(name))
        found = self.model.user(name)
        assert found is not None
        return found

    def _created(self, name: str, user: users.User) -> None:
        model = self.model.users.get(name)
        if model is None:
            assert user.created, f"{name} existed before it was created"
            kind = "clerk" if name in CLERKS else "device"
            model = self.model.users[name] = ModelUser(kind=kind, id=user.id, balance=WELCOME[kind])
            model.keys["welcome_bonus"] = WELCOME[kind]
        else:
            assert not user.created, f"{name} was created twice"
            assert user.id == model.id

    async def op_clerk(self, name: str) -> str | None:
        self._created(name, await users.get_or_create_clerk_user(name))

    async def op_device(self, name: str) -> str | None:
        model = self.model.user(name)
        if model is not None and model.linked_to is not None:
            with pytest.raises(DeviceLinked):
                await users.get_or_create_device_user(name, None, 5)
            return "DeviceLinked"
        self._created(name, await users.get_or_create_device_user(name, None, 5))

    # plain credits and spends

    async def op_credit(self, name: str, amount: int, key: str, kind: str) -> str | None:
        model = await self.ensure(name)
        assert model.id is not None
        result = await tokens.credit(model.id, amount, kind, key)
        if key in model.keys:
            assert result.duplicate
            assert result.entry.amount == model.keys[key]
            return "duplicate"
        assert not result.duplicate
        model.balance += amount
        model.keys[key] = amount
        assert result.entry.balance_after == model.balance

    async def op_spend(self, name: str, amount: int, key: str) -> str | None:
        model = await self.ensure(name)
        assert model.id is not None
        if key not in model.keys and model.balance < amount:
            with pytest.raises(InsufficientTokens) as refused:
                await tokens.spend(model.id, amount, key)
            assert (refused.value.balance, refused.value.cost) == (model.balance, amount)
            return "InsufficientTokens"
        result = await tokens.spend(model.id, amount, key)
        if key in model.keys:
            assert result.duplicate
            assert result.entry.amount == model.keys[key]
            return "duplicate"
        assert not result.duplicate
        model.balance -= amount
        model.keys[key] = -amount
        assert result.entry.balance_after == model.balance

    # generations

    async def op_generate(self, name: str, quality: str, key: str, prompt: str) -> str | None:
        model = await self.ensure(name)
        assert model.id is not None
        create = generations.create_generation(model.id, prompt, quality, key)
        if model.linked_to is not None:
            with pytest.raises(DeviceLinked):
                await create
            return "DeviceLinked"
        earlier = model.generation_keys.get(key)
        if earlier is not None:
            if (earlier[1], earlier[2]) != (prompt, quality):
                with pytest.raises(Conflict):
                    await create
                return "Conflict"
            replay = await create
            assert replay.replayed
            assert (replay.generation.id, replay.balance) == (earlier[0], earlier[3])
            return "replayed"
        cost = COSTS[quality]
        limit = FREE_DAILY_LIMIT if model.plan_days <= 0 else 200
        if model.used_today >= limit:
            with pytest.raises(RateLimited):
                await create
            return "RateLimited"
        if model.balance < cost:
            with pytest.raises(InsufficientTokens) as refused:
                await create
            assert (refused.value.balance, refused.value.cost) == (model.balance, cost)
            return "InsufficientTokens"
        created = await create
        assert not created.replayed
        generation_id = created.generation.id
        model.balance -= cost
        model.used_today += 1
        model.keys[f"generation:{generation_id}"] = -cost
        model.generation_keys[key] = (generation_id, prompt, quality, model.balance)
        assert created.balance == model.balance
        self.model.generations[generation_id] = ModelGeneration(owner=name, cost=cost)
        self.model.generation_order.append(generation_id)

    async def op_result(self, index: int, status: str) -> str | None:
        if not self.model.generation_order:
            return "skipped"
        generation_id = self.model.generation_order[index % len(self.model.generation_order)]
        generation = self.model.generations[generation_id]
        finished = await generations.record_result(
            generation_id, status, "images/x.png" if status == "succeeded" else None, "boom"
        )
        if generation.status != "pending":
            assert finished.status == generation.status  # a repeat changes nothing
            return "unchanged"
        generation.status = status
        assert finished.status == status
        if status == "failed":
            # refunded to whoever owns the generation now (a linked device's
            # generations belong to the account)
            owner = self.model.users[generation.owner]
            owner.balance += generation.cost
            owner.keys[f"refund:{generation_id}"] = generation.cost

    # linking

    async def op_link(self, clerk: str, device: str) -> str | None:
        account = await self.ensure(clerk)
        assert account.id is not None
        target = self.model.user(device)
        if target is None:
            with pytest.raises(NotFound):
                await users.link_device(account.id, device)
            return "NotFound"
        if target.linked_to is not None and target.linked_to != clerk:
            with pytest.raises(Conflict):
                await users.link_device(account.id, device)
            return "Conflict"
        result = await users.link_device(account.id, device)
        if target.linked_to == clerk:
            assert result.moved_tokens == target.linked_tokens
            return "again"
        has_device = any(other.linked_to == clerk for other in self.model.users.values())
        kept = min(DEVICE_BONUS_KEPT, target.balance) if has_device else 0
        moved = target.balance - kept
        assert result.moved_tokens == moved
        if moved > 0:
            key = f"link:{target.id}"
            target.balance -= moved
            target.keys[key] = -moved
            account.balance += moved
            account.keys[key] = moved
        target.linked_to = clerk
        target.linked_tokens = moved
        # its generations and payments change owner
        for generation in self.model.generations.values():
            if generation.owner == device:
                generation.owner = clerk
        for payment in self.model.payment_rows.values():
            if payment.owner == device:
                payment.owner = clerk
        target.generation_keys.clear()
        target.payment_keys.clear()

    # payments

    async def op_buy(self, name: str, package: str, key: str) -> str | None:
        model = await self.ensure(name)
        # plans are bought by signed-in users here: linking does not move a
        # device's subscription (noted in the report), which this model
        # would otherwise have to encode as intended
        if model.linked_to is not None or (PACKAGES[package][0] == "plan" and name in DEVICES):
            return "skipped"
        assert model.id is not None
        payment, created = await payments.create_pending_payment(model.id, package, key)
        earlier = model.payment_keys.get(key)
        if earlier is not None:
            assert (payment.id, created) == (earlier, False)
        else:
            assert created
            model.payment_keys[key] = payment.id
            self.model.payments.append(payment.id)
            self.model.payment_rows[payment.id] = ModelPayment(
                owner=name, package=package, provider_id=f"pp-{payment.id}"
            )
        provider_id = self.model.payment_rows[payment.id].provider_id
        attached = await payments.attach_provider_payment(payment.id, provider_id, "https://pay.example/x")
        assert attached.provider_payment_id == provider_id

    async def op_provider(self, index: int, status: str, amount_matches: bool) -> str | None:
        if not self.model.payments:
            await self.op_buy(CLERKS[0], "tokens_50", "b0")
        payment_id = self.model.payments[index % len(self.model.payments)]
        payment = self.model.payment_rows[payment_id]
        kind, tokens_, period, amount = PACKAGES[payment.package]
        reported = amount if amount_matches else amount + 1
        result = await payments.apply_provider_status(payment.provider_id, status, reported, "RUB")
        if (payment.status, status) not in FORWARD or not amount_matches:
            assert not result.changed
            return "unchanged"
        assert result.changed
        payment.status = status
        if status != "succeeded":
            assert result.credited_tokens == 0
            return "not credited"
        owner = self.model.users[payment.owner]
        owner.balance += tokens_
        owner.keys[f"payment:{payment_id}"] = tokens_
        assert result.credited_tokens == tokens_
        if kind == "plan":
            assert period is not None
            owner.plan_days = max(owner.plan_days, Fraction(0)) + period

    async def op_refund(self, index: int, refund_id: str, share: Fraction) -> str | None:
        if not self.model.payments:
            await self.op_buy(CLERKS[0], "tokens_50", "b0")
        payment_id = self.model.payments[index % len(self.model.payments)]
        payment = self.model.payment_rows[payment_id]
        kind, tokens_, period, amount = PACKAGES[payment.package]
        refund_amount = math.ceil(amount * share)
        result = await payments.apply_refund(payment.provider_id, refund_id, refund_amount)
        if payment.status != "succeeded" or refund_id in self.model.refund_ids:
            assert not result.changed
            return "unchanged"
        assert result.changed
        self.model.refund_ids.add(refund_id)
        before, after = payment.refunded, min(amount, payment.refunded + refund_amount)
        due = tokens_ * after // amount - tokens_ * before // amount
        owner = self.model.users[payment.owner]
        taken = min(owner.balance, due)
        if taken > 0:
            owner.balance -= taken
            owner.keys[f"reversal:{payment_id}:{refund_id}"] = -taken
        assert result.credited_tokens == -taken
        payment.refunded = after
        if after >= amount:
            payment.status = "refunded"
        if kind == "plan" and owner.plan_days > 0:
            assert period is not None
            owner.plan_days -= period * Fraction(after - before, amount)
            if owner.plan_days <= 0:
                owner.plan_days = Fraction(0)

    # the books

    async def check(self, admin: asyncpg.Connection) -> None:
        for name, model in self.model.users.items():
            assert model.id is not None
            assert await db.balance(admin, model.id) == model.balance, name
            keys = {row["idempotency_key"]: row["amount"] for row in await db.ledger(admin, model.id)}
            assert keys == model.keys, name
            linked = await admin.fetchval("select linked_to_user_id from users where id = $1", model.id)
            expected = self.model.users[model.linked_to].id if model.linked_to else None
            assert linked == expected, name
            active = await admin.fetchval(
                "select count(*) from subscriptions where user_id = $1 and status = 'active'"
                " and current_period_end > now()",
                model.id,
            )
            assert active == (1 if model.plan_days > 0 else 0), name
        for generation_id, generation in self.model.generations.items():
            row = await admin.fetchrow("select user_id, status from generations where id = $1", generation_id)
            assert row is not None
            assert (row["user_id"], row["status"]) == (
                self.model.users[generation.owner].id,
                generation.status,
            )
        for payment_id, payment in self.model.payment_rows.items():
            row = await admin.fetchrow(
                "select user_id, status, refunded_amount from payments where id = $1", payment_id
            )
            assert row is not None
            owner = self.model.users[payment.owner].id
            assert (row["user_id"], row["status"], row["refunded_amount"]) == (
                owner,
                payment.status,
                payment.refunded,
            )
        assert await audit.find_violations() == []
        assert await db.audit_problems(admin) == []


@LEDGER_SETTINGS
@given(ops=st.lists(operations, min_size=8, max_size=40))
async def test_random_sequences_keep_the_books_equal_to_the_model(
    ops: list[tuple[Any, ...]], admin: asyncpg.Connection
) -> None:
    await db.reset(admin)
    cache.clear()
    run = Run()
    for op in ops:
        await run.apply(op)
    await run.check(admin)


@LEDGER_SETTINGS
@given(
    ops=st.lists(operations, min_size=4, max_size=15).map(
        # every operation twice in a row: each must apply once
        lambda listed: [op for pair in zip(listed, [("again",)] * len(listed), strict=True) for op in pair]
    )
)
async def test_every_operation_repeated_applies_once(
    ops: list[tuple[Any, ...]], admin: asyncpg.Connection
) -> None:
    await db.reset(admin)
    cache.clear()
    run = Run()
    for op in ops:
        await run.apply(op)
    await run.check(admin)
