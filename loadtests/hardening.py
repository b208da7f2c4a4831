"""What the hardening runs (overload.py, soak.py, faults.py) share: a recorded /classify load and its timeline.

Each run starts its own server, drives it with loadtests/locust_overload.py (every answer written with its time,
status, latency and Retry-After), reads the records back as one timeline and writes
reports/<kind>/<UTC stamp>/{report.json, report.md, <plot>.png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from loadtests.machine import machine, paused, stamp
from loadtests.payloads import fashion_test_images
from loadtests.server import pinned_to

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOCUSTFILE = REPO / "loadtests" / "locust_overload.py"
SHED_STATUSES = (429, 503)


# --- the run -------------------------------------------------------------------------------------------

def argument_parser(description: str, kind: str) -> argparse.ArgumentParser:
    """The options every hardening run has: the server's models and workers, what to pause, where to report."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models", help="VISIONSERVE_MODELS_DIR of the server")
    parser.add_argument("--workers", type=int, default=1, help="VISIONSERVE_WORKERS")
    parser.add_argument("--pause-pids", type=int, nargs="*", default=[], help="SIGSTOP these while measuring")
    parser.add_argument("--out", default=None, help=f"default reports/{kind}/<UTC stamp>")
    return parser


def report_dir(out: str | None, kind: str) -> Path:
    """`out`, or reports/<kind>/<UTC stamp>; created."""
    path = Path(out) if out else REPO / "reports" / kind / stamp()
    path.mkdir(parents=True, exist_ok=True)
    return path


def measure_paused(args: argparse.Namespace, kind: str, measure) -> tuple[Path, dict, dict]:
    """`measure(args, out)` with --pause-pids stopped meanwhile: (out, what it returned, the fields every report
    starts with: arguments, command, machine, paused PIDs)."""
    out = report_dir(args.out, kind)
    with paused(args.pause_pids) as stopped:
        run = measure(args, out)
    header = {"arguments": vars(args), "command": " ".join([f"python -m loadtests.{kind}", *sys.argv[1:]]),
              "machine": machine(), "paused_pids": stopped}
    return out, run, header


def write_images(out: Path, count: int = 256) -> Path:
    """`count` seeded Fashion-MNIST test images as out/images.npy, what the Locust users send as PNGs."""
    path = out / "images.npy"
    np.save(path, fashion_test_images(count, seed=0))
    return path


def server_settings(max_queued_images: int | None, workers: int) -> dict[str, str]:
    """The VISIONSERVE_* of a hardening run's server: batching on, `workers` workers, the queue bound if given."""
    env = {"VISIONSERVE_BATCHING": "on", "VISIONSERVE_WORKERS": str(workers)}
    if max_queued_images is not None:
        env["VISIONSERVE_MAX_QUEUED_IMAGES"] = str(max_queued_images)
    return env


def start_locust(url: str, users: int, seconds: int, label: str, out: Path, images_npy: Path,
                 processes: int = 1, wait_s: float = 0.0, user_rate: float | None = None,
                 cpus: set[int] | None = None) -> subprocess.Popen:
    """Headless Locust of locust_overload.py in the background, on `cpus` if given; its records go to
    out/requests.<label>.*.csv."""
    command = [str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
               "-t", f"{seconds}s", "-H", url, "--stop-timeout", "5", "--only-summary", "--loglevel", "WARNING"]
    if processes > 1:
        command += ["--processes", str(processes)]
    env = {**os.environ, "BENCH_IMAGES_NPY": str(images_npy), "OVERLOAD_RECORD_PREFIX": str(out / "requests"),
           "OVERLOAD_LABEL": label, "OVERLOAD_WAIT_S": str(wait_s),
           "OVERLOAD_USER_RATE": str(user_rate or "")}
    with open(out / f"locust-{label}.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=pinned_to(cpus))


# --- the timeline --------------------------------------------------------------------------------------

def read_records(out: Path, label: str) -> np.ndarray:
    """Every request of one label, sorted by end time: columns time, status, ms, has Retry-After."""
    rows = []
    for path in sorted(out.glob(f"requests.{label}.*.csv")):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                rows.append((float(row["time"]), int(row["status"]), float(row["ms"]), 1.0 if row["retry_after"] else 0.0))
    records = np.array(rows, dtype=float).reshape(-1, 4)
    return records[np.argsort(records[:, 0])]


def status_mix(records: np.ndarray) -> dict[str, int]:
    statuses, counts = np.unique(records[:, 1].astype(int), return_counts=True)
    return {str(s): int(c) for s, c in zip(statuses, counts)}


def per_second(records: np.ndarray, t0: float, seconds: int) -> list[dict]:
    """For each whole second since t0: requests answered, 200s, shed, other, p99 of the 200s."""
    bins = []
    for i in range(seconds):
        inside = records[(records[:, 0] >= t0 + i) & (records[:, 0] < t0 + i + 1)]
        ok = inside[inside[:, 1] == 200]
        shed = np.isin(inside[:, 1], SHED_STATUSES).sum()
        bins.append({"t": i, "answered": int(len(inside)), "ok": int(len(ok)), "shed": int(shed),
                     "other": int(len(inside) - len(ok) - shed),
                     "p99_ok_ms": round(float(np.percentile(ok[:, 2], 99)), 1) if len(ok) else None})
    return bins


def percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


# --- the report ----------------------------------------------------------------------------------------

def timeline_figure(title: str, ylabel: str):
    """(figure, axis) of one timeline in seconds, as the soak and fault reports draw it (no pyplot: no global
    figure state, no GUI backend)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4))
    axis = figure.subplots()
    axis.set_xlabel("seconds")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    return figure, axis


def save_figure(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def machine_line(report: dict) -> str:
    machine = report["machine"]
    return (f"{machine['cpus']} CPUs ({machine['processor']}), commit {machine['commit']}, "
            f"paused PIDs {report['paused_pids'] or 'none'}.")


def checks_table(checks: dict[str, bool]) -> list[str]:
    return ["| check | passed |", "|---|---|", *[f"| {name} | {'yes' if ok else '**no**'} |"
                                                 for name, ok in checks.items()]]


def json_value(value):
    """JSON for what json cannot write itself: numpy scalars as numbers, anything else as its text."""
    return value.item() if hasattr(value, "item") else str(value)


def write_report(out: Path, kind: str, report: dict, markdown: str) -> None:
    """out/report.json and out/report.md; the markdown also to stdout, the folder to stderr."""
    (out / "report.json").write_text(json.dumps(report, indent=2, default=json_value))
    (out / "report.md").write_text(markdown)
    print(markdown)
    print(f"{kind}: report in {out}", file=sys.stderr)
