"""Raw onnxruntime in-process vs the same models served over HTTP, in one run.

For every model in models/: median latency and img/s of raw `session.run`, then of the same work served,
from one sequential client. Classifiers: batch 1 and 64 raw; 1-image and 64-image PNG multipart requests,
64-image .npy tensor requests and 64-image Open Inference Protocol (V2) requests, binary and JSON, served. Segmenters: one 64x64 test scene raw, and as a PNG to `/segment`
(`format=mask`). Generators: 1 and 16 samples raw, and `/generate` with n=1 and n=16 (`format=grid`). Then 32 concurrent single-image Locust clients against several server configurations
(batched / unbatched, 1 / 2 workers), the chosen one for the full --concurrent-seconds.

Writes benchmarks/results/serve.json and serve.md. A benchmark, not a test: it asserts nothing, it reports
the targets (64-image CNN >= 80% of raw; 32 clients: 0 errors, p99 <= 100 ms) as met or missed.

    .venv/bin/python -m benchmarks.bench_serve --out benchmarks/results          # make bench-serve
    .venv/bin/python -m benchmarks.bench_serve --seconds 2 --concurrent-seconds 10 --dry-run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from benchmarks.report import argument_parser, write_results
from loadtests.payloads import fashion_test_images, png
from loadtests.payloads import npy as npy_body
from loadtests.server import models_folder_environment, running_server

REPO = Path(__file__).resolve().parent.parent
BOUNDARY = "benchboundary7f3a"

# (label, environment) of the server configurations compared at 32 concurrent clients. The first is the
# default the service ships with and gets every measurement; the others only the concurrency run.
# The sequential cells' server: one worker with every core's intra-op threads, as raw onnxruntime runs here (the
# shipped default is one worker per core: the last configuration below on 2 cores).
SHIPPED = {"VISIONSERVE_BATCHING": "on", "VISIONSERVE_WORKERS": "1"}
SERVER_CONFIGS = [
    ("batched, 1 worker x 2 threads (the sequential cells' server)", SHIPPED),
    ("same, access log on (BentoML's default)", {**SHIPPED, "VISIONSERVE_ACCESS_LOG": "on"}),
    ("same, GC tuning off", {**SHIPPED, "VISIONSERVE_GC_TUNING": "off"}),
    ("same, onnxruntime spinning on (its default)", {**SHIPPED, "VISIONSERVE_ORT_SPINNING": "on"}),
    ("unbatched, 1 worker x 2 threads", {**SHIPPED, "VISIONSERVE_BATCHING": "off"}),
    ("unbatched, 2 workers x 1 thread", {**SHIPPED, "VISIONSERVE_BATCHING": "off", "VISIONSERVE_WORKERS": "2"}),
    ("batched, 2 workers x 1 thread (shipped default on 2 cores)", {**SHIPPED, "VISIONSERVE_WORKERS": "2"}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="per sequential measurement")
    p.add_argument("--concurrent-seconds", type=int, default=60, help="32-client run of the shipped config")
    p.add_argument("--compare-seconds", type=int, default=20, help="32-client runs of the other configs (0: none)")
    p.add_argument("--only", nargs="+", metavar="MODEL", help="measure these models of --models only")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="measure but do not write results")
    return p.parse_args(argv)


# --- inputs -------------------------------------------------------------------------------------------

def multipart_body(pngs: list[bytes], model: str, field: str = "images", extra_fields: dict | None = None) -> bytes:
    """Built once per measurement so that the client's time goes to sending, not encoding."""
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n".encode()]
    for key, value in (extra_fields or {}).items():
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n".encode())
    for data in pngs:
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.png\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


# --- measurements -------------------------------------------------------------------------------------

