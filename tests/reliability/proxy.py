"""A TCP proxy in front of PostgreSQL that misbehaves as networks do.

* Lingering: when the server closes a connection (a terminated backend sends
  its FATAL message, then closes), the proxy passes the message on at once
  but closes the client's side only `close_delay` seconds later. That
  widens, to as long as a test needs, the window a real network leaves open
  for a moment: the client has read the FATAL but not yet seen the close.
* Frozen: `freeze()` stops passing anything either way while every socket
  stays open, as a failover or a dropped route leaves a connection
  half-open: a statement sent then is never answered, and a new connection
  is accepted but never greeted. `thaw()` passes on what was held.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit, urlunsplit


def _upstream(url: str) -> tuple[str | None, str, int]:
    """(unix socket path or None, host, port) of the server a URL names."""
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [parts.hostname or "localhost"])[0]
    port = parts.port or 5432
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}", host, port
    return None, host, port


class FaultyProxy:
    def __init__(self, url: str, close_delay: float) -> None:
        self.target = url
        self.close_delay = close_delay
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        # set once a server has closed a connection and everything it sent
        # before has been passed on to the client
        self.server_closed = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def url(self) -> str:
        """The target URL, through the proxy."""
        parts = urlsplit(self.target)
        user = parts.username or "postgres"
        password = f":{parts.password}" if parts.password else ""
        return urlunsplit(("postgresql", f"{user}{password}@127.0.0.1:{self.port}", parts.path, "", ""))

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def start(self) -> FaultyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._flowing.wait()  # frozen: accepted, never greeted
            path, host, port = _upstream(self.target)
            if path is not None:
                server_reader, server_writer = await asyncio.open_unix_connection(path)
            else:
                server_reader, server_writer = await asyncio.open_connection(host, port)
            upstream = asyncio.create_task(self._pump(client_reader, server_writer))
            try:
                await self._downstream(server_reader, client_writer)
                self.server_closed.set()
                # the server closed: the client hears of it only later
                await asyncio.sleep(self.close_delay)
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

    async def _downstream(self, server: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        """What the server says, on its way to the client (a subclass may lose some)."""
        await self._pump(server, client)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()


@contextlib.asynccontextmanager
async def faulty_proxy(url: str, close_delay: float = 2.0) -> AsyncIterator[FaultyProxy]:
    proxy = await FaultyProxy(url, close_delay).start()
    try:
        yield proxy
    finally:
        await proxy.stop()
