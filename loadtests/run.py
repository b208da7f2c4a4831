"""`make loadtest`: serve if nothing answers, run Locust headless, write the reports, check the objectives.

    .venv/bin/python -m loadtests.run                                   # every endpoint, 8 users, 20 s
    .venv/bin/python -m loadtests.run --scenario available --users 8 --duration 20s
    .venv/bin/python -m loadtests.run --workers 2                       # 1 Locust master + 2 local workers
    .venv/bin/python -m loadtests.run --host http://10.0.0.5:3000 --slo my-slo.yaml

When no visionserve answers at --host (a local address), starts `bentoml serve service.app:VisionService`
there (the checkout's models, imported as `make serve` does into a BentoML store of its own in a temporary
folder unless BENTOML_HOME names one; or VISIONSERVE_MODELS / VISIONSERVE_MODELS_DIR when set), and stops it
afterwards. Writes reports/loadtest/<UTC stamp>/:
Locust's CSVs, JSON and HTML report, its log, latency_percentiles.png, summary.json and summary.md.
Exits 1 naming every missed objective of loadtests/slo.yaml (or --slo), 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from loadtests.report import (
    check_objectives,
    load_objectives,
    plot_percentiles,
    read_failures,
    read_stats,
    write_summary,
)
from loadtests.scenarios import SCENARIOS, Endpoint, ScenarioError, available_tasks, fetch_models, select_endpoints
from loadtests.server import free_port, is_ready, running_server, stop_process_group

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOCUST_PREFIX = "locust"  # file names: locust_stats.csv, locust.json, locust.html, ...
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=8, help="users started per second")
    p.add_argument("--duration", default="20s", help="Locust run time: 20s, 2m, 1h30m")
    p.add_argument("--scenario", default="all", choices=sorted(SCENARIOS))
    p.add_argument("--host", default="http://127.0.0.1:3000", help="the service's base URL")
    p.add_argument("--workers", type=int, default=0,
                   help="0: one Locust process; N: a master expecting N workers (--local-workers of them here)")
    p.add_argument("--local-workers", type=int, help="workers started on this machine (default: --workers)")
    p.add_argument("--master-bind-host", default="127.0.0.1", help="0.0.0.0 to accept workers from other hosts")
    p.add_argument("--master-port", type=int, help="default: a free port (give one when workers run elsewhere)")
    p.add_argument("--slo", default=str(REPO / "loadtests" / "slo.yaml"), help="the objectives file")
    p.add_argument("--out", default=str(REPO / "reports" / "loadtest"), help="reports go to OUT/<UTC stamp>/")
    p.add_argument("--server-timeout", type=float, default=180, help="seconds to wait for a started server")
    return p.parse_args(argv)


def duration_seconds(text: str) -> float:
    """Locust's run-time syntax (20s, 2m, 1h30m; a bare number is seconds) -> seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or parts is None:
        raise ValueError(f"duration {text!r}: use e.g. 20s, 2m or 1h30m")
    hours, minutes, seconds = (int(group or 0) for group in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def import_models_into_store(env: dict[str, str]) -> None:
    """What `make serve` does before serving: models/ into BentoML's store (idempotent)."""
    result = subprocess.run([sys.executable, "-m", "service.model_store", "import",
                             env.get("VISIONSERVE_CARDS_DIR") or "models"], cwd=REPO, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"importing models/ into BentoML's store failed:\n{result.stdout}{result.stderr}")


@contextlib.contextmanager
def server_environment() -> Iterator[dict[str, str]]:
    """The environment of a server this driver starts. Serving the checkout's cards (the default), it gets a
    BentoML store of its own in a temporary folder, models/ imported there as `make serve` does, so that what
    ~/bentoml holds (other checkouts' models) cannot change what is measured; a BENTOML_HOME that is set names
    the store to use instead. VISIONSERVE_MODELS (tags of the user's store) or VISIONSERVE_MODELS_DIR (a plain
    folder) are used as given."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    if env.get("VISIONSERVE_MODELS_DIR") or env.get("VISIONSERVE_MODELS"):
        yield env
        return
    with contextlib.ExitStack() as cleanup:
        if not env.get("BENTOML_HOME"):
            env["BENTOML_HOME"] = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="visionserve-bentoml-"))
        import_models_into_store(env)
        yield env


@contextlib.contextmanager
def service_at(url: str, log_path: Path, timeout_s: float) -> Iterator[tuple[str, bool]]:
    """(the URL to load, whether this driver started the server there). Uses a service that answers at
    `url`; otherwise starts one on that port (or on a free one when the port is taken) and stops it after."""
    if is_ready(url):
        yield url, False
        return
    target = urlsplit(url)
    if target.hostname not in LOCAL_HOSTS:
        raise RuntimeError(f"nothing answers {url}/readyz, and a server can only be started on this machine")
    host = "127.0.0.1" if target.hostname == "localhost" else target.hostname
    port = target.port or 80
    if not port_is_free(host, port):
        port = free_port()
        print(f"loadtest: {url} is taken by something that is not a ready visionserve; serving on port {port}",
              file=sys.stderr)
    print(f"loadtest: no service at {url}; starting one (log: {log_path})", file=sys.stderr)
    with server_environment() as env, running_server(env, log_path, host=host, port=port,
                                                     timeout_s=timeout_s) as server:
        yield server.url, True


def locust_run_options(args: argparse.Namespace, url: str, out_dir: Path) -> list[str]:
    """Options of the process that runs (or, distributed, coordinates) the load and writes the reports."""
    prefix = out_dir / LOCUST_PREFIX
    return ["--config", str(REPO / "loadtests" / "locust.conf"), "--headless",
            "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.duration,
            "--host", url, "--scenario", args.scenario,
            "--csv", str(prefix), "--html", f"{prefix}.html", "--json-file", str(prefix), "--only-summary"]


def run_locust(args: argparse.Namespace, url: str, out_dir: Path) -> int:
    """Runs Locust to completion (one process, or a master and its local workers); its exit status."""
    locust = str(BIN / "locust")
    timeout_s = duration_seconds(args.duration) + 120
    with open(out_dir / "locust.log", "wb") as log:
        if args.workers <= 0:
            process = subprocess.Popen([locust, *locust_run_options(args, url, out_dir)], cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            return wait_or_stop(process, timeout_s)
        port = args.master_port or free_port()
        master = subprocess.Popen(
            [locust, *locust_run_options(args, url, out_dir), "--master", "--expect-workers", str(args.workers),
             "--expect-workers-max-wait", "60", "--master-bind-host", args.master_bind_host,
             "--master-bind-port", str(port)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        local = args.workers if args.local_workers is None else args.local_workers
        workers = [start_worker(locust, port, out_dir / f"worker-{i + 1}.log") for i in range(local)]
        try:
            return wait_or_stop(master, timeout_s + 60)
        finally:
            for worker in workers:  # a worker quits when its master does; stop any that did not
                wait_or_stop(worker, 15)


def start_worker(locust: str, master_port: int, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [locust, "-f", str(REPO / "loadtests" / "locustfile.py"), "--worker",
         "--master-host", "127.0.0.1", "--master-port", str(master_port)],
        cwd=REPO, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_or_stop(process: subprocess.Popen, timeout_s: float) -> int:
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process_group(process, grace_s=10)
        return process.returncode
    finally:
        stop_process_group(process, grace_s=10)


def models_on_server(url: str) -> dict:
    """What the report records about the server: its models (name, task, version) and serving settings."""
    described = fetch_models(url)
    return {"models": [{key: model.get(key) for key in ("name", "task", "version", "status", "provider")}
                       for model in described.get("models", [])],
            "serving": described.get("serving", {})}


def users_hint(users: int, endpoints: list[Endpoint]) -> str:
    if users >= len(endpoints):
        return ""
    return f" ({users} users cannot cover {len(endpoints)} weighted user classes: raise USERS)"


def load_and_report(args: argparse.Namespace, out_dir: Path) -> int:
    objectives = load_objectives(Path(args.slo))  # a malformed SLO file fails before any load
    with service_at(args.host, out_dir / "server.log", args.server_timeout) as (url, started):
        server = models_on_server(url)
        endpoints = select_endpoints(args.scenario, available_tasks(fetch_models(url)))
        print(f"loadtest: {args.scenario}: {', '.join(e.key for e in endpoints)}; {args.users} users, "
              f"{args.duration}, against {url}", file=sys.stderr)
        load_before = os.getloadavg()
        exit_code = run_locust(args, url, out_dir)
    json_path = out_dir / f"{LOCUST_PREFIX}.json"
    if not json_path.is_file():
        log = (out_dir / "locust.log").read_text(errors="replace")
        print(f"loadtest: Locust exited with status {exit_code} without results; its log ({out_dir / 'locust.log'}) "
              f"ends:\n{log[-3000:]}", file=sys.stderr)
        return 2
    stats = read_stats(json_path)
    results = check_objectives(objectives, stats, endpoints, users_hint(args.users, endpoints))
    title = f"{args.scenario}: {args.users} users, {args.duration}, {args.workers or 'no'} workers, {url}"
    plot_percentiles(stats, objectives, title, out_dir / "latency_percentiles.png")
    run = {"stamp": out_dir.name, "scenario": args.scenario, "host": url, "users": args.users,
           "spawn_rate": args.spawn_rate, "duration": args.duration, "locust_workers": args.workers,
           "server_started": started, "endpoints": [e.key for e in endpoints], "locust_exit_code": exit_code,
           "load_average_before": [round(x, 2) for x in load_before],
           "load_average_after": [round(x, 2) for x in os.getloadavg()],
           "command": " ".join([Path(sys.executable).name, "-m", "loadtests.run", *sys.argv[1:]]), **server}
    summary = write_summary(out_dir, run, stats, results, read_failures(out_dir / f"{LOCUST_PREFIX}_failures.csv"),
                            Path(args.slo))
    print((out_dir / "summary.md").read_text())
    print(f"loadtest: reports in {out_dir}", file=sys.stderr)
    if summary["missed"]:
        print("loadtest: objectives missed:\n" + "\n".join(f"  - {line}" for line in summary["missed"]),
              file=sys.stderr)
        return 1
    return 0


def new_report_dir(parent: Path) -> Path:
    """parent/<UTC stamp>, suffixed when two runs start within the same second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for suffix in ["", *(f"-{n}" for n in range(2, 100))]:
        with contextlib.suppress(FileExistsError):
            (parent / (stamp + suffix)).mkdir(parents=True)
            return parent / (stamp + suffix)
    raise RuntimeError(f"cannot create a report folder under {parent}")


def main(args: argparse.Namespace) -> int:
    out_dir = new_report_dir(Path(args.out))
    try:
        return load_and_report(args, out_dir)
    except (ScenarioError, RuntimeError, ValueError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(parse_args()))
