"""The one event loop of a Lambda process, for handlers that are not ASGI.

Mangum runs every invocation on the thread's current event loop; the
database pool is bound to the loop it was made on. Scheduled handlers run on
that same loop, so a process serving both keeps one pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop.run_until_complete(coroutine)
