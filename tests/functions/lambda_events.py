"""Invoke a function's `handler(event, context)` as the Lambda runtime would.

Events are variants of the captured API Gateway events in tests/events/
(REST API payload 1.0 and HTTP API payload 2.0), changed only where a test
needs it: method, path, headers, query, body, source IP.

Mangum runs every invocation with `run_until_complete` on the thread's one
persistent event loop, and the pool in database/pool.py binds to the loop
that made it. The tests run on pytest-asyncio's session loop, which is
already running and cannot run Mangum's. So invocations go to a
`LambdaRuntime`: one thread with its own persistent loop, like a warm Lambda
container. `invoke()` uses the runtime the `lambda_runtime` fixture
(tests/functions/conftest.py) starts for each test; the fixture closes the
runtime's pool on the runtime's own loop afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlencode

from database import pool

EVENTS = Path(__file__).parent.parent / "events"
V1_EVENT = "apiGatewayProxyEvent.json"
V2_EVENT = "apiGatewayProxyV2Event.json"

T = TypeVar("T")

Query = dict[str, str | list[str]]
Body = str | bytes | dict[str, Any] | list[Any] | None


@cache
def _captured(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return document


def _body_fields(body: Body) -> tuple[str | None, bool, int | None]:
    """(event body, isBase64Encoded, byte length)."""
    if body is None:
        return None, False, None
    if isinstance(body, bytes):
        return base64.b64encode(body).decode("ascii"), True, len(body)
    text = body if isinstance(body, str) else json.dumps(body)
    return text, False, len(text.encode("utf-8"))


def _with_length(headers: dict[str, str], length: int | None, content_length: bool) -> dict[str, str]:
    if length is not None and content_length and not any(k.lower() == "content-length" for k in headers):
        return {**headers, "Content-Length": str(length)}
    return headers


def v1_event(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Body = None,
    query: Query | None = None,
    source_ip: str = "192.168.0.1/32",
    request_id: str | None = None,
    content_length: bool = True,
) -> dict[str, Any]:
    """A REST API (payload 1.0) event: headers go in both `headers` and
    `multiValueHeaders`, as API Gateway sends them."""
    event = copy.deepcopy(_captured(V1_EVENT))
    text, is_base64, length = _body_fields(body)
    all_headers = _with_length({**event["headers"], **(headers or {})}, length, content_length)
    event.update(
        httpMethod=method,
        path=path,
        resource=path,
        headers=all_headers,
        multiValueHeaders={name: [value] for name, value in all_headers.items()},
        queryStringParameters=None,
        multiValueQueryStringParameters=None,
        body=text,
        isBase64Encoded=is_base64,
    )
    if query:
        listed = {name: value if isinstance(value, list) else [value] for name, value in query.items()}
        event["multiValueQueryStringParameters"] = listed
        event["queryStringParameters"] = {name: values[-1] for name, values in listed.items()}
    context = event["requestContext"]
    context.update(httpMethod=method, path=path, resourcePath=path)
    context["identity"]["sourceIp"] = source_ip
    if request_id is not None:
        context["requestId"] = request_id
    return event


def v2_event(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Body = None,
    query: Query | None = None,
    source_ip: str = "192.168.0.1/32",
    request_id: str | None = None,
    content_length: bool = True,
) -> dict[str, Any]:
    """An HTTP API (payload 2.0) event: header names lowercased, repeated
    query parameters comma-joined in `queryStringParameters`."""
    event = copy.deepcopy(_captured(V2_EVENT))
    text, is_base64, length = _body_fields(body)
    all_headers = _with_length({**event["headers"], **(headers or {})}, length, content_length)
    event.update(
        rawPath=path,
        headers={name.lower(): value for name, value in all_headers.items()},
        rawQueryString="",
        body=text,
        isBase64Encoded=is_base64,
    )
    event.pop("queryStringParameters", None)
    if query:
        listed = {name: value if isinstance(value, list) else [value] for name, value in query.items()}
        event["rawQueryString"] = urlencode(listed, doseq=True)
        event["queryStringParameters"] = {name: ",".join(values) for name, values in listed.items()}
    if text is None:
        event.pop("body", None)
    context = event["requestContext"]
    context["http"].update(method=method, path=path, sourceIp=source_ip)
    if request_id is not None:
        context["requestId"] = request_id
    return event


EVENT_BUILDERS = {"v1": v1_event, "v2": v2_event}


@dataclass
class LambdaContext:
    """What the Lambda runtime passes as `context` (the fields Mangum and we read)."""

    function_name: str = "dreamlens-test"
    function_version: str = "$LATEST"
    invoked_function_arn: str = "arn:aws:lambda:eu-central-1:123456789012:function:dreamlens-test"
    memory_limit_in_mb: int = 512
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/dreamlens-test"
    log_stream_name: str = "2026/01/01/[$LATEST]0123456789abcdef"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


class Invocation(NamedTuple):
    status: int
    headers: dict[str, str]
    body: Any  # parsed JSON; the text when it is not JSON; None when empty


def parse_response(response: dict[str, Any]) -> Invocation:
    headers = {name.lower(): value for name, value in (response.get("headers") or {}).items()}
    for name, values in (response.get("multiValueHeaders") or {}).items():
        headers[name.lower()] = ", ".join(values)
    raw = response.get("body") or ""
    if response.get("isBase64Encoded"):
        raw = base64.b64decode(raw).decode("utf-8", "replace")
    body: Any = None
    if raw:
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
    return Invocation(response["statusCode"], headers, body)


class LambdaRuntime:
    """One thread, one persistent event loop: a warm Lambda container."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lambda", initializer=self._start)

    def _start(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

    @staticmethod
    async def _release_test_loop_pool() -> None:
        if pool._pool is not None and pool._pool_loop is asyncio.get_running_loop():
            # the test's own loop made a pool (sql() in a test): close it on that
            # loop rather than have the runtime's loop tear it down from afar
            await pool.close_pool()

    async def invoke(self, handler: Any, event: dict[str, Any], context: Any = None) -> Invocation:
        await self._release_test_loop_pool()
        response = await asyncio.get_running_loop().run_in_executor(
            self._thread, handler, event, context or LambdaContext()
        )
        return parse_response(response)

    async def close_pool(self) -> None:
        """Drop the warm container's pool (its connections gone, as when the
        database restarts): the next invocation makes a new one from the
        current settings. Caches (identity, balances) stay warm."""
        if self.loop is not None and pool._pool_loop is self.loop:
            runtime_loop = self.loop
            await asyncio.get_running_loop().run_in_executor(
                self._thread, lambda: runtime_loop.run_until_complete(pool.close_pool())
            )

    async def run(self, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """`await work()` on the runtime's loop between invocations: reading back
        through a repository, or closing what a handler left open on that loop
        (a client's connections) before the loop goes."""

        def on_runtime_loop() -> T:
            assert self.loop is not None
            return self.loop.run_until_complete(work())

        await self._release_test_loop_pool()
        return await asyncio.get_running_loop().run_in_executor(self._thread, on_runtime_loop)

    def _close_on_runtime_loop(self) -> None:
        assert self.loop is not None
        if pool._pool_loop is self.loop:
            self.loop.run_until_complete(pool.close_pool())
        self.loop.close()

    async def close(self) -> None:
        if self.loop is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._close_on_runtime_loop)
        self._thread.shutdown(wait=True)


_runtime: LambdaRuntime | None = None


def use_runtime(runtime: LambdaRuntime | None) -> None:
    global _runtime
    _runtime = runtime


@asynccontextmanager
async def warm_runtime() -> AsyncIterator[LambdaRuntime]:
    """A warm Lambda container for one test: fresh settings and identity
    cache, invoke() running on it, closed and forgotten afterwards."""
    from functions import identity, settings

    settings.reset()
    identity.forget_all()
    runtime = LambdaRuntime()
    use_runtime(runtime)
    try:
        yield runtime
    finally:
        use_runtime(None)
        await runtime.close()
        settings.reset()
        identity.forget_all()


async def invoke(handler: Any, event: dict[str, Any], context: Any = None) -> Invocation:
    """`handler(event, context)` on the current test's Lambda runtime."""
    assert _runtime is not None, "invoke() needs the lambda_runtime fixture (tests/functions/conftest.py)"
    return await _runtime.invoke(handler, event, context)
