"""Memory of a process: peak and current resident set size, in MB.

Linux keeps the peak (VmHWM, "high water mark") and the current size (VmRSS)
in /proc/<pid>/status; elsewhere `resource.getrusage` gives the peak of this
process or of its finished children. A memory benchmark runs N warm requests
in a function process and reads `peak_rss_mb()` after 1,000 and after 10,000.

`uv run python bench/memory.py` prints this interpreter's figures before and
after importing the Starlette stack, as a check of the helpers.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def _status_kb(field: str, pid: int | None = None) -> int | None:
    path = Path(f"/proc/{pid or 'self'}/status")
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except (OSError, ValueError):
        return None
    return None


def _rusage_mb(who: int) -> float:
    peak = resource.getrusage(who).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak RSS of this process (or of a running `pid`), in MB."""
    kb = _status_kb("VmHWM", pid)
    if kb is not None:
        return kb / 1024
    if pid is None or pid == os.getpid():
        return _rusage_mb(resource.RUSAGE_SELF)
    raise OSError(f"no /proc/{pid}/status: cannot read another process's peak here")


def current_rss_mb(pid: int | None = None) -> float:
    """Resident set size now, in MB (falls back to the peak off Linux)."""
    kb = _status_kb("VmRSS", pid)
    return kb / 1024 if kb is not None else peak_rss_mb(pid)


def children_peak_rss_mb() -> float:
    """The largest peak RSS among this process's finished, waited-for children."""
    return _rusage_mb(resource.RUSAGE_CHILDREN)


def reset_peak() -> bool:
    """Start a new high water mark from the current RSS (Linux: writing 5 to
    /proc/self/clear_refs); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def main() -> None:
    at_start = peak_rss_mb(), current_rss_mb()
    import mangum  # noqa: F401
    import starlette.applications  # noqa: F401
    from harness import banner  # imports asyncpg

    banner("memory helpers")
    print(f"python at start: peak {at_start[0]:.1f} MB, now {at_start[1]:.1f} MB")

    print(
        f"after importing starlette, mangum, asyncpg: peak {peak_rss_mb():.1f} MB, "
        f"now {current_rss_mb():.1f} MB"
    )
    ballast = bytearray(50 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it is resident
    with_ballast = peak_rss_mb()
    del ballast
    print(f"with 50 MB allocated: peak {with_ballast:.1f} MB; freed: now {current_rss_mb():.1f} MB")
    if reset_peak():
        print(f"after reset_peak(): peak {peak_rss_mb():.1f} MB")
    print(f"getrusage(RUSAGE_SELF) peak agrees: {_rusage_mb(resource.RUSAGE_SELF):.1f} MB")


if __name__ == "__main__":
    main()
