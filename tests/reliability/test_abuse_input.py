"""Hostile request bodies: too large, too deep, too wide, not text, text
that looks like SQL or stretches Unicode.

Every case answers a JSON error of API.md (413 / 400 / 422 `invalid_request`)
or, where the input is valid, stores it exactly as sent; a refused request
writes nothing (a fingerprint of every table is unchanged). Bodies too large
are refused with and without Content-Length, through API Gateway events and
over a real socket (also chunked). Deep and wide JSON is refused without a
crash and within a bound on the memory it costs, measured with tracemalloc
(both threads: the Lambda runtime's and this one).
"""

from __future__ import annotations

import contextlib
import json
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest

from functions import settings
from tests import db
from tests.reliability.abuse_support import (
    VERSIONS,
    YOOKASSA_SOURCE,
    abuse_runtime,  # noqa: F401 (an autouse fixture)
    call,
    fingerprint,
    served,  # noqa: F401 (a fixture)
)

LIMIT = settings.DEFAULT_MAX_BODY_BYTES
DEVICE = "device_input_0001"
USER = {"X-Device-Id": DEVICE, "Content-Type": "application/json"}
SECRET = "callback-secret-for-input-tests"


@pytest.fixture
async def known_device(admin: asyncpg.Connection) -> AsyncIterator[dict[str, str | None]]:
    """The caller exists (so a refusal cannot hide behind a failed signup);
    afterwards the books must balance."""
    created = await call("user", "GET", "/api/user", headers={"X-Device-Id": DEVICE})
    assert created.status == 200
    before = await fingerprint(admin)
    yield before
    assert await db.audit_problems(admin) == []


def padded(document: dict[str, Any], size: int) -> str:
    """`document` as JSON, padded with whitespace to exactly `size` bytes."""
    text = json.dumps(document)
    assert len(text.encode()) <= size
    return text + " " * (size - len(text.encode()))


def assert_json_error(response: Any, status: int) -> None:
    assert response.status == status, response.body
    assert isinstance(response.body, dict)
    assert response.body["error"] == "invalid_request"
    assert isinstance(response.body["message"], str)
    assert set(response.body) <= {"error", "message", "details"}


# ------------------------------------------------------------ size limit


