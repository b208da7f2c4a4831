"""visionserve against the servers users would pick instead, side by side: the same ONNX graph, the same load.

Serves the released CNN graph (models/cnn/model.onnx) with
  (a) visionserve as `make serve` ships it (`bentoml serve service.app:VisionService`, the CNN only),
  (b) plain FastAPI + uvicorn + onnxruntime (benchmarks/peers/fastapi_app.py),
  (c) LitServe with its batching, max_batch_size 64 (benchmarks/peers/litserve_app.py),
  (d) BentoML's documented `@bentoml.api(batchable=True)` service (benchmarks/peers/bentoml_batchable.py),
  (e) the HTTP floor: a Starlette route that reads the body and answers a fixed JSON (benchmarks/peers/floor_app.py),
each with the same worker count and one onnxruntime intra-op thread per worker, and drives each with the same
closed-loop Locust load (loadtests/locust_single_image.py: one Fashion-MNIST test PNG per POST /classify). One server
runs at a time; rounds interleave the servers; medians over rounds go to benchmarks/results/peers.{md,json}.

Where the machine has >= 4 usable cores, servers and Locust get disjoint CPU sets (sched_setaffinity, inherited by
every process a server starts); with fewer they share the cores, and the table says so.

FastAPI, LitServe and the floor run from a separate venv (.venv-peers, `make bench-peers` creates it from the
`peers` extra plus the service's own onnxruntime/numpy/pillow pins), so that no peer's pins change how visionserve
itself runs. visionserve and the BentoML peer run from .venv, as shipped (with uvloop and httptools, which uvicorn,
and so BentoML, picks automatically). The table records which event loop and HTTP parser each server's interpreter
gives uvicorn.

    .venv/bin/python -m benchmarks.peers                          # make bench-peers: 3 rounds x 30 s x 5 servers
    .venv/bin/python -m benchmarks.peers --duration 15 --rounds 1 --label "short run, busy machine"
    .venv/bin/python -m benchmarks.peers --requirements           # the pins .venv-peers is made from
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from benchmarks.report import write_results

REPO = Path(__file__).resolve().parent.parent
PEERS_DIR = REPO / "benchmarks" / "peers"
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
MAIN_BIN = Path(sys.executable).parent
SERVICE_PINS = ("onnxruntime-gpu", "numpy", "pillow")  # what the peer apps import besides the peers extra
PEERS = ("visionserve", "fastapi", "fastapi-asyncio", "litserve", "bentoml-batchable", "http-floor")
REFERENCE = "fastapi"
DESCRIPTION = {
    "visionserve": "visionserve as shipped (`bentoml serve service.app:VisionService`, its own batcher)",
    "fastapi": "plain FastAPI + uvicorn + onnxruntime, unbatched",
    "fastapi-asyncio": "the same FastAPI app on uvicorn's asyncio loop and h11 parser",
    "litserve": "LitServe, batching (max_batch_size 64, batch_timeout 5 ms)",
    "bentoml-batchable": "BentoML `@bentoml.api(batchable=True)`, max_batch_size 64",
    "http-floor": "HTTP floor: Starlette reads the body, fixed JSON answer",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "cnn"), help="folder of model.onnx + card.json")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--duration", type=int, default=30, help="seconds of Locust load per server per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--workers", type=int, default=None,
                   help="workers of every server (default: usable cores, service.config.available_cores(), "
                        "less Locust's cores when pinned)")
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    p.add_argument("--peers-python", default=str(PEERS_PYTHON), help="interpreter of the FastAPI/LitServe/floor peers")
    p.add_argument("--label", default="", help="a note printed above the table (e.g. a short run)")
    p.add_argument("--seed", type=int, default=0, help="which test image is sent")
    p.add_argument("--sequential", type=int, default=1000,
                   help="requests of one sequential client per server per round, before the load (0: none)")
    p.add_argument("--requirements", action="store_true", help="print the pinned requirements of .venv-peers and exit")
    p.add_argument("--dry-run", action="store_true", help="measure but do not write results")
    return p.parse_args(argv)


def peer_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The `peers` extra plus the service's own pins of what the peer apps import, exactly as pyproject has them."""
    project = tomllib.loads(pyproject.read_text())["project"]
    service = [pin for pin in project["dependencies"]
               if pin.split("==")[0].split("[")[0].lower() in SERVICE_PINS]
    return project["optional-dependencies"]["peers"] + service


