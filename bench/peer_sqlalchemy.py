"""The peer: POST /api/generations written the way most teams would.

SQLAlchemy 2 async ORM over the same schema.sql tables, repository style:
look the price up, look the plan's daily limit up, `SELECT ... FOR UPDATE`
the wallet, check it in Python, change it, add the generation, the ledger
row and the usage row, commit: one transaction, about nine round trips.
The engine is `create_async_engine(url)` with its default pool and the
session factory SQLAlchemy's async docs recommend (`expire_on_commit=False`).

It leaves the database exactly as the project's spend does (wallet balance,
total_spent and daily counter; a `spend` ledger row with `balance_after` and
the `generation:<id>` key; a pending generation; a usage row), so timing the
two side by side compares the same work. `build_handler()` wraps it in a
FastAPI + Mangum Lambda handler (identity by `X-Device-Id`, get-or-create),
the shape a team would deploy.

`uv run python bench/peer_sqlalchemy.py` checks those effects and the ledger
audit, then times create_generation directly and through the 2 ms proxy.
"""

# No `from __future__ import annotations`: FastAPI reads the handler's
# annotations at runtime, and they name things local to build_handler().
import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, Field
from sqlalchemy import BigInteger, DateTime, ForeignKey, Identity, Text, func, select
from sqlalchemy.dialects.postgresql import INET
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# ------------------------------------------------------------------- models


class Base(DeclarativeBase):
    # every timestamp in schema.sql is timestamptz
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: DateTime(timezone=True)}


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    clerk_id: Mapped[str | None] = mapped_column(Text, unique=True)
    device_id: Mapped[str | None] = mapped_column(Text, unique=True)
    email: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class UserToken(Base):
    __tablename__ = "user_tokens"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), primary_key=True)
    balance: Mapped[int] = mapped_column(default=0)
    total_earned: Mapped[int] = mapped_column(default=0)
    total_spent: Mapped[int] = mapped_column(default=0)
    generations_today: Mapped[int] = mapped_column(default=0)
    generations_day: Mapped[date | None]
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class TokenTransaction(Base):
    __tablename__ = "token_transactions"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    amount: Mapped[int]
    balance_after: Mapped[int]
    type: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    reference: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Generation(Base):
    __tablename__ = "generations"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    prompt: Mapped[str] = mapped_column(Text)
    quality: Mapped[str] = mapped_column(Text)
    cost: Mapped[int]
    status: Mapped[str] = mapped_column(Text, default="pending")
    attempt: Mapped[int] = mapped_column(default=0)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class UsageLog(Base):
    __tablename__ = "usage_logs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(Text)
    source_ip: Mapped[str | None] = mapped_column(INET)
    reference: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class GenerationPrice(Base):
    __tablename__ = "generation_prices"

    quality: Mapped[str] = mapped_column(Text, primary_key=True)
    cost: Mapped[int]


class Plan(Base):
    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    daily_generation_limit: Mapped[int]


class Subscription(Base):
    __tablename__ = "subscriptions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    plan: Mapped[str] = mapped_column(ForeignKey("plans.id"))
    status: Mapped[str] = mapped_column(Text)
    current_period_end: Mapped[datetime]


# ------------------------------------------------------------------- errors


class PeerError(Exception):
    status = 400


class UnknownQuality(PeerError):
    status = 422


class WalletNotFound(PeerError):
    status = 404


class DailyLimitReached(PeerError):
    status = 429


class NotEnoughTokens(PeerError):
    status = 402

    def __init__(self, balance: int, cost: int) -> None:
        super().__init__(f"balance {balance}, cost {cost}")
        self.balance = balance
        self.cost = cost


# -------------------------------------------------------------- the service


@dataclass(frozen=True)
class CreatedGeneration:
    id: uuid.UUID
    status: str
    cost: int
    balance: int
    prompt: str
    quality: str
    created_at: datetime


async def get_price(session: AsyncSession, quality: str) -> GenerationPrice | None:
    return await session.scalar(select(GenerationPrice).where(GenerationPrice.quality == quality))