def v2_body(images: np.ndarray, binary: bool) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol infer request for `probabilities` (the work /classify/tensor does): the binary
    tensor extension (JSON header, then the raw uint8 pixels, binary output) or all of it in JSON."""
    tensor = {"name": "pixels", "shape": list(images[:, None].shape), "datatype": "UINT8"}
    output = {"name": "probabilities", "parameters": {"binary_data": binary}}
    if not binary:
        return json.dumps({"inputs": [{**tensor, "data": images.ravel().tolist()}], "outputs": [output]}).encode(), {}
    raw = np.ascontiguousarray(images).tobytes()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [output]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def summarise(latencies_s: list[float], images_per_call: int) -> dict:
    latencies = np.array(latencies_s)
    median = float(np.median(latencies))
    return {"calls": len(latencies), "images_per_call": images_per_call,
            "p50_ms": round(median * 1e3, 3), "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 3),
            "img_per_s_at_median": round(images_per_call / median, 1)}


SERVED_OUTPUT = {"classification": "probabilities", "segmentation": "mask", "generation": "pixels"}


def raw_onnxruntime(model_path: Path, feed: dict[str, np.ndarray], output: str, threads: int, seconds: float) -> dict:
    """Median latency of session.run on `feed` (its first axis is the items per call), as the server asks it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # The server's own session settings (service/onnx_models.py), so the ratio measures serving, not a different
    # thread policy: with spinning on, raw calls measured several times slower while other processes ran.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run([output], feed)
    latencies, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 20:
        start = time.perf_counter()
        session.run([output], feed)
        latencies.append(time.perf_counter() - start)
    return summarise(latencies, len(next(iter(feed.values()))))


def scene(images: np.ndarray) -> np.ndarray:
    """A 64x64 light-on-dark scene of two test items, like the segmenter's test scenes (uint8 [64, 64])."""
    canvas = np.zeros((64, 64), np.uint8)
    canvas[4:32, 4:32] = images[0]
    canvas[30:58, 32:60] = np.maximum(canvas[30:58, 32:60], images[1])
    return canvas


def raw_cells(task: str, model_path: Path, images: np.ndarray, threads: int, seconds: float) -> dict:
    """Raw onnxruntime per items-per-call: what the served cells of the same task are compared with."""
    output = SERVED_OUTPUT[task]
    if task == "segmentation":
        feeds = {1: {"pixels": scene(images)[None, None]}}
    elif task == "generation":
        rng = np.random.default_rng(0)
        feeds = {n: {"z": rng.standard_normal((n, 100)).astype(np.float32), "label": np.zeros(n, np.int64)}
                 for n in (1, 16)}
    else:
        feeds = {n: {"pixels": np.ascontiguousarray(images[:n, None])} for n in (1, 64)}
    return {str(n): raw_onnxruntime(model_path, feed, output, threads, seconds) for n, feed in feeds.items()}


def served_sequential(client: httpx.Client, path: str, body: bytes, content_type: str, images_per_call: int,
                      seconds: float, extra_headers: dict[str, str] | None = None) -> dict:
    headers = {"Content-Type": content_type, **(extra_headers or {})}
    for _ in range(5):
        client.post(path, content=body, headers=headers).raise_for_status()
    latencies, errors, deadline = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 20:
        start = time.perf_counter()
        response = client.post(path, content=body, headers=headers)
        latencies.append(time.perf_counter() - start)
        errors += response.status_code != 200
    return {**summarise(latencies, images_per_call), "errors": errors}