# --- CPU sets ---------------------------------------------------------------------------------------------

def cpu_sets(usable: list[int]) -> tuple[list[int], list[int], bool]:
    """(server CPUs, Locust CPUs, pinned): a quarter of the cores (at least one) for Locust from 4 cores up."""
    if len(usable) < 4:
        return usable, usable, False
    locust = max(1, len(usable) // 4)
    return usable[:-locust], usable[-locust:], True


@contextlib.contextmanager
def affinity(cpus: list[int]) -> Iterator[None]:
    """This process on `cpus` while a server starts: every process it spawns inherits the set."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- the servers --------------------------------------------------------------------------------------------

def start_peer(peer: str, args: argparse.Namespace, workers: int, model_dir: Path, workdir: Path,
               log_path: Path) -> tuple[subprocess.Popen, str]:
    """One server of the CNN on a free port; visionserve through the launcher every test and benchmark uses."""
    from loadtests.server import (folder_of, free_port, models_folder_environment, start_server, stop_process_group,
                                  wait_ready)

    if peer == "visionserve":
        cnn_only = folder_of([model_dir], workdir / "models")  # the CNN alone: no other model loads
        settings = {"VISIONSERVE_WORKERS": str(workers), "VISIONSERVE_THREADS": "1"}
        server = start_server(models_folder_environment(cnn_only, settings), log_path)
        return server.process, server.url
    port = free_port()
    env = {**os.environ, "PEER_MODEL": str(model_dir / "model.onnx"), "PEER_CARD": str(model_dir / "card.json"),
           "PEER_WORKERS": str(workers), "PEER_PORT": str(port), "BENTOML_DO_NOT_TRACK": "True",
           "OMP_NUM_THREADS": "1"}
    uvicorn = [args.peers_python, "-m", "uvicorn", "--app-dir", str(PEERS_DIR), "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    command, health = {
        "fastapi": (uvicorn + ["fastapi_app:app"], "/health"),
        "fastapi-asyncio": (uvicorn + ["--loop", "asyncio", "--http", "h11", "fastapi_app:app"], "/health"),
        "http-floor": (uvicorn + ["floor_app:app"], "/health"),
        "litserve": ([args.peers_python, str(PEERS_DIR / "litserve_app.py")], "/health"),
        "bentoml-batchable": ([str(MAIN_BIN / "bentoml"), "serve", "bentoml_batchable:PeerBatchable",
                               "--working-dir", str(PEERS_DIR), "--host", "127.0.0.1", "--port", str(port)],
                              "/readyz"),
    }[peer]
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, cwd=PEERS_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url + health, log_path, timeout_s=180)
    except RuntimeError:
        stop_process_group(process)
        raise
    return process, url


def first_answer(url: str, png: bytes) -> dict:
    """A few warm-up requests; the last answer, to check every peer classifies the image alike."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(20):
            response = client.post("/classify", files=[("images", ("x.png", png, "image/png"))])
        if response.status_code != 200:
            raise RuntimeError(f"{url}/classify answered {response.status_code}: {response.text[:500]}")
        return response.json()


def sequential_ms(url: str, png: bytes, requests: int) -> float:
    """Median ms of one client sending the PNG `requests` times, one after another, on one keep-alive connection:
    a request's latency with nothing else in flight."""
    import httpx

    files = [("images", ("x.png", png, "image/png"))]
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(requests):
            started = time.perf_counter()
            client.post("/classify", files=files).raise_for_status()
            times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 3)


def raw_model_ms(model_dir: Path, pixels, seconds: float = 2.0) -> float:
    """Median ms of onnxruntime's batch-1 run of the CNN (probabilities, one thread, the server's session settings),
    in this process: bench_serve's raw measurement."""
    from benchmarks.bench_serve import raw_onnxruntime

    return raw_onnxruntime(model_dir / "model.onnx", {"pixels": pixels}, "probabilities", 1, seconds)["p50_ms"]


def top_label(answer) -> str | None:
    """The top label in each peer's own answer shape."""
    if isinstance(answer, dict) and "predictions" in answer:
        answer = answer["predictions"]
    if isinstance(answer, list) and answer and isinstance(answer[0], dict):
        first = answer[0]
        return first["top_k"][0]["label"] if "top_k" in first else first.get("label")  # visionserve: top_k
    return None


