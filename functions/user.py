"""The caller's account: GET /api/user and POST /api/user/link-device.

GET /api/user creates the caller on first sight (identity.py) and adds the
balance, read fresh (API.md: never the display cache), and the plan. A warm
repeat caller is resolved from the identity cache, so the whole request is
one statement (repositories.users.get_balance_and_plan).

Linking moves an anonymous device's account into the signed-in Clerk
account; the device id then answers 403 `device_linked` on its own. The
device's entry in this process's identity cache is dropped at once; another
warm process may act for the old device user until its entry expires (30 s).
It can only read there: a spend and a new payment are refused in their own
statements (403 `device_linked`), so no token can go into or out of the
wallet the device left behind.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database.model import Model
from functions.app import build_app
from functions.http import RequestModel, json_response, no_query_params, read_json
from functions.identity import DEVICE_ID, current_user, forget_identity, require_clerk_user
from functions.lambda_entry import LambdaEntry
from functions.openapi import endpoint
from repositories import users
from repositories.users import BalanceAndPlan, User


class UserAccount(Model):
    id: UUID
    clerk_id: str | None
    device_id: str | None
    email: str | None
    created_at: datetime
    balance: int
    plan: str


class LinkDevice(RequestModel):
    # anchored: pydantic searches for a pattern anywhere in the string
    device_id: str = Field(pattern=f"^{DEVICE_ID.pattern}$", description="The anonymous device's X-Device-Id")


class LinkedDevice(Model):
    user: UserAccount
    moved_tokens: int


def _account(user: User, standing: BalanceAndPlan) -> UserAccount:
    return UserAccount(
        id=user.id,
        clerk_id=user.clerk_id,
        device_id=user.device_id,
        email=user.email,
        created_at=user.created_at,
        balance=standing.balance,
        plan=standing.plan,
    )


@endpoint(auth="user", response=UserAccount, errors=[422])
async def get_user(request: Request) -> Response:
    """The caller, created on first sight, with the balance (read fresh) and plan."""
    no_query_params(request)
    user = await current_user(request)
    standing = await users.get_balance_and_plan(user.id)
    return json_response(_account(user, standing))


@endpoint(auth="clerk", request=LinkDevice, response=LinkedDevice, errors=[404, 409])
async def link_device(request: Request) -> Response:
    """Move an anonymous device's account (tokens, generations, payments, plan) into the caller's.

    The device's active plan becomes the caller's; when the caller has one
    too, the higher of the two is kept, extended by the device plan's time
    left at its worth in the kept plan (converted at the two plans' prices).

    Clerk users only. Linking the same device again answers what moved the
    first time; a device linked into another account is 409, an unknown one 404.
    """
    no_query_params(request)
    # input first: a bad request is refused before the caller is resolved
    # (which may create the account), so it writes nothing
    body = await read_json(request, LinkDevice)
    user = await require_clerk_user(request)
    linked = await users.link_device(user.id, body.device_id)
    forget_identity(device_id=body.device_id)
    standing = await users.get_balance_and_plan(user.id)
    return json_response(LinkedDevice(user=_account(linked.user, standing), moved_tokens=linked.moved_tokens))


routes = [
    Route("/api/user", get_user, methods=["GET"]),
    Route("/api/user/link-device", link_device, methods=["POST"]),
]
app = build_app(routes)
handler = LambdaEntry(app)
