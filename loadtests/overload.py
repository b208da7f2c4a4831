"""Overload: offer about 3x the measured /classify capacity and check that the server sheds load cleanly.

One server (shipped defaults except --max-queued-images), one timeline of three phases, each request recorded
by loadtests/locust_overload.py:
1. light load alone (--light-users closed-loop users) for --baseline-seconds: the normal throughput;
2. the same light load plus a burst of --burst-users users in --burst-processes Locust processes with no wait
   between requests, for --seconds (CAPACITY x 3 is the rate the burst aims at);
3. the light load alone again for --after-seconds: recovery is the time from the burst's last request until
   the light load's 200s per second are back to 90% of its baseline median, with nothing but 200s.

Passes when every answer is a 200 or a 503/429 carrying Retry-After, /readyz still answers 200 afterwards,
the p99 of accepted (200) requests during the burst is within --p99-bound-ms, and recovery takes at most 5 s.
Writes reports/overload/<UTC stamp>/{report.json, report.md, overload.png}; exit status 1 when a check fails.

    .venv/bin/python -m loadtests.overload                          # make overload
    .venv/bin/python -m loadtests.overload --seconds 60 --pause-pids 20161 28617
    .venv/bin/python -m loadtests.overload --seconds 5 --baseline-seconds 3 --after-seconds 5   # a quick try

The closed-loop burst offers what the client processes can send: on 2 cores shared with the server that can
be less than 3x capacity; the report gives the rate really offered next to the target.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from loadtests.hardening import (SHED_STATUSES, argument_parser, checks_table, machine_line, measure_paused, per_second,
    percentile, read_records, save_figure, server_settings, start_locust, status_mix, write_images, write_report)
from loadtests.server import models_folder_environment, readyz, running_server, split_cpus

RECOVERY_FRACTION = 0.9  # "normal throughput": 90% of the light load's baseline median of 200s per second


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(__doc__, "overload")
    parser.add_argument("--capacity", type=float, default=float(os.environ.get("CAPACITY", 420)),
                        help="measured /classify capacity, req/s (docs/PERFORMANCE.md); env CAPACITY")
    parser.add_argument("--factor", type=float, default=3.0, help="target offered rate = factor x capacity")
    parser.add_argument("--seconds", type=int, default=60,
                        help="burst length, s (make overload SECONDS=...)")
    parser.add_argument("--baseline-seconds", type=int, default=10)
    parser.add_argument("--after-seconds", type=int, default=15)
    parser.add_argument("--light-users", type=int, default=8)
    parser.add_argument("--burst-users", type=int, default=400)
    parser.add_argument("--burst-processes", type=int, default=2)
    parser.add_argument("--max-queued-images", type=int, default=int(os.environ.get("MAX_QUEUED_IMAGES", 64)),
                        help="VISIONSERVE_MAX_QUEUED_IMAGES for the run (the shipped default is 2048)")
    parser.add_argument("--p99-bound-ms", type=float, default=1000.0, help="p99 of accepted requests must stay under")
    parser.add_argument("--measure-capacity", type=int, default=0, metavar="SECONDS",
                        help="first measure the capacity of this very server (closed-loop users, no wait, for "
                             "SECONDS): its 200s per second replace --capacity")
    parser.add_argument("--capacity-users", type=int, default=32)
    parser.add_argument("--no-pinning", action="store_true",
                        help="let the server and Locust share every core (the default pins them to separate halves "
                             "of the usable CPUs where there are at least two)")
    parser.add_argument("--recovery-bound-s", type=float, default=5.0)
    return parser.parse_args(argv)


# --- the overload run ------------------------------------------------------------------------------------

def measure(args: argparse.Namespace, out: Path) -> dict:
    images_npy = write_images(out)
    settings = server_settings(args.max_queued_images, args.workers)
    server_cpus, locust_cpus = (None, None) if args.no_pinning else (split_cpus() or (None, None))
    with running_server(models_folder_environment(args.models, settings), out / "server.log",
                        cpus=server_cpus) as server:
        measured_capacity = None
        if args.measure_capacity:
            start_locust(server.url, args.capacity_users, args.measure_capacity, "capacity", out, images_npy,
                         args.burst_processes, cpus=locust_cpus).wait(timeout=args.measure_capacity + 60)
            records = read_records(out, "capacity")
            ok = records[records[:, 1] == 200]
            # Whole span of the 200s, first answer to last: the closed loop's steady rate.
            measured_capacity = round(len(ok) / max(ok[-1, 0] - ok[0, 0], 1e-9), 1) if len(ok) > 1 else None
        total = args.baseline_seconds + args.seconds + args.after_seconds
        light = start_locust(server.url, args.light_users, total + 3, "light", out, images_npy, cpus=locust_cpus)
        time.sleep(args.baseline_seconds + 3)  # Locust's start (imports, payloads) takes about 2 s
        burst_start = time.time()
        burst = start_locust(server.url, args.burst_users, args.seconds, "burst", out, images_npy,
                             args.burst_processes, cpus=locust_cpus)
        burst.wait(timeout=args.seconds + 60)
        light.wait(timeout=total + 60)
        ready_after = readyz(server.url)
        server_alive = server.process.poll() is None
    pinning = ({"server_cpus": sorted(server_cpus), "locust_cpus": sorted(locust_cpus)} if server_cpus
               else {"server_cpus": None, "locust_cpus": None})
    return {"url_env": settings, "ready_after": ready_after, "server_alive": server_alive,
            "burst_start": burst_start, "light_exit": light.returncode, "burst_exit": burst.returncode,
            "measured_capacity": measured_capacity, **pinning}


def analyse(args: argparse.Namespace, out: Path, run: dict) -> dict:
    light, burst = read_records(out, "light"), read_records(out, "burst")
    burst_window = (burst[0, 0] - burst[0, 2] / 1000, burst[-1, 0])  # first request's start to last answer
    span = burst_window[1] - burst_window[0]
    during = np.concatenate([burst, light[(light[:, 0] >= burst_window[0]) & (light[:, 0] <= burst_window[1])]])
    ok = during[during[:, 1] == 200]
    shed = during[np.isin(during[:, 1], SHED_STATUSES)]
    everything = np.concatenate([light, burst])
    bad_status = everything[~np.isin(everything[:, 1], (200, *SHED_STATUSES))]
    shed_all = everything[np.isin(everything[:, 1], SHED_STATUSES)]
    shed_without_retry_after = int((shed_all[:, 3] == 0).sum())

    t0 = light[0, 0]
    timeline_seconds = int(np.ceil(light[-1, 0] - t0))
    light_bins = per_second(light, t0, timeline_seconds)
    all_bins = per_second(everything, t0, timeline_seconds)
    burst_start_s, burst_end_s = burst_window[0] - t0, burst_window[1] - t0
    baseline = [b["ok"] for b in light_bins[1:int(burst_start_s) - 1]]  # whole seconds before the burst
    baseline_rate = float(np.median(baseline)) if baseline else 0.0
    # Recovery: the first whole second after the burst's last answer in which the light load has its
    # baseline rate back (>= 90%) and nothing but 200s; measured from the burst's end to that second's end.
    recovery_s = None
    for b in light_bins:
        if b["t"] >= burst_end_s - 0.999 and b["t"] + 1 > burst_end_s:
            if b["ok"] >= RECOVERY_FRACTION * baseline_rate and b["ok"] == b["answered"]:
                recovery_s = round(max(0.0, b["t"] + 1 - burst_end_s), 2)
                break
    light_after = light[light[:, 0] > burst_window[1]]
    capacity = run["measured_capacity"] or args.capacity
    target = args.factor * capacity
    result = {
        "target_offered_req_per_s": target,
        "capacity_req_per_s": capacity,
        "capacity_measured_in_this_run": run["measured_capacity"] is not None,
        "server_cpus": run["server_cpus"], "locust_cpus": run["locust_cpus"],
        "burst_seconds_measured": round(span, 1),
        "offered_req_per_s": round(len(during) / span, 1),
        "offered_over_capacity": round(len(during) / span / capacity, 2),
        "served_req_per_s": round(len(ok) / span, 1),
        "shed_req_per_s": round(len(shed) / span, 1),
        "status_mix_during_burst": status_mix(during),
        "status_mix_whole_run": status_mix(everything),
        "statuses_other_than_200_429_503": int(len(bad_status)),
        "shed_without_retry_after": shed_without_retry_after,
        "accepted_p50_ms": percentile(ok[:, 2], 50), "accepted_p99_ms": percentile(ok[:, 2], 99),
        "accepted_max_ms": percentile(ok[:, 2], 100),
        "shed_p99_ms": percentile(shed[:, 2], 99),
        "light_baseline_ok_per_s": baseline_rate,
        "light_after_ok_per_s_median": float(np.median([b["ok"] for b in light_bins[int(burst_end_s) + 6:]]
                                                       or [0])),
        "light_after_statuses": status_mix(light_after) if len(light_after) else {},
        "recovery_seconds": recovery_s,
        "ready_after": run["ready_after"], "server_alive": run["server_alive"],
        "timeline": {"burst_start_s": round(burst_start_s, 2), "burst_end_s": round(burst_end_s, 2),
                     "all": all_bins, "light": light_bins},
    }
    checks = {
        "only 200 or 503/429 with Retry-After": not len(bad_status) and shed_without_retry_after == 0,
        "server alive and /readyz 200 afterwards": run["server_alive"] and run["ready_after"] == 200,
        f"accepted p99 <= {args.p99_bound_ms:g} ms": result["accepted_p99_ms"] is not None
        and result["accepted_p99_ms"] <= args.p99_bound_ms,
        f"recovery <= {args.recovery_bound_s:g} s": recovery_s is not None and recovery_s <= args.recovery_bound_s,
    }
    result["checks"] = {name: bool(ok) for name, ok in checks.items()}
    result["passed"] = all(result["checks"].values())
    return result


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    bins = result["timeline"]["all"]
    t = [b["t"] + 0.5 for b in bins]
    figure = Figure(figsize=(9, 6))
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(t, [b["answered"] for b in bins], label="answered (offered) req/s")
    top.plot(t, [b["ok"] for b in bins], label="200 req/s")
    top.plot(t, [b["shed"] for b in bins], label="503/429 req/s")
    top.plot(t, [b["ok"] for b in result["timeline"]["light"]], label="light load 200 req/s", linestyle=":")
    top.set_ylabel("req/s")
    top.legend(fontsize=8)
    bottom.plot(t, [b["p99_ok_ms"] if b["p99_ok_ms"] is not None else float("nan") for b in bins], color="C3")
    bottom.set_ylabel("p99 of 200s, ms (per second)")
    bottom.set_xlabel("seconds")
    for axis in (top, bottom):
        axis.axvspan(result["timeline"]["burst_start_s"], result["timeline"]["burst_end_s"], alpha=0.1, color="red")
        axis.grid(alpha=0.3)
    top.set_title("POST /classify under overload (shaded: burst)")
    save_figure(figure, path)


def pinning_text(result: dict) -> str:
    if not result["server_cpus"]:
        return "shared (not pinned)"
    return f"{result['server_cpus']} / {result['locust_cpus']}"


def capacity_source(result: dict, arguments: dict) -> str:
    if result["capacity_measured_in_this_run"]:
        return (f"this server, {arguments['capacity_users']} closed-loop users for "
                f"{arguments['measure_capacity']} s first")
    return "--capacity, e.g. from docs/PERFORMANCE.md"


def markdown(report: dict) -> str:
    r, a = report["result"], report["arguments"]
    lines = [
        f"# Overload: POST /classify at {a['factor']:g}x capacity", "",
        f"{machine_line(report)} Server: {report['server_env']}, models `{a['models']}`. "
        f"Command: `{report['command']}`.", "",
        f"Burst: {a['burst_users']} closed-loop users (no wait) in {a['burst_processes']} Locust processes for "
        f"{a['seconds']} s, on top of {a['light_users']} light-load users that run before, during and after.", "",
        "| figure | value |", "|---|---:|",
        f"| CPUs: server / Locust | {pinning_text(r)} |",
        f"| capacity ({capacity_source(r, a)}) | {r['capacity_req_per_s']:g} req/s |",
        f"| target offered rate | {r['target_offered_req_per_s']:g} req/s |",
        f"| offered (answered) during the burst | {r['offered_req_per_s']:g} req/s ({r['offered_over_capacity']:g}x capacity) |",
        f"| served (200) during the burst | {r['served_req_per_s']:g} req/s |",
        f"| shed (503/429) during the burst | {r['shed_req_per_s']:g} req/s |",
        f"| status mix during the burst | {r['status_mix_during_burst']} |",
        f"| statuses other than 200/429/503, whole run | {r['statuses_other_than_200_429_503']} |",
        f"| 503/429 without Retry-After | {r['shed_without_retry_after']} |",
        f"| accepted p50 / p99 / max | {r['accepted_p50_ms']} / {r['accepted_p99_ms']} / {r['accepted_max_ms']} ms |",
        f"| shed p99 | {r['shed_p99_ms']} ms |",
        f"| light load before: 200s per second (median) | {r['light_baseline_ok_per_s']:g} |",
        f"| light load after: 200s per second (median, from 6 s on) | {r['light_after_ok_per_s_median']:g} |",
        f"| recovery (burst end to light load back at 90% of its rate, only 200s) | {r['recovery_seconds']} s |",
        f"| server alive, /readyz afterwards | {r['server_alive']}, {r['ready_after']} |", "",
        *checks_table(r["checks"]), "",
        "![req/s and p99 over time](overload.png)", ""]
    if r["offered_over_capacity"] < report["arguments"]["factor"]:
        sharing = ("Locust has its own cores, so the client processes are the limit"
                   if r["server_cpus"] else "Locust shares the cores with the server")
        lines += [f"The load generator reached {r['offered_over_capacity']:g}x capacity, not "
                  f"{a['factor']:g}x: {sharing}, and a closed loop offers only as fast as answers (200 or 503) "
                  "come back.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    out, run, header = measure_paused(args, "overload", measure)
    result = analyse(args, out, run)
    report = {**header, "server_env": run["url_env"], "result": result}
    plot(result, out / "overload.png")
    write_report(out, "overload", report, markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main(parse_args())["result"]["passed"] else 1)
