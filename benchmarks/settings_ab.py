"""Two server settings side by side: visionserve serving the released CNN alone with settings A, then B, rounds
interleaved; per server one sequential client (median ms of single-PNG /classify requests on one keep-alive
connection) and then closed-loop Locust users (req/s, p50, p99). Medians over rounds, ratios B/A of one run.

    .venv/bin/python -m benchmarks.settings_ab --a VISIONSERVE_INLINE_BATCH_US=0 --b VISIONSERVE_INLINE_BATCH_US=1000 \\
        --name inline_ab                    # batches on the model's thread against short ones on the event loop

Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.bench_serve import locust_closed_loop
from benchmarks.peers import first_answer, sequential_ms
from benchmarks.report import write_results
from loadtests.machine import git_commit, load_average, processor_name
from loadtests.payloads import fashion_test_images, png
from loadtests.server import folder_of, models_folder_environment, running_server

REPO = Path(__file__).resolve().parent.parent


def settings(pairs: list[str]) -> dict[str, str]:
    """["KEY=VALUE", ...] -> {KEY: VALUE}; each key a VISIONSERVE_ or BENTOML_ variable."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith(("VISIONSERVE_", "BENTOML_")):
            raise SystemExit(f"{pair!r}: give VISIONSERVE_*=value or BENTOML_*=value")
        parsed[key] = value
    return parsed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE", help="settings of server A")
    p.add_argument("--b", nargs="+", required=True, metavar="KEY=VALUE", help="settings of server B")
    p.add_argument("--model", default=str(REPO / "models" / "cnn"))
    p.add_argument("--workers", type=int, default=None, help="VISIONSERVE_WORKERS of both (default: the shipped)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sequential", type=int, default=1500, help="sequential requests per server per round")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--duration", type=int, default=15, help="seconds of Locust load per server per round")
    p.add_argument("--name", default="settings_ab", help="results file name")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--dry-run", action="store_true", help="measure but do not write results")
    return p.parse_args(argv)


def markdown_report(results: dict) -> str:
    a, b = results["servers"]["A"], results["servers"]["B"]
    lines = [f"# Settings A/B: {results['name']}", "",
             f"Command: `{results['command']}` ({results['started']}, commit {results['commit']}). Machine: "
             f"{results['processor']}; load average {results['load_average_start']} at the start, "
             f"{results['load_average_end']} at the end. The released CNN alone, {results['workers']} worker(s); "
             f"per server and round: {results['sequential']} sequential single-PNG requests, then "
             f"{results['users']} closed-loop Locust users for {results['duration_s']} s. Medians over "
             f"{results['rounds']} interleaved rounds.", "",
             "| server | settings | 1 client, ms | req/s | p50 ms | p99 ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, row in results["servers"].items():
        m = row["median"]
        shown = ", ".join(f"`{k}={v}`" for k, v in row["settings"].items()) or "(shipped defaults)"
        lines.append(f"| {label} | {shown} | {m['sequential_ms']:.3f} | {m['req_per_s']:,.0f} | {m['p50_ms']:.0f} | "
                     f"{m['p99_ms']:.0f} | {m['errors']:.0f} |")
    lines += ["", f"B/A: one client's time **{b['median']['sequential_ms'] / a['median']['sequential_ms']:.2f}x**, "
              f"req/s **{b['median']['req_per_s'] / a['median']['req_per_s']:.2f}x**.", "",
              "Per round (1 client ms; req/s; p99 ms):", ""]
    for label, row in results["servers"].items():
        lines.append(f"- {label}: " + "; ".join(f"{r['sequential_ms']:.3f} ms, {r['req_per_s']:,.0f} req/s, "
                                               f"p99 {r['p99_ms']:.0f}" for r in row["runs"]))
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    model = Path(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="settings-ab-"))
    models = folder_of([model], workdir / "models")
    image = fashion_test_images(1, 0)
    np.save(workdir / "image.npy", image)
    body = png(image[0])
    base = {"VISIONSERVE_WORKERS": str(args.workers)} if args.workers else {}
    servers = {"A": {"settings": settings(args.a), "runs": []}, "B": {"settings": settings(args.b), "runs": []}}
    started, load_start = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load_average()
    for round_index in range(args.rounds):
        for label, row in servers.items():
            env = models_folder_environment(models, {**base, **row["settings"]})
            with running_server(env, workdir / f"{label}-{round_index}.log") as server:
                first_answer(server.url, body)  # warm-up
                sequential = sequential_ms(server.url, body, args.sequential)
                run = locust_closed_loop(server.url, args.users, args.duration, workdir / "image.npy",
                                         workdir / f"{label}-{round_index}")
            row["runs"].append({**run, "sequential_ms": sequential})
            print(f"round {round_index + 1} {label}: {row['runs'][-1]}", flush=True)
    for row in servers.values():
        row["median"] = {key: statistics.median(r[key] for r in row["runs"])
                         for key in ("sequential_ms", "req_per_s", "p50_ms", "p99_ms", "errors")}
    results = {"name": args.name, "command": shlex.join(["python", "-m", "benchmarks.settings_ab", *sys.argv[1:]]),
               "started": started, "commit": git_commit(), "processor": processor_name(),
               "load_average_start": load_start, "load_average_end": load_average(),
               "workers": args.workers or "shipped default", "rounds": args.rounds, "sequential": args.sequential,
               "users": args.users, "duration_s": args.duration, "servers": servers}
    write_results(args.out, args.name, results, markdown_report(results), args.dry_run)
    return results


if __name__ == "__main__":
    main(parse_args())
