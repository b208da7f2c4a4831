"""Where and when a measurement ran (processor, load, commit, a UTC stamp), and the other work paused meanwhile.

Shared by the load tests and the benchmarks: every report says what machine its figures come from.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent


def stamp() -> str:
    """Now in UTC, as report folders are named: 20261204T184000Z."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def processor_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() or None


def machine() -> dict:
    return {"cpus": os.cpu_count(), "processor": processor_name(), "load_average": load_average(),
            "commit": git_commit()}


@contextlib.contextmanager
def paused(pids: list[int]) -> Iterator[list[int]]:
    """SIGSTOP `pids` for the measurements (the cores are shared with them) and SIGCONT them afterwards,
    whatever happens: an exception, Ctrl-C, or a SIGTERM/SIGHUP to this process (turned into SystemExit)."""
    stopped: list[int] = []

    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except (ProcessLookupError, PermissionError):
                print(f"no process {pid} to pause", file=sys.stderr)
        if stopped:
            print(f"paused {stopped} (SIGSTOP) while measuring", file=sys.stderr)
        yield stopped
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if stopped:
            print(f"resumed {stopped} (SIGCONT)", file=sys.stderr)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
