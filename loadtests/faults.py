"""Faults: `kill -9` of a BentoML worker under load; how long until the service answers again, and what fails.

One server (shipped defaults, `bentoml serve` outside a container), a light /classify load (--users users
paced at --user-rate req/s each, loadtests/locust_overload.py records every answer) and /readyz polled every
0.1 s. After --before-seconds, one worker gets SIGKILL. Measured from the kill: whether a new worker process
appears (BentoML's process supervisor, circus, respawns outside containers; docs/ARCHITECTURE.md says it does not in one),
the time to its first 200 from the load and from /readyz, and every request that did not get a 200 in
between, by status (0: no answer, connection refused or reset). Writes reports/faults/<UTC stamp>/
{report.json, report.md, faults.png}; exit status 1 when the service does not answer within --after-seconds.

    .venv/bin/python -m loadtests.faults                                  # make faults
    .venv/bin/python -m loadtests.faults --pause-pids 20161 28617
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from loadtests.hardening import (argument_parser, machine_line, measure_paused, per_second, read_records, save_figure,
    server_settings, start_locust, status_mix, timeline_figure, write_images, write_report)
from loadtests.server import models_folder_environment, running_server, worker_processes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(__doc__, "faults")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--user-rate", type=float, default=10.0, help="requests per second per user")
    parser.add_argument("--before-seconds", type=int, default=10)
    parser.add_argument("--after-seconds", type=int, default=40)
    return parser.parse_args(argv)


def poll_readyz(url: str, stop: threading.Event, into: list[tuple[float, int]]) -> None:
    with httpx.Client(timeout=1) as client:
        while not stop.is_set():
            try:
                status = client.get(url + "/readyz").status_code
            except httpx.TransportError:
                status = 0
            into.append((time.time(), status))
            time.sleep(0.1)


def measure(args: argparse.Namespace, out: Path) -> dict:
    images_npy = write_images(out)
    settings = server_settings(None, args.workers)
    readiness: list[tuple[float, int]] = []
    stop = threading.Event()
    with running_server(models_folder_environment(args.models, settings), out / "server.log") as server:
        poller = threading.Thread(target=poll_readyz, args=(server.url, stop, readiness), daemon=True)
        try:
            workers_before = [p.pid for p in worker_processes(server.process.pid)]
            locust = start_locust(server.url, args.users, args.before_seconds + args.after_seconds + 3, "faults",
                                  out, images_npy, user_rate=args.user_rate)
            poller.start()
            time.sleep(args.before_seconds + 3)
            victim = workers_before[0]
            killed_at = time.time()
            os.kill(victim, signal.SIGKILL)
            respawned_at, workers_after = None, []
            while time.time() < killed_at + args.after_seconds:
                workers_after = [p.pid for p in worker_processes(server.process.pid) if p.pid not in workers_before]
                if workers_after and respawned_at is None:
                    respawned_at = time.time()
                time.sleep(0.1)
            locust.wait(timeout=60)
            server_alive = server.process.poll() is None
        finally:
            stop.set()
            if poller.is_alive():
                poller.join(timeout=5)
    return {"env": settings, "workers_before": workers_before, "victim": victim, "killed_at": killed_at,
            "new_workers": workers_after, "respawned_at": respawned_at, "readiness": readiness,
            "server_alive": server_alive}


def analyse(run: dict, records: np.ndarray) -> dict:
    k = run["killed_at"]
    after = records[records[:, 0] > k]
    ok_after = after[after[:, 1] == 200]
    # A request answered after the kill may have been sent before it; count answers until the first 200
    # of a request that *started* after the kill (end time - latency > kill time): the service answers again.
    started_after = ok_after[ok_after[:, 0] - ok_after[:, 2] / 1000 > k]
    first_ok = float(started_after[0, 0]) if len(started_after) else None
    outage = after[after[:, 0] <= first_ok] if first_ok else after
    failed = outage[outage[:, 1] != 200]
    ready_after = [(t, s) for t, s in run["readiness"] if t > k]
    not_ready = [(t, s) for t, s in ready_after if s != 200]
    ready_again = next((t for t, s in ready_after if not_ready and s == 200 and t > not_ready[0][0]), None)
    before = records[records[:, 0] <= k]
    return {"victim_pid": run["victim"], "workers_before": run["workers_before"], "new_workers": run["new_workers"],
            "respawned": bool(run["new_workers"]),
            "new_worker_seen_after_s": round(run["respawned_at"] - k, 2) if run["respawned_at"] else None,
            "first_200_after_s": round(first_ok - k, 2) if first_ok else None,
            "failed_requests_until_then": int(len(failed)), "failed_status_mix": status_mix(failed) if len(failed) else {},
            "requests_after_kill": int(len(after)), "status_mix_after_kill": status_mix(after) if len(after) else {},
            "errors_before_kill": int((before[:, 1] != 200).sum()),
            # Connections wait in the listening socket's backlog (held by the supervisor) while no worker runs:
            # they are late rather than refused.
            "max_latency_after_kill_ms": round(float(after[:, 2].max()), 1) if len(after) else None,
            "requests_over_1s_after_kill": int((after[:, 2] > 1000).sum()),
            "readyz_not_200_polls": len(not_ready),
            "readyz_first_not_200_after_s": round(not_ready[0][0] - k, 2) if not_ready else None,
            "readyz_200_again_after_s": round(ready_again - k, 2) if ready_again else None,
            "server_alive": run["server_alive"]}


def plot(records: np.ndarray, run: dict, path: Path) -> None:
    t0 = records[0, 0]
    bins = per_second(records, t0, int(np.ceil(records[-1, 0] - t0)))
    figure, axis = timeline_figure("POST /classify while a worker is killed", "req/s")
    axis.plot([b["t"] + 0.5 for b in bins], [b["ok"] for b in bins], label="200 req/s")
    axis.plot([b["t"] + 0.5 for b in bins], [b["answered"] - b["ok"] for b in bins], label="not 200 req/s")
    axis.axvline(run["killed_at"] - t0, color="red", linestyle=":", label="kill -9 worker")
    axis.legend(fontsize=8)
    save_figure(figure, path)


def markdown(report: dict) -> str:
    a, r = report["arguments"], report["result"]
    return "\n".join([
        "# Faults: kill -9 of a BentoML worker under load", "",
        f"{machine_line(report)} Server: `bentoml serve` (no container), {report['server_env']}, "
        f"models `{a['models']}`. Load: {a['users']} users at {a['user_rate']:g} req/s each on POST /classify. "
        f"Command: `{report['command']}`.", "",
        "| figure | value |", "|---|---:|",
        f"| workers before, killed | {r['workers_before']}, {r['victim_pid']} |",
        f"| new worker process (respawned by the supervisor) | {r['respawned']} {r['new_workers']} |",
        f"| new worker process seen after | {r['new_worker_seen_after_s']} s |",
        f"| first 200 to a request sent after the kill | {r['first_200_after_s']} s |",
        f"| requests not answered 200 until then | {r['failed_requests_until_then']} {r['failed_status_mix']} |",
        f"| status mix of every answer after the kill | {r['status_mix_after_kill']} |",
        f"| /readyz: first not-200 after the kill, 200 again after | {r['readyz_first_not_200_after_s']} s, "
        f"{r['readyz_200_again_after_s']} s ({r['readyz_not_200_polls']} polls not 200) |",
        f"| slowest answer after the kill; answers slower than 1 s | {r['max_latency_after_kill_ms']} ms; "
        f"{r['requests_over_1s_after_kill']} |",
        f"| errors before the kill | {r['errors_before_kill']} |",
        f"| server (supervisor) alive at the end | {r['server_alive']} |", "",
        "Status 0: no HTTP answer (connection refused or reset).", "",
        "![req/s around the kill](faults.png)", ""])


def main(args: argparse.Namespace) -> dict:
    out, run, header = measure_paused(args, "faults", measure)
    records = read_records(out, "faults")
    result = analyse(run, records)
    report = {**header, "server_env": run["env"], "result": result,
              "passed": result["first_200_after_s"] is not None}
    plot(records, run, out / "faults.png")
    write_report(out, "faults", report, markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main(parse_args())["passed"] else 1)