async def get_daily_limit(session: AsyncSession, user_id: uuid.UUID) -> int:
    active_plan = (
        select(Subscription.plan)
        .where(Subscription.user_id == user_id, Subscription.status == "active")
        .scalar_subquery()
    )
    limit = await session.scalar(
        select(Plan.daily_generation_limit).where(Plan.id == func.coalesce(active_plan, "free"))
    )
    return int(limit or 0)


async def create_generation(
    session: AsyncSession,
    user_id: uuid.UUID,
    prompt: str,
    quality: str = "standard",
    idempotency_key: str | None = None,
) -> CreatedGeneration:
    """Spend the price of one generation and queue it, in one transaction
    (the session's: it begins on first use, as with any repository code that
    shares a request's session, and this commits it)."""
    try:
        price = await get_price(session, quality)
        if price is None:
            raise UnknownQuality(quality)
        daily_limit = await get_daily_limit(session, user_id)
        wallet = await session.scalar(select(UserToken).where(UserToken.user_id == user_id).with_for_update())
        if wallet is None:
            raise WalletNotFound(str(user_id))
        today = datetime.now(UTC).date()
        used_today = wallet.generations_today if wallet.generations_day == today else 0
        if used_today >= daily_limit:
            raise DailyLimitReached(f"{daily_limit} generations a day")
        if wallet.balance < price.cost:
            raise NotEnoughTokens(wallet.balance, price.cost)

        wallet.balance -= price.cost
        wallet.total_spent += price.cost
        wallet.generations_today = used_today + 1
        wallet.generations_day = today
        wallet.updated_at = datetime.now(UTC)

        generation = Generation(
            id=uuid.uuid4(),
            user_id=user_id,
            prompt=prompt,
            quality=quality,
            cost=price.cost,
            status="pending",
            idempotency_key=idempotency_key,
        )
        session.add(generation)
        session.add(
            TokenTransaction(
                user_id=user_id,
                amount=-price.cost,
                balance_after=wallet.balance,
                type="spend",
                description=f"Generation ({quality})",
                reference=str(generation.id),
                idempotency_key=f"generation:{generation.id}",
            )
        )
        session.add(UsageLog(user_id=user_id, action="generation", reference=str(generation.id)))
        # the commit flushes: UPDATE wallet, INSERT generation, ledger, usage
        await session.commit()
    except BaseException:
        await session.rollback()
        raise
    return CreatedGeneration(
        id=generation.id,
        status=generation.status,
        cost=price.cost,
        balance=wallet.balance,
        prompt=prompt,
        quality=quality,
        created_at=generation.created_at,
    )


# ------------------------------------------------------------------- engine


def engine_url(asyncpg_url: str) -> tuple[str, dict[str, Any]]:
    """An asyncpg DSN as SQLAlchemy wants it, and the connect_args it needs
    (asyncpg takes `ssl=`, not libpq's `sslmode=`)."""
    parts = urlsplit(asyncpg_url)
    query = dict(parse_qsl(parts.query))
    connect_args: dict[str, Any] = {}
    if query.pop("sslmode", None) == "disable":
        connect_args["ssl"] = False
    url = urlunsplit(parts._replace(scheme="postgresql+asyncpg", query=urlencode(query)))
    return url, connect_args


def make_engine(asyncpg_url: str, **options: Any) -> AsyncEngine:
    url, connect_args = engine_url(asyncpg_url)
    return create_async_engine(url, connect_args=connect_args, **options)


def make_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


# ------------------------------------------------------------ Lambda handler


class GenerationIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=2000)
    quality: str = "standard"


def build_handler(asyncpg_url: str) -> Any:
    """A FastAPI + Mangum handler for POST /api/generations over the peer,
    built the usual way: an engine per process, a session per request."""
    from fastapi import Depends, FastAPI, Header, Request
    from fastapi.responses import JSONResponse
    from mangum import Mangum

    engine: AsyncEngine | None = None
    sessions: async_sessionmaker[AsyncSession] | None = None

    async def get_session() -> Any:
        # the engine binds to the loop Mangum runs on, so it is made lazily
        nonlocal engine, sessions
        if sessions is None:
            engine = make_engine(asyncpg_url)
            sessions = make_sessions(engine)
        async with sessions() as session:
            yield session

    app = FastAPI()

    @app.exception_handler(PeerError)
    async def peer_error(_: Request, exc: PeerError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=exc.status)

    @app.post("/api/generations", status_code=201)
    async def post_generation(
        body: GenerationIn,
        x_device_id: Annotated[str, Header()],
        session: Annotated[AsyncSession, Depends(get_session)],
    ) -> dict[str, Any]:
        user = await session.scalar(select(User).where(User.device_id == x_device_id))
        if user is None:
            user = User(id=uuid.uuid4(), device_id=x_device_id)
            session.add(user)
            await session.flush()
        created = await create_generation(session, user.id, body.prompt, body.quality)
        return {
            "id": str(created.id),
            "status": created.status,
            "cost": created.cost,
            "balance": created.balance,
            "prompt": created.prompt,
            "quality": created.quality,
            "created_at": created.created_at.isoformat(),
        }

    return Mangum(app, lifespan="off")