def event_loop_and_parser(python: str) -> dict:
    """What uvicorn's `auto` loop and HTTP settings pick in that interpreter (uvloop / httptools if importable)."""
    probe = ("import importlib.util as u, json; print(json.dumps({'loop': 'uvloop' if u.find_spec('uvloop') "
             "else 'asyncio', 'http': 'httptools' if u.find_spec('httptools') else 'h11'}))")
    return json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout)


# --- report -------------------------------------------------------------------------------------------------

def medians(runs: list[dict]) -> dict:
    def median(key):
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    return {"req_per_s": median("req_per_s"), "p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"),
            "errors": median("errors"), "requests": sum(r["requests"] for r in runs), "rounds": len(runs),
            "sequential_ms": median("sequential_ms") if any("sequential_ms" in r for r in runs) else None}


def sequential_target(results: dict) -> dict | None:
    """Issue 22's single-client target: visionserve's sequential time against the HTTP floor's plus the raw model's
    (<= 1.5x), from medians of one run."""
    peers_ = results["peers"]
    if not {"visionserve", "http-floor"} <= set(peers_) or results.get("raw_model_ms") is None:
        return None
    served = peers_["visionserve"]["median"]["sequential_ms"]
    floor = peers_["http-floor"]["median"]["sequential_ms"]
    if served is None or floor is None:
        return None
    bound = floor + results["raw_model_ms"]
    return {"served_ms": served, "floor_ms": floor, "raw_model_ms": results["raw_model_ms"],
            "ratio": round(served / bound, 2), "target": 1.5}


