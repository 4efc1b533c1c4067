"""The caller's wallet: GET /api/tokens and GET /api/tokens/transactions.

The balance here is for display and may be up to 30 s old (API.md): a warm
repeat caller is answered from the identity and balance caches without a
database round trip. Every write this process makes to the wallet drops the
cached balance, so a caller sees its own spends at once; another process's
writes show within the 30 s. GET /api/user reads the balance fresh.
"""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database.model import Model
from functions.app import build_app
from functions.http import json_response, no_query_params, page_params
from functions.identity import current_user
from functions.lambda_entry import LambdaEntry
from functions.openapi import endpoint
from repositories import tokens


class TokenBalance(Model):
    balance: int
    total_earned: int
    total_spent: int
    updated_at: datetime


class Transaction(Model):
    id: int
    amount: int  # signed: credits positive, debits negative
    balance_after: int
    type: str
    description: str | None
    reference: str | None
    created_at: datetime


class TransactionPage(Model):
    items: list[Transaction]
    next_before: int | None


@endpoint(auth="user", response=TokenBalance, errors=[422])
async def get_tokens(request: Request) -> Response:
    """The caller's balance and totals; may be up to 30 s old."""
    no_query_params(request)
    user = await current_user(request)
    balance = await tokens.get_cached_balance(user.id)
    return json_response(TokenBalance.model_validate(balance, from_attributes=True))


@endpoint(auth="user", response=TransactionPage, paged=int)
async def list_transactions(request: Request) -> Response:
    """The caller's ledger, newest first.

    Pass `next_before` back as `before` for the next page; it is null on the last.
    """
    limit, before = page_params(request, cursor=int)
    user = await current_user(request)
    page = await tokens.list_transactions(user.id, limit=limit, before=before)
    items = [Transaction.model_validate(entry, from_attributes=True) for entry in page.items]
    return json_response(TransactionPage(items=items, next_before=page.next_before))


routes = [
    Route("/api/tokens", get_tokens, methods=["GET"]),
    Route("/api/tokens/transactions", list_transactions, methods=["GET"]),
]
app = build_app(routes)
handler = LambdaEntry(app)