def locust_closed_loop(url: str, users: int, seconds: int, images_npy: Path, prefix: Path,
                       cpus: list[int] | None = None) -> dict:
    """`users` closed-loop single-image clients (loadtests/locust_single_image.py) for `seconds`, on `cpus` when
    given; Locust's aggregated figures. Its CSVs go to <prefix>_*.csv."""
    command = [str(Path(sys.executable).parent / "locust"), "-f", str(REPO / "loadtests" / "locust_single_image.py"),
               "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "-H", url,
               "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "5"]
    subprocess.run(command, cwd=REPO, env={**os.environ, "BENCH_IMAGES_NPY": str(images_npy)}, capture_output=True,
                   timeout=seconds + 120, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    with open(f"{prefix}_stats.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    requests, failures = int(row["Request Count"]), int(row["Failure Count"])

    def number(value: str) -> float | None:  # Locust writes N/A when a run got no answer at all
        return None if value in ("", "N/A") else float(value)

    return {"users": users, "seconds": seconds, "requests": requests, "errors": failures,
            "req_per_s": round(number(row["Requests/s"]) or 0.0, 1), "p50_ms": number(row["50%"]),
            "p99_ms": number(row["99%"])}


def served_cells(client: httpx.Client, task: str, name: str, images: np.ndarray, pngs: list[bytes],
                 seconds: float) -> dict:
    multipart = f"multipart/form-data; boundary={BOUNDARY}"
    if task == "segmentation":
        body = multipart_body([png(scene(images))], name, field="image", extra_fields={"format": "mask"})
        return {"1 scene png, mask": served_sequential(client, "/segment", body, multipart, 1, seconds)}
    if task == "generation":
        return {f"n={n}, grid png": served_sequential(
            client, "/generate", json.dumps({"n": n, "seed": 0, "class": 0, "format": "grid", "model": name}).encode(),
            "application/json", n, seconds) for n in (1, 16)}
    return {
        "1 png": served_sequential(client, "/classify", multipart_body(pngs[:1], name), multipart, 1, seconds),
        "64 png": served_sequential(client, "/classify", multipart_body(pngs, name), multipart, 64, seconds),
        "64 tensor": served_sequential(client, f"/classify/tensor?model={name}", npy_body(images),
                                       "application/octet-stream", 64, seconds),
        # The same work as raw onnxruntime's: no OOD score (a matrix product over 10,000 training embeddings per
        # image, about as much as the CNN itself), which the row above includes.
        "64 tensor, ood=false": served_sequential(client, f"/classify/tensor?model={name}&ood=false",
                                                  npy_body(images), "application/octet-stream", 64, seconds),
        # The Open Inference Protocol (service/v2.py), asked for the probabilities only, as /classify/tensor gives.
        **{f"64 v2 {kind}": served_sequential(client, f"/v2/models/{name}/infer", body, content_type, 64, seconds,
                                              headers)
           for kind, content_type, (body, headers) in (
               ("binary", "application/octet-stream", v2_body(images, binary=True)),
               ("json", "application/json", v2_body(images, binary=False)))},
    }


# --- report -------------------------------------------------------------------------------------------

def markdown_report(results: dict) -> str:
    lines = ["# Serving benchmark: raw onnxruntime vs served", "",
             f"{results['machine']['cpus']} CPUs ({results['machine']['processor']}), load average at start "
             f"{results['machine']['load_average_start']}, at end {results['machine']['load_average_end']}; "
             f"onnxruntime {results['machine']['onnxruntime']}, provider {results['machine']['provider']}. "
             f"Command: `{results['command']}`. Medians over {results['seconds']} s per cell; "
             "ratios are served items/s (images, scenes or samples) at the median latency over raw items/s at the "
             "same items per call.", "",
             "| model | request | raw p50 ms | raw items/s | served p50 ms | served p99 ms | served items/s | served / raw |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, cells in results["served"].items():
        for request, cell in cells.items():
            raw = results["raw"][name][str(cell["images_per_call"])]
            lines.append(f"| {name} | {request} | {raw['p50_ms']} | {raw['img_per_s_at_median']} | {cell['p50_ms']} | "
                         f"{cell['p99_ms']} | {cell['img_per_s_at_median']} | {cell['ratio_to_raw']:.2f} |")
    lines += ["", f"32 concurrent single-image PNG clients (Locust, closed loop), default model "
              f"`{results['default_model']}`:", "",
              "| server configuration | seconds | requests | errors | req/s | p50 ms | p99 ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for run in results["concurrency"]:
        lines.append(f"| {run['config']} | {run['seconds']} | {run['requests']} | {run['errors']} | {run['req_per_s']} "
                     f"| {run['p50_ms']} | {run['p99_ms']} |")
    lines += ["", "Targets:", ""]
    for target, verdict in results["targets"].items():
        lines.append(f"- {target}: {verdict}")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    models_dir = Path(args.models)
    cards = {path.parent.name: json.loads((path.parent / "card.json").read_text())
             for path in sorted(models_dir.glob("*/model.onnx"))}
    # The tasks this benchmark has requests for (SERVED_OUTPUT); the autoencoder's /reconstruct is not measured here.
    names = [name for name, card in cards.items() if card["task"] in SERVED_OUTPUT and name in (args.only or cards)]
    threads = len(os.sched_getaffinity(0))
    images = fashion_test_images(64, args.seed)
    load_start = os.getloadavg()

    raw = {}
    for name in names:
        raw[name] = raw_cells(cards[name]["task"], models_dir / name / "model.onnx", images, threads, args.seconds)
        print(name, "raw", raw[name], flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    images_npy = workdir / "images.npy"
    np.save(images_npy, images)
    pngs = [png(image) for image in images]
    served, concurrency, provider, default_model, batch_sizes = {}, [], None, None, {}
    for index, (label, env) in enumerate(SERVER_CONFIGS if args.compare_seconds else SERVER_CONFIGS[:1]):
        with running_server(models_folder_environment(models_dir, env), workdir / f"server-{index}.log") as server:
            url = server.url
            described = httpx.get(url + "/models", timeout=10).json()
            default_model = described["default"]["classification"]
            if index == 0:
                provider = sorted({m["provider"] for m in described["models"] if m["provider"]})
                with httpx.Client(base_url=url, timeout=120) as client:
                    for name in names:
                        cells = served_cells(client, cards[name]["task"], name, images, pngs, args.seconds)
                        for cell in cells.values():
                            cell["ratio_to_raw"] = round(cell["img_per_s_at_median"]
                                                         / raw[name][str(cell["images_per_call"])]["img_per_s_at_median"], 3)
                        served[name] = cells
                        print(name, "served", cells, flush=True)
            seconds = args.concurrent_seconds if index == 0 else args.compare_seconds
            run = {"config": label, "env": env,
                   **locust_closed_loop(url, args.users, seconds, images_npy, workdir / "locust")}
            batch_sizes[label] = httpx.get(url + "/models", timeout=10).json()["serving"]["batch_sizes_seen"]
            concurrency.append(run)
            print(run, flush=True)

    shipped = concurrency[0]
    targets = {}
    if "cnn" in served:
        ratio = served["cnn"]["64 png"]["ratio_to_raw"]
        tensor_ratio = served["cnn"]["64 tensor"]["ratio_to_raw"]
        bare_ratio = served["cnn"]["64 tensor, ood=false"]["ratio_to_raw"]
        targets["CNN 64-image .npy requests >= 90% of raw onnxruntime img/s (issue 22)"] = (
            f"{bare_ratio:.0%} with ood=false, the raw call's work ({'met' if bare_ratio >= 0.9 else 'missed'}); "
            f"{tensor_ratio:.0%} with the OOD score (the default)")
        targets["CNN 64-image PNG requests >= 50% of raw onnxruntime img/s (issue 22)"] = (
            f"{ratio:.0%} ({'met' if ratio >= 0.5 else 'missed'}, the OOD score included)")
        v2_ratio = served["cnn"]["64 v2 binary"]["ratio_to_raw"]
        targets["CNN 64-image V2 binary requests >= 0.9x the /classify/tensor row"] = (
            f"{v2_ratio / tensor_ratio:.2f}x ({'met' if v2_ratio >= 0.9 * tensor_ratio else 'missed'}); "
            f"V2 JSON {served['cnn']['64 v2 json']['ratio_to_raw'] / tensor_ratio:.2f}x")
    else:
        targets["CNN 64-image requests against raw onnxruntime img/s"] = "no cnn model measured in this run"
    targets["32 concurrent 1-image clients: 0 errors, p99 <= 100 ms"] = (
        f"{shipped['errors']} errors, p99 {shipped['p99_ms']} ms over {shipped['seconds']} s "
        f"({'met' if shipped['errors'] == 0 and (shipped['p99_ms'] or 1e9) <= 100 else 'missed'})")
    results = {
        "command": "python -m benchmarks.bench_serve " + " ".join(sys.argv[1:]),
        "machine": {"cpus": threads, "processor": platform.processor() or platform.machine(),
                    "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()],
                    "onnxruntime": ort.__version__, "provider": provider},
        "seconds": args.seconds, "models": {name: cards[name].get("version") for name in names},
        "default_model": default_model, "raw": raw, "served": served, "concurrency": concurrency,
        "batch_sizes_seen_after_concurrency": batch_sizes, "targets": targets,
    }
    write_results(args.out, "serve", results, markdown_report(results), args.dry_run)
    return results


if __name__ == "__main__":
    main(parse_args())
