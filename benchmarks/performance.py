"""docs/PERFORMANCE.md from measurements: raw vs served, latency at fixed user counts, capacity per endpoint.

One run, three parts, every figure of the report measured by it:
1. `python -m benchmarks.bench_serve` (`make bench-serve`) in a subprocess: raw onnxruntime in-process vs the same
   models served, 1 item and batched, and 32 closed-loop clients; it writes benchmarks/results/serve.{json,md}.
2. One server (shipped defaults but one worker, the models of --models), loaded by Locust one endpoint at a time (the users of
   loadtests/locustfile.py, picked by their tag) at each user count of --search-users and --table-users,
   --seconds each, statistics reset once every user is spawned.
3. Per endpoint, p50/p99 at the --table-users counts and the capacity: the request rate at the last step of
   --search-users (in order) whose p99 is within the endpoint's p99_ms objective in loadtests/slo.yaml with no
   failed request. The search stops at the first failing step (the table counts are still measured).

Writes benchmarks/results/performance.json, docs/PERFORMANCE.md and docs/performance_latency.png (p99 vs
users per endpoint); Locust's own files go to reports/performance/<UTC stamp>/ (not tracked).

    .venv/bin/python -m benchmarks.performance                                  # make performance
    .venv/bin/python -m benchmarks.performance --models /tmp/models --pause-pids 1234   # SIGSTOP 1234 meanwhile
    .venv/bin/python -m benchmarks.performance --render-only                    # re-render from the JSON
    .venv/bin/python -m benchmarks.performance --seconds 3 --search-users 4 8 --table-users 8 \\
        --bench-serve-args "--seconds 1 --concurrent-seconds 3 --compare-seconds 2" --out /tmp/p --doc /tmp/p/P.md

A model in --models that is not byte-identical to the one of the same name in models/ is labelled a stand-in
(not released) in the report; --stand-in NAME="note" says what it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from loadtests.machine import git_commit, load_average, paused, processor_name, stamp
from loadtests.report import load_objectives, read_failures, read_stats
from loadtests.scenarios import ENDPOINTS, Endpoint, available_tasks
from loadtests.server import models_folder_environment, running_server

REPO = Path(__file__).resolve().parent.parent

BIN = Path(sys.executable).parent
SHIPPED = {"VISIONSERVE_BATCHING": "on", "VISIONSERVE_WORKERS": "1"}  # one worker (the default is one per core)
ITEMS_PER_REQUEST = {"classify": 1, "classify_batch": 16, "tensor": 16, "segment": 1, "generate": 16, "reconstruct": 1}
# bench-serve's cells, per load-test endpoint: (task, request name in serve.json) for 1 item and batched.
BENCH_CELLS = {
    "classify": [("classification", "1 png")],
    "classify_batch": [("classification", "64 png")],
    "tensor": [("classification", "64 tensor")],
    "segment": [("segmentation", "1 scene png, mask")],
    "generate": [("generation", "n=1, grid png"), ("generation", "n=16, grid png")],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=str(REPO / "models"), help="the models to serve and benchmark")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="performance.json (and bench-serve's serve.json/.md) go here")
    p.add_argument("--doc", default=str(REPO / "docs" / "PERFORMANCE.md"))
    p.add_argument("--plot", help="default: performance_latency.png beside --doc")
    p.add_argument("--reports", default=str(REPO / "reports" / "performance"), help="Locust's files: REPORTS/<stamp>/")
    p.add_argument("--slo", default=str(REPO / "loadtests" / "slo.yaml"))
    # 15 s per step: 5 endpoints x 6 steps fit in ~11 minutes with Locust's start and stop.
    p.add_argument("--seconds", type=int, default=15, help="Locust run time per endpoint and user count")
    p.add_argument("--search-users", type=int, nargs="+", default=[4, 8, 16, 32, 64, 96],
                   help="capacity search steps, in order")
    p.add_argument("--table-users", type=int, nargs="+", default=[8, 32, 64], help="p50/p99 reported at these")
    p.add_argument("--endpoints", nargs="+", choices=[e.tag for e in ENDPOINTS], help="default: every one served")
    p.add_argument("--skip-bench-serve", action="store_true", help="reuse OUT/serve.json instead of measuring")
    p.add_argument("--bench-serve-args", default="", help="extra arguments of benchmarks.bench_serve, e.g. "
                   "\"--concurrent-seconds 30 --compare-seconds 10\"")
    p.add_argument("--pause-pids", type=int, nargs="*", default=[],
                   help="processes (other work on a shared machine) to SIGSTOP while measuring; always SIGCONT after")
    p.add_argument("--stand-in", action="append", default=[], metavar="NAME=NOTE",
                   help="what an unreleased model of --models is, for the report")
    p.add_argument("--render-only", action="store_true", help="re-render the report from OUT/performance.json")
    return p.parse_args(argv)


# --- the machine -------------------------------------------------------------------------------------

def command_line(pid: int) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(psutil.Process(pid).cmdline())
    return "?"


# --- part 1: bench-serve -----------------------------------------------------------------------------

def relative(path: Path) -> str:
    """A path inside the repository as it is written in the reports (relative: commands run from the root)."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_bench_serve(models: Path, out: Path, extra_args: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_serve", "--models", relative(models),
               "--out", relative(out), *shlex.split(extra_args)]
    print("performance: " + " ".join(command), file=sys.stderr, flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    serve = json.loads((out / "serve.json").read_text())
    serve["wall_seconds"] = round(time.monotonic() - started, 1)
    return serve


# --- part 2: Locust, one endpoint and user count at a time ------------------------------------------

def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (the server's CLI and its workers; Locust)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def wait_sampling_cpu(process: subprocess.Popen, server_pid: int, timeout_s: float,
                      interval_s: float = 0.5) -> list[tuple[float, float, float]]:
    """Waits for `process` (Locust), sampling (epoch time, its CPU seconds, the server's CPU seconds) so that
    CPU use can be taken over the measured window only, not Locust's start (imports, payloads)."""
    samples, deadline = [], time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            break
        samples.append((time.time(), process_tree_cpu_seconds(process.pid), process_tree_cpu_seconds(server_pid)))
        time.sleep(interval_s)
    process.wait()
    return samples


def cpu_cores_in_window(samples: list[tuple[float, float, float]], start: float,
                        end: float) -> tuple[float | None, float | None]:
    """(Locust's, the server's) CPU seconds per second between the first and last sample inside [start, end]."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
        return None, None
    span = inside[-1][0] - inside[0][0]
    return (round((inside[-1][1] - inside[0][1]) / span, 2), round((inside[-1][2] - inside[0][2]) / span, 2))


def locust_command(url: str, endpoint: Endpoint, users: int | str, seconds: int, prefix: Path) -> list[str]:
    """Every user spawned within a second, statistics reset once they all run: steady state only."""
    return [str(BIN / "locust"), "--config", str(REPO / "loadtests" / "locust.conf"), "--headless",
            "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{seconds}s", "--host", url,
            "--tags", endpoint.tag, "--reset-stats", "--csv", str(prefix), "--json-file", str(prefix),
            "--only-summary", "--loglevel", "WARNING"]


def run_level(url: str, server_pid: int, endpoint: Endpoint, users: int, seconds: int, p99_objective: float,
              out_dir: Path) -> dict:
    prefix = out_dir / f"{endpoint.tag}-u{users}"
    command = locust_command(url, endpoint, users, seconds, prefix)
    load_before, started = load_average(), time.monotonic()
    with open(f"{prefix}.log", "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            samples = wait_sampling_cpu(process, server_pid, seconds + 120)
        finally:
            if process.poll() is None:
                process.kill()
    level = {"users": users, "seconds": seconds, "locust_exit_code": process.returncode,
             "wall_seconds": round(time.monotonic() - started, 1), "load_average_before": load_before,
             "load_average_after": load_average()}
    json_path = Path(f"{prefix}.json")
    stats = read_stats(json_path).get(endpoint.key) if json_path.is_file() else None
    if stats is None or stats.requests == 0:
        return {**level, "requests": 0, "failures": 0, "passed": False, "client_cpu_cores": None,
                "server_cpu_cores": None,
                "why": f"no request measured (Locust exit status {process.returncode}; log {prefix}.log)"}
    failures = [f for f in read_failures(Path(f"{prefix}_failures.csv")) if f["endpoint"] == endpoint.key]
    entry = next(e for e in json.loads(json_path.read_text()) if f"{e['method']} {e['name']}" == endpoint.key)
    level["client_cpu_cores"], level["server_cpu_cores"] = cpu_cores_in_window(
        samples, entry["start_time"], entry["last_request_timestamp"])
    level.update({"requests": stats.requests, "failures": stats.failures, "error_rate": round(stats.error_rate, 5),
                  "req_per_s": stats.requests_per_s, "mean_ms": stats.mean_ms, "p50_ms": stats.p50_ms,
                  "p95_ms": stats.p95_ms, "p99_ms": stats.p99_ms, "max_ms": stats.max_ms,
                  "failures_by_message": failures})
    reasons = []
    if stats.failures:
        reasons.append(f"{stats.failures} failed request(s)")
    if stats.p99_ms > p99_objective:
        reasons.append(f"p99 {stats.p99_ms:g} ms > {p99_objective:g} ms")
    level["passed"] = not reasons
    level["why"] = "; ".join(reasons)
    return level


def measure_endpoint(url: str, server_pid: int, endpoint: Endpoint, args: argparse.Namespace,
                     p99_objective: float, out_dir: Path, clock_start: float) -> dict:
    """Every user count of the search (in order, stopping at the first failing step) and of the table."""
    search, table = list(args.search_users), set(args.table_users)
    steps = search + sorted(table - set(search))
    levels: dict[int, dict] = {}
    search_failed = False
    for users in steps:
        if users in levels or (search_failed and users not in table):
            continue
        level = run_level(url, server_pid, endpoint, users, args.seconds, p99_objective, out_dir)
        levels[users] = level
        print(f"performance: [{time.monotonic() - clock_start:6.0f} s] {endpoint.key} {users:3d} users: "
              f"{level.get('req_per_s', 0):7.1f} req/s p50 {level.get('p50_ms')} p99 {level.get('p99_ms')} ms, "
              f"{level['failures']} failures, client {level['client_cpu_cores']} / server "
              f"{level['server_cpu_cores']} cores{'' if level['passed'] else ' -- ' + level['why']}",
              file=sys.stderr, flush=True)
        if users in search and not level["passed"]:
            search_failed = True
    return {"endpoint": endpoint.key, "tag": endpoint.tag, "p99_objective_ms": p99_objective,
            "levels": [levels[u] for u in sorted(levels)], "capacity": capacity(search, levels)}


def capacity(search: list[int], levels: dict[int, dict]) -> dict:
    """The last step of the search before the first failing one; `ceiling` when no step failed."""
    passing, first_failure = None, None
    for users in search:
        level = levels.get(users)
        if level is None:
            break
        if not level["passed"]:
            first_failure = level
            break
        passing = level
    return {"users": passing and passing["users"], "req_per_s": passing and passing["req_per_s"],
            "p99_ms": passing and passing["p99_ms"], "ceiling": first_failure is None,
            "first_failing_users": first_failure and first_failure["users"],
            "first_failing_why": first_failure and first_failure["why"]}


def measure_load(models: Path, args: argparse.Namespace, reports: Path, clock_start: float) -> dict:
    objectives = load_objectives(Path(args.slo))
    with running_server(models_folder_environment(models, SHIPPED), reports / "server.log") as server:
        url = server.url
        described = httpx.get(url + "/models", timeout=10).json()
        tasks = available_tasks(described)
        wanted = args.endpoints or [e.tag for e in ENDPOINTS]
        endpoints = [e for e in ENDPOINTS if e.tag in wanted and e.task in tasks]
        skipped = [e.key for e in ENDPOINTS if e.tag in wanted and e.task not in tasks]
        results = []
        for endpoint in endpoints:
            p99 = float(objectives.get(endpoint.key, {}).get("p99_ms", float("inf")))
            results.append(measure_endpoint(url, server.process.pid, endpoint, args, p99, reports, clock_start))
        serving = httpx.get(url + "/models", timeout=10).json().get("serving", {})
    return {"server_env": SHIPPED, "default_models": described.get("default"), "serving_after": serving,
            "models_on_server": [{k: m.get(k) for k in ("name", "task", "version", "provider")}
                                 for m in described.get("models", [])],
            "objectives": objectives, "endpoints": results, "skipped_no_model": skipped,
            "locust_command": " ".join(locust_command(url, Endpoint("<tag>", "", ""), "N", args.seconds,
                                                      reports / "<tag>-uN")).replace(str(REPO) + "/", "")}


# --- the models measured -----------------------------------------------------------------------------

def describe_models(models: Path, notes: dict[str, str]) -> list[dict]:
    described = []
    for card_path in sorted(models.glob("*/card.json")):
        card = json.loads(card_path.read_text())
        released = REPO / "models" / card["name"] / "card.json"
        is_released = released.is_file() and json.loads(released.read_text()).get("sha256") == card.get("sha256")
        described.append({"name": card["name"], "task": card["task"], "version": card.get("version"),
                          "family": card.get("architecture", {}).get("family"),
                          "parameters": card.get("architecture", {}).get("parameters"),
                          "training_command": card.get("training", {}).get("command"),
                          "released": is_released, "note": notes.get(card["name"], "")})
    return described


# --- report ------------------------------------------------------------------------------------------

def fmt(value, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def plot_latency(results: dict, path: Path) -> None:
    """p50 and p99 vs users, one panel per endpoint, with its p99 objective; failing steps marked."""
    from matplotlib import ticker
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    endpoints = results["load"]["endpoints"]
    figure = Figure(figsize=(max(8.0, 3.2 * len(endpoints)), 4.0), layout="constrained")
    axes_row = figure.subplots(1, len(endpoints), squeeze=False, sharey=True)[0]
    for axes, endpoint in zip(axes_row, endpoints):
        levels = [level for level in endpoint["levels"] if level["requests"]]
        users = [level["users"] for level in levels]
        axes.plot(users, [level["p99_ms"] for level in levels], "o-", color="#e45756", label="p99")
        axes.plot(users, [level["p50_ms"] for level in levels], "s-", color="#4c78a8", label="p50", alpha=0.7)
        failing = [level for level in levels if not level["passed"]]
        axes.plot([level["users"] for level in failing], [level["p99_ms"] for level in failing], "kx", markersize=10,
                  label="step fails (p99 over objective, or errors)")
        axes.axhline(endpoint["p99_objective_ms"], color="black", linestyle="--", linewidth=1, label="p99 objective")
        axes.set_xscale("log", base=2)
        axes.set_xticks(users, [str(u) for u in users])
        axes.minorticks_off()
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _pos: f"{value:g}"))
        axes.yaxis.set_minor_formatter(ticker.NullFormatter())
        axes.set_xlabel("Locust users")
        axes.set_title(endpoint["endpoint"], fontsize=9)
        axes.grid(True, which="major", alpha=0.3)
    axes_row[0].set_ylabel("response time (ms)")
    handles, labels = axes_row[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    figure.suptitle(f"Response time vs Locust users, one endpoint at a time, {results['load']['seconds']} s per "
                    f"step; {results['machine']['cpus']} CPUs shared by server and Locust", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def bench_rows(results: dict) -> list[str]:
    """Raw vs served per endpoint and model, from serve.json."""
    serve = results["bench_serve"]
    tasks = {m["name"]: m["task"] for m in results["models"]}
    lines = ["| endpoint | model | request | raw onnxruntime items/s | served items/s | served / raw "
             "| raw p50 ms | served p50 ms | served p99 ms |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    paths = {"classify": "/classify", "classify_batch": "/classify", "tensor": "/classify/tensor",
             "segment": "/segment", "generate": "/generate"}
    seen = set()
    for tag, cells in BENCH_CELLS.items():
        for task, request in cells:
            for model, served in serve["served"].items():
                if tasks.get(model) != task or request not in served or (model, request) in seen:
                    continue
                seen.add((model, request))
                cell = served[request]
                raw = serve["raw"][model][str(cell["images_per_call"])]
                lines.append(f"| {paths[tag]} | {model} | {request} | {fmt(raw['img_per_s_at_median'])} | "
                             f"{fmt(cell['img_per_s_at_median'])} | {cell['ratio_to_raw']:.2f} | {raw['p50_ms']:.2f} "
                             f"| {cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} |")
    return lines


def markdown_report(results: dict, plot_name: str) -> str:
    machine, load, serve = results["machine"], results["load"], results["bench_serve"]
    paused_note = ("Other work sharing these cores was paused with SIGSTOP for the whole measurement and resumed "
                   "(SIGCONT) after: " + "; ".join(f"PID {pid} `{command}`" for pid, command in
                                                   results["paused_processes"].items())
                   if results["paused_processes"] else "Nothing else on the machine was paused")
    lines = [
        "# Performance", "",
        f"Generated by `{results['command']}` (`make performance`, [benchmarks/performance.py]"
        f"(../benchmarks/performance.py)) on {results['started_utc']} at commit {results['git_commit']}; "
        f"every figure below is measured by that run (raw numbers: "
        f"[benchmarks/results/performance.json](../benchmarks/results/performance.json)). Wall time of the run: "
        f"{results['wall_seconds'] / 60:.1f} min.", "",
        "## Machine and method", "",
        f"- **Machine**: {machine['cpus']} CPUs ({machine['processor']}), onnxruntime {serve['machine']['onnxruntime']}"
        f" on {', '.join(serve['machine']['provider'] or ['?'])}, Python {machine['python']}. Server, load generator "
        "and benchmark share these cores.",
        f"- **Load average** (1, 5, 15 min): {machine['load_average_start']} at the start, "
        f"{machine['load_average_end']} at the end, taken after pausing (they lag: the start value still shows "
        f"any paused work). {paused_note}.",
        f"- **Server**: `bentoml serve service.app:VisionService` with the shipped defaults but one worker (the "
        f"default is one per core) ({', '.join(f'{k}={v}' for k, v in load['server_env'].items())}), models from `{results['models_dir']}`; "
        "`/classify` and `/classify/tensor` use the default classifier, "
        f"`{(load['default_models'] or {}).get('classification')}`.",
        f"- **Raw vs served**: `{serve['command']}` ([serve.md](../benchmarks/results/serve.md)), "
        f"{serve['seconds']} s per cell, one sequential client; items/s at the median latency. "
        f"It took {serve.get('wall_seconds', 0) / 60:.1f} min.",
        f"- **Load**: Locust, headless, the users of `loadtests/locustfile.py` (each pauses 0.05-0.25 s between "
        f"requests, so a user sends at most ~7 req/s), one endpoint at a time, {load['seconds']} s per step, "
        "every user spawned within a second and statistics reset once they all run. Command per step: "
        f"`{load['locust_command']}`. Percentiles are Locust's (client side, its rounded histogram: 2 significant "
        "digits above 100 ms).",
        f"- **Capacity**: the request rate at the last step of {load['search_users']} users whose p99 is within the "
        f"endpoint's `p99_ms` objective in `loadtests/slo.yaml` with no failed request; the search stops at the "
        "first failing step. \"≥\" means no step failed: the capacity is above what the largest step offered.",
        "",
        "## Models", "",
        "| model | task | architecture | parameters | version | what it is |", "|---|---|---|---:|---|---|"]
    for m in results["models"]:
        what = "released (models/)" if m["released"] else "**stand-in, not released**: the release architecture"
        if not m["released"]:
            what += (f"; {m['note']}" if m["note"] else "") + f"; its card's command: `{m['training_command']}`"
        lines.append(f"| {m['name']} | {m['task']} | {m['family']} | {fmt(m['parameters'])} | {m['version']} "
                     f"| {what} |")
    if any(not m["released"] for m in results["models"]):
        lines += ["", "Latency depends on the architecture and input size, not on the weights: a stand-in's figures "
                  "are the released model's to expect, its quality metrics are not."]

    lines += ["", "## Raw onnxruntime vs served", "",
              "Items per second (images, scenes or samples) of one sequential client: raw `session.run` in-process "
              "vs the same work over HTTP, 1 item and batched per request.", "", *bench_rows(results), ""]
    concurrency = serve.get("concurrency", [])
    if concurrency:
        lines += [f"32 closed-loop single-image PNG clients (no pause between requests) against the server "
                  f"configurations bench-serve compares, default model `{serve.get('default_model')}`:", "",
                  "| server configuration | seconds | requests | errors | req/s | p50 ms | p99 ms |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {run['config']} | {run['seconds']} | {run['requests']} | {run['errors']} | {run['req_per_s']} | "
                  f"{fmt(run['p50_ms'])} | {fmt(run['p99_ms'])} |" for run in concurrency]
        lines += [""]

    table_users = load["table_users"]
    lines += ["## Latency at " + ", ".join(map(str, table_users)) + " users", "",
              "| endpoint | p99 objective ms | "
              + " | ".join(f"{u} users: req/s, p50 / p99 ms, errors" for u in table_users) + " |",
              "|---|---:|" + "---:|" * len(table_users)]
    for endpoint in load["endpoints"]:
        by_users = {level["users"]: level for level in endpoint["levels"]}
        cells = []
        for u in table_users:
            level = by_users.get(u)
            if not level or not level["requests"]:
                cells.append("not measured" if not level else level["why"])
                continue
            mark = "" if level["passed"] else " ✗"
            cells.append(f"{fmt(level['req_per_s'])}, {fmt(level['p50_ms'])} / {fmt(level['p99_ms'])}, "
                         f"{level['failures']}{mark}")
        lines.append(f"| {endpoint['endpoint']} | {fmt(endpoint['p99_objective_ms'])} | " + " | ".join(cells) + " |")
    lines += ["", "✗: p99 above the objective or a failed request.", "", f"![p99 vs users]({plot_name})", ""]

    lines += ["## Capacity", "",
              "| endpoint | p99 objective ms | capacity req/s | items/s | at users | p99 there ms | first failing step "
              "| raw onnxruntime items/s (largest batch) | capacity items/s / raw |",
              "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for endpoint in load["endpoints"]:
        cap = endpoint["capacity"]
        items = ITEMS_PER_REQUEST[endpoint["tag"]]
        raw = raw_best(results, endpoint["tag"])
        if cap["users"] is None:
            rate, item_rate, ratio = "none", "–", "–"
        else:
            rate = ("≥ " if cap["ceiling"] else "") + fmt(cap["req_per_s"])
            item_rate = ("≥ " if cap["ceiling"] else "") + fmt(cap["req_per_s"] * items)
            ratio = f"{cap['req_per_s'] * items / raw:.2f}" if raw else "–"
        failing = (f"{cap['first_failing_users']} users: {cap['first_failing_why']}" if cap["first_failing_users"]
                   else "none")
        lines.append(f"| {endpoint['endpoint']} | {fmt(endpoint['p99_objective_ms'])} | {rate} | {item_rate} | "
                     f"{cap['users'] or '–'} | {fmt(cap['p99_ms'])} | {failing} | {fmt(raw)} | {ratio} |")
    lines += ["", f"Items per request: {', '.join(f'{k} {v}' for k, v in ITEMS_PER_REQUEST.items())}. The last "
              "column compares the served capacity with raw onnxruntime's best items/s at one call at a time "
              "(bench-serve's largest batch), which is the model's own ceiling on these cores.", ""]

    lines += ["## Every step", "",
              "| endpoint | users | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms | Locust CPU "
              "cores | server CPU cores | load average before | passes |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for endpoint in load["endpoints"]:
        for level in endpoint["levels"]:
            lines.append(f"| {endpoint['endpoint']} | {level['users']} | {level['requests']} | {level['failures']} | "
                         f"{fmt(level.get('req_per_s'), 1)} | {fmt(level.get('p50_ms'))} | {fmt(level.get('p95_ms'))}"
                         f" | {fmt(level.get('p99_ms'))} | {fmt(level.get('max_ms'))} | "
                         f"{fmt(level['client_cpu_cores'], 2)} | {fmt(level['server_cpu_cores'], 2)} | "
                         f"{level['load_average_before'][0]} | "
                         f"{'yes' if level['passed'] else 'no: ' + level['why']} |")
    lines += ["", "CPU columns: CPU seconds per second of the Locust process and of the server's processes, "
              "sampled every 0.5 s over the measured window (after every user was spawned). They share "
              f"{results['machine']['cpus']} cores: where their sum nears that, the machine, not the service "
              "alone, is the limit.", ""]

    failures = [(endpoint["endpoint"], level["users"], f) for endpoint in load["endpoints"]
                for level in endpoint["levels"] for f in level.get("failures_by_message", [])]
    lines += ["## Failed requests", ""]
    if failures:
        lines += ["| endpoint | users | error | occurrences |", "|---|---:|---|---:|"]
        lines += [f"| {key} | {users} | {f['error']} | {f['occurrences']} |" for key, users, f in failures]
    else:
        lines += ["None: every request of every step answered 200 with the expected shape."]
    if load["skipped_no_model"]:
        lines += ["", "Not measured (no model of that task in the models folder): "
                  + ", ".join(load["skipped_no_model"]) + "."]
    lines += ["", "## Reproduce", "", "```sh", "make performance    # .venv/bin/python -m benchmarks.performance",
              results["command"], "```", ""]
    return "\n".join(lines)


def raw_best(results: dict, tag: str) -> float | None:
    """Raw onnxruntime's best items/s for the model the endpoint's load used (its task's default model)."""
    task = next(endpoint.task for endpoint in ENDPOINTS if endpoint.tag == tag)
    model = (results["load"]["default_models"] or {}).get(task)
    raw = results["bench_serve"]["raw"].get(model)
    return max(cell["img_per_s_at_median"] for cell in raw.values()) if raw else None


def render(results: dict, doc: Path, plot: Path) -> None:
    plot_latency(results, plot)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(markdown_report(results, os.path.relpath(plot, doc.parent)))
    print(f"performance: wrote {doc} and {plot}", file=sys.stderr)


# --- main --------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    out, doc = Path(args.out), Path(args.doc)
    plot = Path(args.plot) if args.plot else doc.parent / "performance_latency.png"
    if args.render_only:
        results = json.loads((out / "performance.json").read_text())
        render(results, doc, plot)
        return results

    models = Path(args.models).resolve()
    notes = dict(item.split("=", 1) for item in args.stand_in)
    reports = Path(args.reports) / stamp()
    reports.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": "python -m benchmarks.performance " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
               "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git_commit": git_commit(),
               "models_dir": str(models), "models": describe_models(models, notes)}
    clock_start = time.monotonic()
    paused_processes = {str(pid): command_line(pid) for pid in args.pause_pids}
    with paused(args.pause_pids) as stopped:
        load_start = load_average()
        if args.skip_bench_serve:
            serve = json.loads((out / "serve.json").read_text())
        else:
            serve = run_bench_serve(models, out, args.bench_serve_args)
        print(f"performance: [{time.monotonic() - clock_start:6.0f} s] bench-serve done", file=sys.stderr, flush=True)
        load = measure_load(models, args, reports, clock_start)
        load_end = load_average()
    load.update({"seconds": args.seconds, "search_users": args.search_users, "table_users": args.table_users,
                 "reports": str(reports)})
    results.update({
        "wall_seconds": round(time.monotonic() - clock_start, 1),
        "paused_processes": {pid: command for pid, command in paused_processes.items() if int(pid) in stopped},
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": processor_name(),
                    "python": platform.python_version(), "load_average_start": load_start,
                    "load_average_end": load_end},
        "bench_serve": serve, "load": load})
    (out / "performance.json").write_text(json.dumps(results, indent=2) + "\n")
    render(results, doc, plot)
    return results


if __name__ == "__main__":
    main(parse_args())
