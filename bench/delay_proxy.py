"""A TCP proxy that puts a database "in another zone": a fixed one-way delay.

    client --TCP 127.0.0.1:port--> proxy --unix socket (or TCP)--> PostgreSQL

Every chunk read from one side is stamped with `now + delay` and queued; a
second task per direction sends each chunk when its time comes, in order. So
the delay is a latency, as on a real network: a round trip costs 2 x delay
more, and a response that arrives in many chunks costs the delay once, not
once per chunk (a read loop that slept before each write would add it per
chunk, and serialize reading behind the sleeps).

In-process, the proxy runs on its own event loop in a background thread, so
the loop being measured is not disturbed:

    with DelayProxy(database.socket_path, delay_ms=2.0) as proxy:
        url = database.url_for("127.0.0.1", proxy.port)

`spawn_proxy()` runs it as a separate process instead (no shared GIL), and
`uv run python bench/delay_proxy.py` runs its self-check: `select 1` direct,
through the proxy with no delay, and with the default 2 ms each way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_DELAY_MS = 2.0
CHUNK_BYTES = 64 * 1024
# chunks in flight per direction before the reader waits (bounded memory)
QUEUE_CHUNKS = 1024
# a script-mode proxy stops by itself after this long
MAX_SERVE_SECONDS = 3600.0
CALIBRATION_SLEEPS = 25
MAX_LATENESS = 0.0005

Upstream = Path | tuple[str, int]


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers have microsecond resolution.

    The default loop waits in epoll, whose timeout is whole milliseconds
    (rounded up): a 1.9 ms wait becomes 2 ms plus wake-up latency. select()
    takes microseconds; a proxy has a few dozen sockets, far below its
    1024-descriptor limit."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


class DelayProxy:
    """Listen on host:port (0 = any free port) and forward each connection to
    `upstream` (a unix socket path, or (host, port)), delaying every chunk by
    `delay_ms` in each direction."""

    def __init__(
        self, upstream: Upstream, delay_ms: float = DEFAULT_DELAY_MS, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream = upstream
        self.delay = delay_ms / 1000
        self.host = host
        self.port = port
        self.connections = 0
        # chunks forwarded each way; a client's statement (or pipelined batch)
        # is usually one chunk, so chunks_to_server counts round trips on the wire
        self.chunks_to_server = 0
        self.chunks_to_client = 0
        # exactly: the client speaking again after the server answered (a
        # message written in pieces is several chunks but one turn)
        self.turns_to_server = 0
        # how late this machine wakes a sleeping loop; subtracted from each wait
        self.lateness = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- on the proxy's own loop

    async def open(self) -> None:
        """Start listening on the running loop (best made by `new_loop()`)."""
        await self._calibrate()
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _calibrate(self) -> None:
        # A sleep wakes ~0.1-0.2 ms late on a VM; that is proxy overhead, not
        # the configured distance, so each wait is shortened by the median.
        if self.delay <= 0:
            return
        loop = asyncio.get_running_loop()
        late = []
        for _ in range(CALIBRATION_SLEEPS):
            started = loop.time()
            await asyncio.sleep(self.delay)
            late.append(loop.time() - started - self.delay)
        self.lateness = min(max(0.0, statistics.median(late)), self.delay / 2, MAX_LATENESS)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.upstream, Path):
            return await asyncio.open_unix_connection(str(self.upstream))
        host, port = self.upstream
        return await asyncio.open_connection(host, port)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            server_reader, server_writer = await self._connect_upstream()
        except OSError:
            client_writer.close()
            self._tasks.discard(task)
            return
        # who spoke last on this connection: "server" or "client"
        last: list[str] = ["server"]
        try:
            await asyncio.gather(
                self._direction(client_reader, server_writer, to_server=True, last=last),
                self._direction(server_reader, client_writer, to_server=False, last=last),
            )
        except asyncio.CancelledError:
            # close() stops connections still open; this task is their root,
            # and asyncio's stream callback would report the cancellation
            pass
        finally:
            for writer in (client_writer, server_writer):
                writer.close()
            self._tasks.discard(task)

    @property
    def chunks(self) -> int:
        return self.chunks_to_server + self.chunks_to_client

    async def _direction(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        to_server: bool,
        last: list[str],
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=QUEUE_CHUNKS)

        async def receive() -> None:
            # stamp each chunk as it arrives; b"" marks the end of the stream
            while True:
                try:
                    data = await reader.read(CHUNK_BYTES)
                except OSError:
                    data = b""
                await queue.put((loop.time() + self.delay, data))
                if not data:
                    return

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time() - self.lateness
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                if to_server:
                    self.chunks_to_server += 1
                    if last[0] == "server":
                        self.turns_to_server += 1
                    last[0] = "client"
                else:
                    self.chunks_to_client += 1
                    last[0] = "server"
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    return

        receiving = asyncio.create_task(receive())
        try:
            await deliver()
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving

    # -- from any thread

    def start(self, timeout: float = 10.0) -> DelayProxy:
        """Run on a fresh event loop in a daemon thread; return once listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = new_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.open())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.close())
                loop.close()

        self._thread = threading.Thread(target=run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("delay proxy did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ProxyProcess:
    """The proxy as a separate process (`spawn_proxy`); `.port`, `.stop()`."""

    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def spawn_proxy(
    upstream: Upstream, delay_ms: float = DEFAULT_DELAY_MS, max_seconds: float = MAX_SERVE_SECONDS
) -> ProxyProcess:
    """Start `delay_proxy.py serve` in its own process; return once it listens."""
    target = str(upstream) if isinstance(upstream, Path) else f"{upstream[0]}:{upstream[1]}"
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "serve",
            "--upstream",
            target,
            "--delay-ms",
            str(delay_ms),
            "--max-seconds",
            str(max_seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "listening 127.0.0.1:PORT ..."
    if not line.startswith("listening "):
        process.kill()
        raise RuntimeError(f"delay proxy did not start: {line!r}")
    port = int(line.split()[1].rsplit(":", 1)[1])
    return ProxyProcess(process, port)


def parse_upstream(text: str) -> Upstream:
    if text.startswith("/"):
        return Path(text)
    host, port = text.rsplit(":", 1)
    return host, int(port)


async def serve(upstream: Upstream, delay_ms: float, port: int, max_seconds: float) -> None:
    proxy = DelayProxy(upstream, delay_ms, port=port)
    await proxy.open()
    print(f"listening 127.0.0.1:{proxy.port} -> {upstream} delay {delay_ms:g} ms each way", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    await proxy.close()


# ---------------------------------------------------------------- self-check


async def _round_trips(url: str, count: int) -> list[float]:
    import asyncpg
    from harness import time_calls

    connection = await asyncpg.connect(url)
    try:
        return await time_calls(lambda: connection.fetchval("select 1"), count, warmup=20, budget_s=60)
    finally:
        await connection.close()


# 8 MB in one result: arrives in many chunks
BIG_RESULT = "select string_agg(md5(i::text), '') from generate_series(1, 250000) as i"


async def _big_result(url: str, connections: int) -> tuple[float, set[str]]:
    import asyncpg

    opened = [await asyncpg.connect(url) for _ in range(connections)]
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(c.fetchval(BIG_RESULT) for c in opened))
        ms = (time.perf_counter() - started) * 1000
    finally:
        for connection in opened:
            await connection.close()
    return ms, {hashlib.sha256(text.encode()).hexdigest() for text in results}


def self_check() -> None:
    from harness import banner, bench_database, summarize

    count = 500
    with bench_database(schema=False) as database:
        banner("delay proxy self-check", database)
        upstream = database.upstream
        direct = summarize(asyncio.run(_round_trips(database.url, count)))
        print(f"select 1 direct:                    {direct.line()}")
        with DelayProxy(upstream, delay_ms=0) as proxy:
            hop = summarize(asyncio.run(_round_trips(database.url_for("127.0.0.1", proxy.port), count)))
        print(f"select 1 via proxy, 0 ms:           {hop.line()}")
        with DelayProxy(upstream, delay_ms=DEFAULT_DELAY_MS) as proxy:
            delayed = summarize(asyncio.run(_round_trips(database.url_for("127.0.0.1", proxy.port), count)))
            big_ms, digests = asyncio.run(_big_result(database.url_for("127.0.0.1", proxy.port), 4))
            chunks = proxy.chunks
        print(f"select 1 via proxy, 2 ms each way: {delayed.line()}")
        direct_big_ms, direct_digests = asyncio.run(_big_result(database.url, 4))
        with spawn_proxy(upstream, DEFAULT_DELAY_MS) as process:
            spawned = summarize(asyncio.run(_round_trips(database.url_for("127.0.0.1", process.port), count)))
        print(f"select 1 via proxy process, 2 ms:  {spawned.line()}")

    overhead = delayed.p50 - direct.p50
    print(f"proxy hop alone (0 ms): +{hop.p50 - direct.p50:.3f} ms per round trip (p50)")
    print(f"added per round trip with 2 ms each way: +{overhead:.3f} ms p50 (expected ≈ 4.0)")
    print(f"  as a separate process: +{spawned.p50 - direct.p50:.3f} ms p50")
    print(
        f"4 x 8 MB results at once: {big_ms:.1f} ms through the proxy ({chunks} chunks forwarded), "
        f"{direct_big_ms:.1f} ms direct: the delay is paid once, not per chunk"
    )
    assert digests == direct_digests and len(digests) == 1, "a result changed on the way through"
    assert 3.5 <= overhead <= 5.5, f"a 2 ms proxy should add about 4 ms per round trip, added {overhead:.2f}"
    assert big_ms - direct_big_ms < 100, "the delay is being paid per chunk"
    print("delay proxy self-check: OK (bytes intact and in order, delay per round trip ≈ 2 x one-way)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command")
    serve_parser = commands.add_parser("serve", help="run the proxy until SIGTERM (or --max-seconds)")
    serve_parser.add_argument("--upstream", required=True, help="unix socket path, or host:port")
    serve_parser.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY_MS)
    serve_parser.add_argument("--port", type=int, default=0)
    serve_parser.add_argument("--max-seconds", type=float, default=MAX_SERVE_SECONDS)
    args = parser.parse_args(argv)
    if args.command == "serve":
        loop = new_loop()
        try:
            loop.run_until_complete(
                serve(parse_upstream(args.upstream), args.delay_ms, args.port, args.max_seconds)
            )
        finally:
            loop.close()
    else:
        self_check()


if __name__ == "__main__":
    main()
