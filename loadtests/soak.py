"""Soak: POST /classify at about 70% of the measured capacity for 10 minutes; no errors, no memory growth.

One server (shipped defaults), --users Locust users each paced at (fraction x capacity / users) requests per
second (loadtests/locust_overload.py records every answer). Every --sample-seconds the resident memory (RSS,
psutil) of the `bentoml serve` process and of each worker is sampled. Passes when every request is a 200 and
each worker's RSS grew at most --max-growth (5%) from the end of the warm-up (--warmup-seconds, the first
minute) to the end of the run (medians of the samples in the 30 s after warm-up and the last 30 s, so one
garbage-collection cycle does not decide). Writes reports/soak/<UTC stamp>/{report.json, report.md, rss.png}.

    .venv/bin/python -m loadtests.soak                                    # make soak
    .venv/bin/python -m loadtests.soak --seconds 300 --pause-pids 20161 28617
    .venv/bin/python -m loadtests.soak --seconds 20 --warmup-seconds 5    # a quick try
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from loadtests.hardening import (argument_parser, checks_table, machine_line, measure_paused, per_second, percentile,
    read_records, save_figure, server_settings, start_locust, status_mix, timeline_figure, write_images, write_report)
from loadtests.server import models_folder_environment, readyz, running_server, worker_processes

WINDOW_S = 30  # RSS is compared as medians over this many seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(__doc__, "soak")
    parser.add_argument("--capacity", type=float, default=float(os.environ.get("CAPACITY", 420)))
    parser.add_argument("--fraction", type=float, default=0.7)
    parser.add_argument("--seconds", type=int, default=600, help="make soak SOAK_SECONDS=...")
    parser.add_argument("--warmup-seconds", type=int, default=60)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--max-growth", type=float, default=0.05)
    return parser.parse_args(argv)


def rss_mib(process: psutil.Process) -> float | None:
    try:
        return process.memory_info().rss / 2**20
    except psutil.Error:
        return None


def measure(args: argparse.Namespace, out: Path) -> dict:
    images_npy = write_images(out)
    settings = server_settings(None, args.workers)
    samples: list[dict] = []
    with running_server(models_folder_environment(args.models, settings), out / "server.log") as server:
        watched = {"server": psutil.Process(server.process.pid)}
        watched.update({f"worker {p.pid}": p for p in worker_processes(server.process.pid)})
        rate = args.fraction * args.capacity / args.users
        locust = start_locust(server.url, args.users, args.seconds + 3, "soak", out, images_npy, user_rate=rate)
        started = time.time()
        while locust.poll() is None:
            samples.append({"t": round(time.time() - started, 1),
                            **{name: rss_mib(p) for name, p in watched.items()}})
            time.sleep(args.sample_seconds)
        ready_after, alive = readyz(server.url), server.process.poll() is None
    return {"env": settings, "samples": samples, "watched": list(watched), "ready_after": ready_after,
            "server_alive": alive, "started": started, "per_user_rate": rate}


def growth(samples: list[dict], name: str, warmup_s: float) -> dict:
    t = np.array([s["t"] for s in samples])
    rss = np.array([s[name] if s[name] is not None else np.nan for s in samples])
    early = rss[(t >= warmup_s) & (t < warmup_s + WINDOW_S)]
    late = rss[t >= t[-1] - WINDOW_S]
    first, last = float(np.nanmedian(early)), float(np.nanmedian(late))
    return {"rss_start_mib": round(float(rss[0]), 1), "rss_after_warmup_mib": round(first, 1),
            "rss_end_mib": round(last, 1), "rss_max_mib": round(float(np.nanmax(rss)), 1),
            "growth_after_warmup": round((last - first) / first, 4)}


def plot(report: dict, path: Path) -> None:
    samples = report["samples"]
    figure, axis = timeline_figure("Resident memory under the soak load", "RSS, MiB")
    for name in report["watched"]:
        axis.plot([s["t"] for s in samples], [s[name] for s in samples], label=name)
    axis.axvline(report["arguments"]["warmup_seconds"], color="grey", linestyle=":", label="end of warm-up")
    axis.legend(fontsize=8)
    save_figure(figure, path)


def markdown(report: dict) -> str:
    a, r = report["arguments"], report["result"]
    lines = [f"# Soak: POST /classify at {a['fraction']:.0%} of capacity for {a['seconds']} s", "",
             f"{machine_line(report)} Server: {report['server_env']}, models `{a['models']}`. "
             f"Command: `{report['command']}`.", "",
             f"{a['users']} users, each paced at {report['per_user_rate']:.2f} req/s (target "
             f"{a['fraction'] * a['capacity']:.0f} req/s); RSS sampled every {a['sample_seconds']:g} s.", "",
             "| figure | value |", "|---|---:|",
             f"| requests | {r['requests']} |",
             f"| served rate | {r['req_per_s']} req/s |",
             f"| status mix | {r['status_mix']} |",
             f"| errors (not 200) | {r['errors']} |",
             f"| p50 / p99 / max | {r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} ms |",
             f"| server alive, /readyz afterwards | {r['server_alive']}, {r['ready_after']} |", "",
             "| process | RSS at start MiB | after warm-up MiB | at end MiB | max MiB | growth after warm-up |",
             "|---|---:|---:|---:|---:|---:|",
             *[f"| {name} | {g['rss_start_mib']} | {g['rss_after_warmup_mib']} | {g['rss_end_mib']} | "
               f"{g['rss_max_mib']} | {g['growth_after_warmup']:+.2%} |" for name, g in r["rss"].items()], "",
             *checks_table(r["checks"]), "",
             "![RSS over time](rss.png)", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    out, run, header = measure_paused(args, "soak", measure)
    records = read_records(out, "soak")
    span = records[-1, 0] - records[0, 0] if len(records) > 1 else 1.0
    errors = int((records[:, 1] != 200).sum())
    rss = {name: growth(run["samples"], name, args.warmup_seconds) for name in run["watched"]}
    workers = [name for name in rss if name.startswith("worker")]
    checks = {"0 errors": errors == 0,
              "server alive and /readyz 200 afterwards": run["server_alive"] and run["ready_after"] == 200,
              f"worker RSS growth after warm-up <= {args.max_growth:.0%}": bool(workers) and all(
                  rss[w]["growth_after_warmup"] <= args.max_growth for w in workers)}
    result = {"requests": int(len(records)), "req_per_s": round(len(records) / span, 1),
              "status_mix": status_mix(records), "errors": errors, "p50_ms": percentile(records[:, 2], 50),
              "p99_ms": percentile(records[:, 2], 99), "max_ms": percentile(records[:, 2], 100), "rss": rss,
              "ready_after": run["ready_after"], "server_alive": run["server_alive"],
              "per_second": per_second(records, records[0, 0], int(span)), "checks": checks,
              "passed": all(checks.values())}
    report = {**header, "server_env": run["env"],
              "per_user_rate": run["per_user_rate"], "watched": run["watched"], "samples": run["samples"],
              "result": result}
    plot(report, out / "rss.png")
    write_report(out, "soak", report, markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main(parse_args())["result"]["passed"] else 1)