# ---------------------------------------------------------------- self-check


async def _check_effects(database_url: str) -> None:
    import asyncpg
    from harness import audit_problems, seed_users

    admin = await asyncpg.connect(database_url)
    engine = make_engine(database_url)
    sessions = make_sessions(engine)
    try:
        users = await seed_users(admin, 2, balance=0, prefix="peer")  # 10 tokens each (welcome bonus)
        rich, poor = users.ids
        async with sessions() as session:
            first = await create_generation(session, rich, "a lighthouse at dawn", "hd")
            for _ in range(3):
                await create_generation(session, rich, "a fox in snow")
        assert first.cost == 2 and first.balance == 8, first
        wallet = await admin.fetchrow("select * from user_tokens where user_id = $1", rich)
        assert (wallet["balance"], wallet["total_spent"], wallet["generations_today"]) == (5, 5, 4), wallet
        ledger = await admin.fetch(
            "select amount, balance_after, type, reference, idempotency_key"
            "  from token_transactions where user_id = $1 order by id",
            rich,
        )
        assert [(r["amount"], r["balance_after"], r["type"]) for r in ledger] == [
            (10, 10, "bonus"),
            (-2, 8, "spend"),
            (-1, 7, "spend"),
            (-1, 6, "spend"),
            (-1, 5, "spend"),
        ], ledger
        assert ledger[1]["idempotency_key"] == f"generation:{first.id}"
        assert ledger[1]["reference"] == str(first.id)
        generations = await admin.fetchval(
            "select count(*) from generations where user_id = $1 and status = 'pending'", rich
        )
        usage = await admin.fetchval(
            "select count(*) from usage_logs where user_id = $1 and action = 'generation'", rich
        )
        assert (generations, usage) == (4, 4)

        # a wallet that cannot pay is left untouched
        await admin.execute(
            "with spent as (update user_tokens set balance = 1, total_spent = 9 where user_id = $1"
            "               returning user_id)"
            " insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)"
            " select user_id, -9, 1, 'adjustment', 'drain' from spent",
            poor,
        )
        async with sessions() as session:
            try:
                await create_generation(session, poor, "too expensive", "hd")
                raise AssertionError("an overdraft was allowed")
            except NotEnoughTokens as refused:
                assert (refused.balance, refused.cost) == (1, 2)
        assert await admin.fetchval("select balance from user_tokens where user_id = $1", poor) == 1

        # concurrent spends on one wallet: the row lock serializes them, none overdraws
        hot = (await seed_users(admin, 1, balance=10, prefix="peer_hot")).ids[0]  # 20 tokens

        async def spend_once() -> bool:
            async with sessions() as session:
                try:
                    await create_generation(session, hot, "contended")
                    return True
                except (NotEnoughTokens, DailyLimitReached):
                    return False

        outcomes = await asyncio.gather(*(spend_once() for _ in range(30)))
        assert sum(outcomes) == 20, sum(outcomes)  # the free plan's daily limit is 20 too
        assert await admin.fetchval("select balance from user_tokens where user_id = $1", hot) == 0
        assert await audit_problems(admin) == []
    finally:
        await engine.dispose()
        await admin.close()
    print("peer effects: wallet, ledger (balance_after, generation:<id> key), generation, usage row: OK")
    print("peer refuses an overdraft; 30 concurrent spends on 20 tokens: 20 applied; audit clean")


