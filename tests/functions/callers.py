"""Helpers for the endpoint tests: who calls (device ids, Clerk session
tokens), what the request log line counted, and a fingerprint of every table
to show a refused request wrote nothing."""

from __future__ import annotations

import json
import logging
import time
from functools import cache
from typing import Any

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from functions import settings
from tests import db

DEVICE = "device_test_0001"
OTHER_DEVICE = "device_test_0002"
CLERK_ID = "user_2clerkTEST"
# a generation as API.md shows it: GET /api/generations/{id} and the worker's result
GENERATION_FIELDS = {
    "id",
    "status",
    "prompt",
    "quality",
    "cost",
    "attempt",
    "image_key",
    "error",
    "created_at",
    "updated_at",
    "finished_at",
}


def device(device_id: str = DEVICE) -> dict[str, str]:
    return {"X-Device-Id": device_id}


# ---------------------------------------------------------------- Clerk


@cache
def clerk_key() -> tuple[rsa.RSAPrivateKey, str]:
    """One key pair per test session (2048-bit generation is not free)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, pem


def use_clerk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configure Clerk verification with the session's key pair."""
    monkeypatch.setenv("CLERK_JWT_KEY", clerk_key()[1])
    monkeypatch.delenv("CLERK_ISSUER", raising=False)
    monkeypatch.delenv("CLERK_AUTHORIZED_PARTIES", raising=False)
    settings.reset()


def clerk(clerk_id: str = CLERK_ID, email: str | None = None) -> dict[str, str]:
    """The Authorization header of a valid session token for `clerk_id`."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": clerk_id, "iat": now - 10, "nbf": now - 10, "exp": now + 300}
    if email is not None:
        claims["email"] = email
    token = jwt.encode(claims, clerk_key()[0], algorithm="RS256")
    return {"Authorization": f"Bearer {token}"}


# ----------------------------------------------------------- request log


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The request log lines so far (set `caplog.set_level(logging.INFO)` first)."""
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "dreamlens.request"]


def round_trips(caplog: pytest.LogCaptureFixture) -> list[int]:
    """Database round trips of each request so far, as its log line counted them
    (the handler runs on the Lambda runtime's thread, where the line is written)."""
    return [line["db_round_trips"] for line in request_lines(caplog)]


def capture_requests(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")


def _logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [
        (r.name, json.loads(r.getMessage()))
        for r in caplog.records
        if r.name in ("dreamlens.metrics", "dreamlens.request")
    ]


def _counted(logger: str, line: dict[str, Any]) -> list[dict[str, Any]]:
    """The directives of what the code counted: all of a metrics line's; a
    request line's after its first (the request's own Requests, LatencyMs...)."""
    directives: list[dict[str, Any]] = line["_aws"]["CloudWatchMetrics"]
    return directives if logger == "dreamlens.metrics" else directives[1:]


def metric_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The EMF documents that carry a metric the code emitted: a request's
    own line (emit() inside a request) or a line of its own (outside one)."""
    return [line for logger, line in _logged(caplog) if _counted(logger, line)]


def metric_names(caplog: pytest.LogCaptureFixture) -> list[list[str]]:
    """The metrics the code emitted, document by document."""
    return [
        [metric["Name"] for directive in _counted(logger, line) for metric in directive["Metrics"]]
        for logger, line in _logged(caplog)
        if _counted(logger, line)
    ]


# ------------------------------------------------------------- database


async def fingerprint(admin: asyncpg.Connection) -> dict[str, str | None]:
    """A digest of every row of every table: equal before and after means
    nothing was written (inserted, updated or deleted)."""
    digests: dict[str, str | None] = {}
    for table in db.DATA_TABLES:
        digests[table] = await admin.fetchval(
            f"select md5(string_agg(t::text, '|' order by t::text)) from {table} t"
        )
    return digests


async def user_id_of(
    admin: asyncpg.Connection, *, device_id: str | None = None, clerk_id: str | None = None
) -> Any:
    return await admin.fetchval(
        "select id from users where device_id = $1 or clerk_id = $2", device_id, clerk_id
    )
