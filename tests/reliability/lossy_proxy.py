"""A TCP proxy that loses one reply: the commit happened, its acknowledgement
never reaches the client (a connection dropped just after the server
committed). Armed with a command tag (b"SELECT", b"COMMIT", ...), it lets the
server finish that command and its ReadyForQuery (so an autocommit statement
or a COMMIT has committed), then closes the client's connection instead of
passing the reply on. One drop per arm()."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

from tests.reliability.proxy import FaultyProxy


class LossyProxy(FaultyProxy):
    def __init__(self, url: str) -> None:
        super().__init__(url, close_delay=0.0)
        self._armed: bytes | None = None
        self.dropped = 0

    @property
    def url(self) -> str:
        # no SSL negotiation: its one-byte answer is not a protocol message,
        # which _replies reads whole
        return urlunsplit(urlsplit(super().url)._replace(query="sslmode=disable"))

    def arm(self, tag: bytes) -> None:
        self._armed = tag

    async def _downstream(self, server: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        await self._replies(server, client)

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server messages (type, int32 length, body), passed on whole; a
        reply whose CommandComplete carries the armed tag (or a PortalSuspended) is held back and
        the connection closed once its ReadyForQuery has arrived."""
        held: list[bytes] = []
        holding = False
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readexactly(5)
                (length,) = struct.unpack("!i", head[1:])
                message = head + await reader.readexactly(length - 4)
                kind = head[:1]
                armed = self._armed
                # fetchrow/fetchval execute with a row limit: PortalSuspended
                # ends their command (the whole statement has run)
                ended = kind == b"s" or (kind == b"C" and message[5:].startswith(armed or b"\0"))
                if not holding and armed is not None and ended:
                    holding = True
                if holding:
                    held.append(message)
                    if kind == b"Z":
                        self._armed = None
                        self.dropped += 1
                        return  # the server committed; the client never hears
                    continue
                writer.write(message)
                await writer.drain()


@contextlib.asynccontextmanager
async def lossy_proxy(url: str) -> AsyncIterator[LossyProxy]:
    proxy = LossyProxy(url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