async def _round_trips_per_call(database: Any, calls: int = 20) -> float:
    """Statements the peer sends per create_generation, counted on the wire
    (client-to-server chunks through a proxy with no delay)."""
    import asyncpg
    from delay_proxy import DelayProxy
    from harness import seed_users

    admin = await asyncpg.connect(database.url)
    try:
        users = (await seed_users(admin, calls, balance=10, prefix="peer_count")).ids
    finally:
        await admin.close()
    proxy = DelayProxy(database.upstream, delay_ms=0)
    await proxy.open()
    engine = make_engine(database.url_for("127.0.0.1", proxy.port))
    sessions = make_sessions(engine)
    try:
        async with sessions() as session:  # connect and warm the statement cache first
            await create_generation(session, users[0], "warm-up")
        before = proxy.chunks_to_server
        for user_id in users[1:]:
            async with sessions() as session:
                await create_generation(session, user_id, "counted")
        return (proxy.chunks_to_server - before) / (len(users) - 1)
    finally:
        await engine.dispose()
        await proxy.close()


async def _time_peer(database_url: str, count: int, label: str) -> Any:
    import asyncpg
    from harness import seed_users, summarize, time_calls

    admin = await asyncpg.connect(database_url)
    try:
        # many users, so the free plan's 20-a-day limit never stops the loop
        users = (await seed_users(admin, 200, balance=100, prefix=f"peer_{label}")).ids
    finally:
        await admin.close()
    engine = make_engine(database_url)
    sessions = make_sessions(engine)
    turn = iter(range(10**9))

    async def one() -> None:
        user_id = users[next(turn) % len(users)]
        async with sessions() as session:
            await create_generation(session, user_id, "a lighthouse at dawn")

    try:
        samples = await time_calls(one, count, warmup=50, budget_s=90)
    finally:
        await engine.dispose()
    return summarize(samples)


def _time_peer_handler(database: Any, url: str, count: int, label: str) -> Any:
    """POST /api/generations through the peer's FastAPI + Mangum handler."""
    import asyncpg
    from harness import api_gateway_v2_event, lambda_context, run_sync, seed_users, summarize, time_sync_calls

    async def seed() -> list[str]:
        admin = await asyncpg.connect(database.url)
        try:
            users = await seed_users(admin, 200, balance=100, prefix=f"peer{label}", kind="device")
            return users.identities
        finally:
            await admin.close()

    devices = run_sync(seed)
    handler = build_handler(url)
    turn = iter(range(10**9))

    def one() -> None:
        device = devices[next(turn) % len(devices)]
        event = api_gateway_v2_event(
            "POST",
            "/api/generations",
            headers={"X-Device-Id": device},
            body={"prompt": "a lighthouse at dawn"},
        )
        response = handler(event, lambda_context())
        assert response["statusCode"] == 201, response

    return summarize(time_sync_calls(one, count, warmup=20, budget_s=60))


def main() -> None:
    from delay_proxy import DelayProxy
    from harness import banner, bench_database

    count = 400
    with bench_database() as database:
        banner("SQLAlchemy peer: create_generation", database)
        asyncio.run(_check_effects(database.url))
        round_trips = asyncio.run(_round_trips_per_call(database))
        print(f"peer round trips per create_generation (on the wire): {round_trips:.1f}")
        figures = {"create_generation direct": asyncio.run(_time_peer(database.url, count, "direct"))}
        with DelayProxy(database.upstream, delay_ms=2.0) as proxy:
            proxied_url = database.url_for("127.0.0.1", proxy.port)
            figures["create_generation via 2 ms proxy"] = asyncio.run(
                _time_peer(proxied_url, count, "proxied")
            )
            figures["handler POST /api/generations via 2 ms proxy"] = _time_peer_handler(
                database, proxied_url, count // 2, "proxiedhandler"
            )
        figures["handler POST /api/generations direct"] = _time_peer_handler(
            database, database.url, count // 2, "directhandler"
        )
        for label, summary in figures.items():
            print(f"peer {label:<46} {summary.line()}")
        added = figures["create_generation via 2 ms proxy"].p50 - figures["create_generation direct"].p50
        print(
            f"distance cost: +{added:.1f} ms p50 for {round_trips:.0f} round trips "
            f"(≥ {4 * round_trips:.0f} ms)"
        )


if __name__ == "__main__":
    main()
