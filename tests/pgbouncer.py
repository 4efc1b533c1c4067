"""A real PgBouncer in transaction pooling mode in front of the test server.

`DREAMLENS_TEST_PGBOUNCER=1 uv run pytest tests/repositories tests/functions`
runs the suite through it: the app's URL is PgBouncer's, the statement cache
is off (as production behind a transaction pooler must have it), and init
and the tests' own admin connections use the direct URL, as
POSTGRES_URL_NON_POOLING does in production. PgBouncer comes from the Debian
package (`.ci/pgbouncer.sh` installs it for `.ci/run`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ENABLED = os.environ.get("DREAMLENS_TEST_PGBOUNCER") == "1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _binary() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )
    if found is None:
        raise RuntimeError("DREAMLENS_TEST_PGBOUNCER=1 but pgbouncer is not installed")
    return found


def _upstream(direct_url: str) -> tuple[str, str, str]:
    """host (a socket directory or an address), port and user of the server."""
    parts = urlsplit(direct_url)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    port = query.get("port", [str(parts.port or 5432)])[0]
    return host, port, parts.username or "postgres"


@contextmanager
def pgbouncer(direct_url: str) -> Iterator[str]:
    """Start PgBouncer in front of `direct_url`'s server; yield the pooled URL
    of the same database."""
    host, port, user = _upstream(direct_url)
    database = urlsplit(direct_url).path.lstrip("/")
    listen_port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="dreamlens-pgbouncer-"))
    workdir.chmod(0o777)
    (workdir / "userlist.txt").write_text(f'"{user}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/userlist.txt
pool_mode = transaction
admin_users = postgres
max_client_conn = 1000
default_pool_size = 40
; after a failed server login (a test pointing at a missing database) new
; clients wait this long for the next try; the default 15 s spares a real
; server reconnect storms, here it only outlasts DB_CONNECT_TIMEOUT twice
server_login_retry = 1
; no ignore_startup_parameters, as shipped: a session setting in the startup
; packet (statement_timeout), which a transaction pooler cannot give one
; client, is refused here as in production rather than silently dropped
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
"""
    )
    for path in workdir.iterdir():
        path.chmod(0o666)
    command = [_binary(), str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        # pgbouncer will not run as root; the embedded server (run as root)
        # belongs to `embedded_postgres` and only that user may open its socket
        user_name = next(u for u in ("embedded_postgres", "postgres", "nobody") if _user_exists(u))
        command[1:1] = ["-u", user_name]
    # pgbouncer (not daemonized) writes every log line to stderr as well as to
    # its logfile, with blocking writes from its one thread. Into a pipe nobody
    # drains, the 64 KiB pipe buffer filled after a few hundred logins and the
    # whole pooler froze mid-suite: statements hung until command_timeout and
    # new connections timed out. A file never blocks and keeps startup errors.
    stderr = (workdir / "pgbouncer.stderr").open("wb")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_listening(listen_port, process, workdir)
        yield f"postgresql://{user}@127.0.0.1:{listen_port}/{database}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            # still waiting on its clients: it is a throwaway pooler
            process.kill()
            process.wait(timeout=5)
        stderr.close()
        if os.environ.get("DREAMLENS_KEEP_PGBOUNCER_LOG"):
            print((workdir / "pgbouncer.log").read_text())  # noqa: T201
        shutil.rmtree(workdir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _wait_listening(port: int, process: subprocess.Popen[bytes], workdir: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited: {(workdir / 'pgbouncer.stderr').read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("pgbouncer did not start listening within 10 s")
