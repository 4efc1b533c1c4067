"""What an operator following the README does, on the embedded database:
init, migrate, audit, stats and a scheduled job, each as its own process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def dreamlens(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # no database URL at all (the PgBouncer run sets a non-pooling one): embedded
    unset = ("DATABASE_URL", "POSTGRES_URL", "POSTGRES_URL_NON_POOLING")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["DREAMLENS_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "functions.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    # not pytest's tmp_path: the embedded server runs as another user and
    # must traverse its parents, which pytest keeps private (0700)
    path = Path(tempfile.mkdtemp(prefix="dreamlens-operator-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_operator_walkthrough_on_the_embedded_database(data_dir: Path) -> None:
    first = dreamlens(data_dir, "init-db")
    assert first.returncode == 0, first.stderr
    assert "applied: schema.sql" in first.stdout

    again = dreamlens(data_dir, "init-db")
    assert "nothing applied" in again.stdout

    status = dreamlens(data_dir, "migrate", "--status")
    assert status.returncode == 0
    assert "schema.sql" in status.stdout and "applied" in status.stdout

    audit = dreamlens(data_dir, "audit")
    assert audit.returncode == 0
    assert "audit clean" in audit.stdout

    stats = dreamlens(data_dir, "stats")
    assert stats.returncode == 0
    assert "balances outstanding" in stats.stdout

    job = dreamlens(data_dir, "reap-generations")
    assert job.returncode == 0
    assert job.stdout.strip() == "reap-generations: returned 0, failed 0, batches 1"


def test_unknown_command_is_refused(data_dir: Path) -> None:
    result = dreamlens(data_dir, "drop-everything")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