BODY_ENDPOINTS = {
    "generations": "/api/generations",
    "user": "/api/user/link-device",
    "payments": "/api/payments",
    "worker": "/api/worker/claim",
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("content_length", [True, False], ids=["with_length", "without_length"])
async def test_a_body_over_the_limit_is_413_and_writes_nothing(
    version: str,
    content_length: bool,
    known_device: dict[str, str | None],
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GENERATION_CALLBACK_SECRET", SECRET)
    settings.reset()
    headers = {**USER, "X-Callback-Secret": SECRET}
    body = padded({"prompt": "a cat"}, LIMIT + 1)
    for function, path in BODY_ENDPOINTS.items():
        response = await call(
            function, "POST", path, version=version, headers=headers, body=body, content_length=content_length
        )
        assert_json_error(response, 413)
        assert response.body["message"] == f"Request body is larger than {LIMIT} bytes"
    assert await fingerprint(admin) == known_device


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_body_of_exactly_the_limit_is_read(
    version: str, known_device: dict[str, str | None], admin: asyncpg.Connection
) -> None:
    response = await call(
        "generations",
        "POST",
        "/api/generations",
        version=version,
        headers=USER,
        body=padded({"prompt": "a cat at the limit"}, LIMIT),
    )
    assert response.status == 201, response.body
    assert await admin.fetchval("select prompt from generations") == "a cat at the limit"


async def test_over_http_a_body_over_the_limit_is_413_with_length_and_chunked(
    served: httpx.AsyncClient,  # noqa: F811
    admin: asyncpg.Connection,
) -> None:
    assert (await served.get("/api/user", headers={"X-Device-Id": DEVICE})).status_code == 200
    before = await fingerprint(admin)
    body = padded({"prompt": "a cat"}, LIMIT + 1).encode()

    with_length = await served.post("/api/generations", content=body, headers=USER)
    assert with_length.status_code == 413
    assert with_length.json()["error"] == "invalid_request"

    async def chunks() -> AsyncIterator[bytes]:
        # 1 MiB in 16 KiB chunks, no Content-Length: the server must stop
        # reading at the limit, not buffer the lot
        for _ in range(64):
            yield b" " * 16 * 1024

    chunked = await served.post("/api/generations", content=chunks(), headers=USER)
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413
    assert chunked.json()["error"] == "invalid_request"
    assert await fingerprint(admin) == before


# ------------------------------------------------------- deep and wide JSON


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of traced allocations while the block runs, in bytes, over
    every thread (the handler runs on the Lambda runtime's)."""
    measured: list[int] = []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        yield measured
        measured.append(tracemalloc.get_traced_memory()[1] - baseline)
    finally:
        tracemalloc.stop()


def deep_arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def wide_object(size: int) -> str:
    """As many distinct keys as fit in `size` bytes."""
    keys = []
    used = 2
    n = 0
    while True:
        item = f'"k{n}":0'
        if used + len(item) + 1 > size:
            break
        keys.append(item)
        used += len(item) + 1
        n += 1
    return "{" + ",".join(keys) + "}"


WITHIN_LIMIT = {
    "deep_arrays": deep_arrays(LIMIT // 2),
    "deep_objects": deep_objects((LIMIT - 1) // 6),
    "wide_object": wide_object(LIMIT),
    "long_array": "[" + ",".join(["0"] * (LIMIT // 2 - 1)) + "]",
    "huge_number": '{"prompt": "x", "quality": ' + "9" * (LIMIT - 40) + "}",
}


@pytest.mark.parametrize("shape", sorted(WITHIN_LIMIT))
async def test_deep_or_wide_json_within_the_limit_is_refused_cheaply(
    shape: str, known_device: dict[str, str | None], admin: asyncpg.Connection
) -> None:
    body = WITHIN_LIMIT[shape]
    assert len(body.encode()) <= LIMIT
    with peak_memory() as peak:
        response = await call("generations", "POST", "/api/generations", headers=USER, body=body)
    assert response.status in (400, 422), response.body
    assert_json_error(response, response.status)
    # a 64 KiB body may cost a few MB to refuse, never more
    assert peak[0] < 16 * 1024 * 1024, f"{shape}: peak {peak[0]} bytes"
    # and the answer stays small: no echo of every key that was wrong
    assert len(json.dumps(response.body)) < 8 * 1024
    assert await fingerprint(admin) == known_device


@pytest.mark.parametrize("shape", ["deep_arrays", "deep_objects"])
async def test_one_hundred_thousand_levels_of_nesting(
    shape: str,
    known_device: dict[str, str | None],
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """100,000 nested arrays (or objects) are over the default limit (413 before
    any parsing); with the limit raised to let them through, the parser's
    recursion limit refuses them as a 400, not a crash or a 500."""
    body = deep_arrays(100_000) if shape == "deep_arrays" else deep_objects(100_000)
    refused = await call("generations", "POST", "/api/generations", headers=USER, body=body)
    assert_json_error(refused, 413)

    monkeypatch.setenv("MAX_BODY_BYTES", str(4 * 1024 * 1024))
    settings.reset()
    with peak_memory() as peak:
        parsed = await call("generations", "POST", "/api/generations", headers=USER, body=body)
    assert_json_error(parsed, 400)
    assert parsed.body["message"] == "Request body is not valid JSON"
    assert peak[0] < 64 * 1024 * 1024, f"peak {peak[0]} bytes"
    assert await fingerprint(admin) == known_device


async def test_a_raised_limit_still_bounds_a_wide_object(
    known_device: dict[str, str | None], admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a 422 listed one issue per unknown key, so a wide object
    came back many times its size (64 KiB in, 545 KB out; with MAX_BODY_BYTES
    at 2 MiB, 15 MB out: over the 6 MB a Lambda may return, so bad input
    ended as a failed invocation). Now refused with a bounded answer."""
    monkeypatch.setenv("MAX_BODY_BYTES", str(2 * 1024 * 1024))
    settings.reset()
    body = wide_object(2 * 1024 * 1024)
    with peak_memory() as peak:
        response = await call("generations", "POST", "/api/generations", headers=USER, body=body)
    assert_json_error(response, 422)
    assert len(json.dumps(response.body)) < 8 * 1024
    assert peak[0] < 256 * 1024 * 1024, f"peak {peak[0]} bytes"
    assert await fingerprint(admin) == known_device


# ------------------------------------------------------ bytes and text


UNREADABLE: dict[str, bytes] = {
    "latin1": '{"prompt": "café"}'.encode("latin-1"),
    "invalid_utf8": b'{"prompt": "\xff\xfe cat"}',
    "overlong_utf8": b'{"prompt": "\xc0\xaf"}',
    "utf16": '{"prompt": "a cat"}'.encode("utf-16"),
    "raw_nul_byte": b'{"prompt": "a\x00cat"}',
    "nul_bytes_only": b"\x00" * 64,
    "not_json": b"prompt=a+cat",
    "json_array": b'["a cat"]',
    "json_string": b'"a cat"',
    "nan": b'{"prompt": "a cat", "quality": NaN}',
    "infinity": b'{"prompt": "a cat", "quality": -Infinity}',
    "trailing_garbage": b'{"prompt": "a cat"} {}',
    "truncated": b'{"prompt": "a c',
}


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_body_that_is_not_a_json_object_in_utf8_is_400(
    version: str, known_device: dict[str, str | None], admin: asyncpg.Connection
) -> None:
    answered = {}
    for case, body in UNREADABLE.items():
        response = await call(
            "generations", "POST", "/api/generations", version=version, headers=USER, body=body
        )
        answered[case] = (response.status, response.body["error"], sorted(response.body))
    assert answered == dict.fromkeys(UNREADABLE, (400, "invalid_request", ["error", "message"]))
    assert await fingerprint(admin) == known_device


INVALID_TEXT = {
    # JSON escapes that decode to what PostgreSQL text cannot hold, or is not Unicode
    "escaped_nul": '{"prompt": "a\\u0000cat"}',
    "lone_high_surrogate": '{"prompt": "a \\ud800 cat"}',
    "lone_low_surrogate": '{"prompt": "\\udfff"}',
    "reversed_surrogates": '{"prompt": "\\udfff\\ud800"}',
    "blank": '{"prompt": " \\t\\n "}',
    "empty": '{"prompt": ""}',
    "too_long": json.dumps({"prompt": "🐱" * 2001}),
    "not_a_string": '{"prompt": ["a cat"]}',
    "unknown_quality": '{"prompt": "a cat", "quality": "4k"}',
    "nul_in_quality": '{"prompt": "a cat", "quality": "hd\\u0000"}',
    "unknown_field": '{"prompt": "a cat", "cost": 0}',
    "duplicate_keys_last_wins_invalid": '{"prompt": "a cat", "prompt": ""}',
    # keys the error's details name: they cannot be written as UTF-8
    "lone_surrogate_key": '{"prompt": "a cat", "\\ud800": 1}',
    "nul_and_surrogate_key": '{"prompt": "a cat", "\\u0000\\udfff": 1}',
}


async def test_invalid_text_is_422_and_writes_nothing(
    known_device: dict[str, str | None], admin: asyncpg.Connection
) -> None:
    answered = {}
    for case, body in INVALID_TEXT.items():
        response = await call("generations", "POST", "/api/generations", headers=USER, body=body)
        # details say where and why, never echo the input
        echoed = "cat" in json.dumps(response.body.get("details"))
        answered[case] = (response.status, response.body["error"], bool(response.body.get("details")), echoed)
    assert answered == dict.fromkeys(INVALID_TEXT, (422, "invalid_request", True, False))
    assert await fingerprint(admin) == known_device


TOP_UP = """
with topped as (
    update user_tokens
       set balance = balance + 100, total_earned = total_earned + 100
 returning user_id, balance
)
insert into token_transactions (user_id, amount, balance_after, type, idempotency_key)
select user_id, 100, balance, 'adjustment', 'test:top-up' from topped
"""

STORED_VERBATIM = {
    "sql_quote": "'); drop table users; --",
    "sql_union": "x' union select clerk_id, device_id from users --",
    "sql_comment": "/* */ select pg_sleep(10); --",
    "sql_dollar": "$1 $$ $tag$ ; commit; $tag$",
    "backslashes": "C:\\\\path\\to\\n\\x00 not a nul",
    "percent_and_format": "%s %d {0} {prompt} %(x)s",
    "html": "<script>alert(1)</script>&amp;",
    "emoji_and_zwj": "👩‍👩‍👧‍👦 🏳️‍🌈 a family",
    "combining": "e\u0301\u0301\u0301 Z\u0351\u0352\u0353",
    "rtl_override": "\u202eevil\u202c a cat",
    "zero_width": "a\u200b\u200c\u200d\ufeffcat",
    "astral_plane": "𝕬 𓀀 🂡 \U0010fffd",
    "noncharacters": "\ufffe\uffff\ufdd0",
    "bidi_and_newlines": "line1\r\nline2\u2028line3\u2029",
    "max_length_astral": "🐱" * 2000,
    "control_chars": "\x01\x02\x1b[31mred\x7f",
}


@pytest.mark.parametrize("version", VERSIONS)
async def test_valid_but_hostile_text_is_stored_exactly_as_sent(
    version: str,
    known_device: dict[str, str | None],
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # tokens for every prompt
    await admin.execute("update user_tokens set balance = 100, total_earned = 100")
    await admin.execute("update token_transactions set amount = 100, balance_after = 100")
    for case, prompt in STORED_VERBATIM.items():
        response = await call(
            "generations", "POST", "/api/generations", version=version, headers=USER, body={"prompt": prompt}
        )
        assert response.status == 201, (case, response.body)
        assert response.body["prompt"] == prompt, case
        stored = await admin.fetchrow(
            "select prompt, char_length(prompt) as length from generations where id = $1",
            UUID(response.body["id"]),
        )
        assert stored is not None
        assert (stored["prompt"], stored["length"]) == (prompt, len(prompt)), case
        # and it reads back the same
        read = await call(
            "generations", "GET", f"/api/generations/{response.body['id']}", version=version, headers=USER
        )
        assert read.body["prompt"] == prompt, case
    assert await admin.fetchval("select count(*) from users") == 1  # nothing was dropped
    assert await admin.fetchval("select count(*) from generations") == len(STORED_VERBATIM)


HOSTILE_HEADERS = {
    "idempotency_key_unicode": ({"Idempotency-Key": "ключ"}, 422),
    "idempotency_key_control": ({"Idempotency-Key": "key\x01"}, 422),
    "idempotency_key_too_long": ({"Idempotency-Key": "k" * 201}, 422),
    "idempotency_key_sql": ({"Idempotency-Key": "k' or '1'='1"}, 201),
    "device_id_unicode": ({"X-Device-Id": "dévice_ééééé"}, 401),
    "device_id_sql": ({"X-Device-Id": "x' or 1=1 --"}, 401),
    "content_length_negative": ({"Content-Length": "-1"}, 400),
    "content_length_huge": ({"Content-Length": "99999999999999999999999"}, 413),
    # more digits than Python's int() converts (4,300)
    "content_length_4301_digits": ({"Content-Length": "9" * 4301}, 413),
    # the same key sent twice, as API Gateway passes it on
    "idempotency_key_repeated": ({"Idempotency-Key": "key-1,key-1"}, 422),
    "idempotency_key_repeated_v1": ({"Idempotency-Key": "key-1, key-1"}, 422),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
async def test_hostile_headers_are_4xx_or_taken_verbatim(
    case: str, known_device: dict[str, str | None], admin: asyncpg.Connection
) -> None:
    extra, status = HOSTILE_HEADERS[case]
    response = await call(
        "generations", "POST", "/api/generations", headers={**USER, **extra}, body={"prompt": "a cat"}
    )
    assert response.status == status, response.body
    assert isinstance(response.body, dict)
    if status >= 400:
        assert response.body["error"] in ("invalid_request", "unauthorized")
        assert await fingerprint(admin) == known_device
    else:
        key = await admin.fetchval("select idempotency_key from generations")
        assert key == extra["Idempotency-Key"]


def refund_notification_with(value: str) -> str:
    return (
        '{"type": "notification", "event": "refund.succeeded", "object": {"id": "rf-1",'
        f' "payment_id": "pp-1", "status": "succeeded", "amount": {{"value": {value}, "currency": "RUB"}}}}}}'
    )


HOSTILE_NOTIFICATIONS = {
    "deep_arrays": deep_arrays(30_000),
    "deep_objects": deep_objects(9_000),
    "wide_object": wide_object(LIMIT),
    "huge_exponent": refund_notification_with('"1e999999999"'),
    "huge_digits": refund_notification_with('"' + "9" * 5000 + '"'),
    "float_overflow": refund_notification_with("1e400"),
    "not_utf8": '{"type": "notification", "event": "payment.succeeded"}'.encode("utf-16"),
}


@pytest.mark.parametrize("version", VERSIONS)
async def test_hostile_notifications_from_a_trusted_address_are_400(
    version: str, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: from YooKassa's own networks, 30,000 nested arrays (a
    RecursionError) and an amount of '1e999999999' (a decimal overflow) were
    500s. Every malformed notification is a 400, before YooKassa is asked."""
    monkeypatch.setenv("YOOKASSA_SHOP_ID", "100500")
    monkeypatch.setenv("YOOKASSA_SECRET_KEY", "test_unused")
    # nothing listens here: a notification that got as far as asking is a 503
    monkeypatch.setenv("YOOKASSA_API_URL", "http://127.0.0.1:9/v3")
    settings.reset()
    before = await fingerprint(admin)
    answered = {}
    for case, body in HOSTILE_NOTIFICATIONS.items():
        assert len(body if isinstance(body, bytes) else body.encode()) <= LIMIT, case
        response = await call(
            "webhook",
            "POST",
            "/api/payments/webhook",
            version=version,
            headers={"Content-Type": "application/json"},
            body=body,
            source_ip=YOOKASSA_SOURCE,
        )
        answered[case] = (response.status, response.body["error"])
    assert answered == dict.fromkeys(HOSTILE_NOTIFICATIONS, (400, "invalid_request"))
    assert await fingerprint(admin) == before