def fmt(value, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown_report(results: dict) -> str:
    setup = results["setup"]
    pinning = (f"servers on CPUs {setup['server_cpus']}, Locust on CPUs {setup['locust_cpus']}" if setup["pinned"]
               else f"**not pinned**: only {len(setup['usable_cpus'])} usable cores, so the servers and Locust "
                    f"shared CPUs {setup['usable_cpus']} (Locust's own CPU is taken from every server alike)")
    lines = ["# visionserve against its peers: the released CNN, one PNG per request", ""]
    if results["label"]:
        lines += [f"**{results['label']}**", ""]
    lines += [
        f"Command: `{results['command']}` ({results['started']}, commit {results['machine']['commit']}).",
        f"Machine: {results['machine']['processor']}, {results['machine']['cpus']} CPUs; load average "
        f"{results['machine']['load_average_start']} at the start, {results['machine']['load_average_end']} at "
        f"the end.",
        f"Load: {setup['users']} closed-loop Locust users (FastHttpUser, one process), POST /classify with one "
        f"Fashion-MNIST test PNG ({setup['png_bytes']} bytes), {setup['duration_s']} s per server per round, "
        f"{setup['rounds']} round(s), servers interleaved round by round, one server at a time; {pinning}.",
        f"Every server: {setup['workers']} worker(s), 1 onnxruntime intra-op thread per worker. Medians over rounds; "
        f"ratio = median req/s against plain FastAPI's in the same run.", "",
        "| server | event loop / HTTP parser | req/s | p50 ms | p99 ms | errors | req/s vs FastAPI | "
        "1 client, ms | top label |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for peer, row in results["peers"].items():
        m = row["median"]
        lines.append(f"| {DESCRIPTION[peer]} | {row['loop']} / {row['http']} | {fmt(m['req_per_s'])} | "
                     f"{fmt(m['p50_ms'])} | {fmt(m['p99_ms'])} | {fmt(m['errors'])} | "
                     f"{fmt(row.get('ratio_to_fastapi'), 2)}x | {fmt(m.get('sequential_ms'), 2)} | "
                     f"{row['top_label'] or '(fixed answer)'} |")
    target = results.get("sequential_target")
    if target:
        lines += ["", f"One sequential client (\"1 client\": median of {setup.get('sequential', 'n')} requests per "
                  f"round on one keep-alive httpx connection, before the load): visionserve {target['served_ms']:.2f} "
                  f"ms against the HTTP floor's {target['floor_ms']:.2f} ms + the raw model's "
                  f"{target['raw_model_ms']:.3f} ms (onnxruntime, batch 1, one thread, in the benchmark's process) = "
                  f"**{target['ratio']:.2f}x** (target <= {target['target']}x)."]
    lines += ["", "Per round (req/s, p99 ms, errors):", ""]
    for peer, row in results["peers"].items():
        lines.append(f"- {peer}: " + "; ".join(f"{fmt(r['req_per_s'])} req/s, p99 {fmt(r['p99_ms'])}, "
                                               f"{r['errors']} errors" for r in row["runs"]))
    lines += ["", "FastAPI, LitServe and the floor run from `.venv-peers` (the `peers` extra: LitServe pulls "
              "uvicorn[standard], so uvloop and httptools); visionserve and the BentoML peer from `.venv`, as "
              "`make serve` ships them (the loop and parser column says what uvicorn picks there); "
              "`fastapi-asyncio` is the FastAPI app told "
              "`--loop asyncio --http h11`, to show what the loop and parser alone are worth. The peers answer the "
              "top label only; visionserve's answer also carries top-k, the auto-inversion flag and the OOD score, "
              "and fits any image to the card's spec (aspect-preserving resize, padding). "
              "Written by `python -m benchmarks.peers`.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    import numpy as np

    from benchmarks.bench_serve import locust_closed_loop
    from loadtests.machine import git_commit, load_average, processor_name
    from loadtests.payloads import fashion_test_images, png as png_bytes
    from loadtests.server import stop_process_group
    from service.config import available_cores

    model_dir = Path(args.model)
    usable = sorted(os.sched_getaffinity(0))[:available_cores()]
    server_cpus, locust_cpus, pinned = cpu_sets(usable)
    workers = args.workers or (len(server_cpus) if pinned else available_cores())
    workdir = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    image = fashion_test_images(1, args.seed)
    png = png_bytes(image[0])
    images_npy = workdir / "image.npy"  # the one image every Locust user sends
    np.save(images_npy, image)
    interpreters = {peer: str(MAIN_BIN / "python") if peer in ("visionserve", "bentoml-batchable")
                    else args.peers_python for peer in args.peers}
    rows = {peer: {"runs": [], "top_label": None, **event_loop_and_parser(interpreters[peer]),
                   "python": interpreters[peer]} for peer in args.peers}
    if "fastapi-asyncio" in rows:  # told on its command line, whatever the venv holds
        rows["fastapi-asyncio"].update(loop="asyncio", http="h11")
    results = {"command": shlex.join(["python", "-m", "benchmarks.peers", *sys.argv[1:]]), "label": args.label,
               "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": {"processor": processor_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_average_start": load_average(), "commit": git_commit()},
               "setup": {"users": args.users, "duration_s": args.duration, "rounds": args.rounds, "workers": workers,
                         "usable_cpus": usable, "server_cpus": server_cpus, "locust_cpus": locust_cpus,
                         "pinned": pinned, "png_bytes": len(png), "model": str(model_dir),
                         "sequential": args.sequential},
               "peers": rows, "raw_model_ms_runs": []}
    for round_index in range(args.rounds):
        if args.sequential:
            results["raw_model_ms_runs"].append(raw_model_ms(model_dir, image[:, None]))
        for peer in args.peers:
            log_path = workdir / f"{peer}-{round_index}.log"
            with affinity(server_cpus):
                process, url = start_peer(peer, args, workers, model_dir, workdir, log_path)
            try:
                answer = first_answer(url, png)
                rows[peer]["top_label"] = None if peer == "http-floor" else top_label(answer)
                sequential = sequential_ms(url, png, args.sequential) if args.sequential else None
                run = locust_closed_loop(url, args.users, args.duration, images_npy,
                                         workdir / f"{peer}-{round_index}", locust_cpus)
                run["sequential_ms"] = sequential
            finally:
                stop_process_group(process)
            rows[peer]["runs"].append(run)
            print(f"round {round_index + 1} {peer}: {run}", flush=True)
    for row in rows.values():
        row["median"] = medians(row["runs"])
    results["raw_model_ms"] = (statistics.median(results["raw_model_ms_runs"]) if results["raw_model_ms_runs"]
                               else None)
    results["sequential_target"] = sequential_target(results)
    if REFERENCE in rows and rows[REFERENCE]["median"]["req_per_s"]:
        for row in rows.values():
            row["ratio_to_fastapi"] = round(row["median"]["req_per_s"] / rows[REFERENCE]["median"]["req_per_s"], 3)
    results["machine"]["load_average_end"] = load_average()
    write_results(args.out, "peers", results, markdown_report(results), args.dry_run)
    return results


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.requirements:
        print("\n".join(peer_requirements()))
    else:
        main(arguments)
