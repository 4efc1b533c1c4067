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
from urllib.parse import parse_qs, urlsplit, urlunsplit


class LossyProxy:
    def __init__(self, url: str) -> None:
        self.target = url
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._armed: bytes | None = None
        self.dropped = 0

    @property
    def url(self) -> str:
        parts = urlsplit(self.target)
        user = parts.username or "postgres"
        return urlunsplit(("postgresql", f"{user}@127.0.0.1:{self.port}", parts.path, "sslmode=disable", ""))

    def arm(self, tag: bytes) -> None:
        self._armed = tag

    async def start(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        parts = urlsplit(self.target)
        host = parse_qs(parts.query).get("host", [parts.hostname or "localhost"])[0]
        port = parts.port or 5432
        try:
            if host.startswith("/"):
                server_reader, server_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                server_reader, server_writer = await asyncio.open_connection(host, port)
            upstream = asyncio.create_task(self._pump(client_reader, server_writer))
            try:
                await self._replies(server_reader, client_writer)
            finally:
                upstream.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await upstream
                server_writer.close()
        except OSError:
            pass
        finally:
            client_writer.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

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
    proxy = await LossyProxy(url).start()
    try:
        yield proxy
    finally:
        await proxy.stop()
