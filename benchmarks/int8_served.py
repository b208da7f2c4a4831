"""The INT8 variants served against their FP32 sources: img/s over HTTP, in one run, for the served ratio on the
INT8 cards (`make int8` measures the raw ratio; issue 22 asks for both).

One server (one worker, every core's intra-op threads, as the raw ratio's onnxruntime runs) holds each released
INT8 model and its source. One sequential client alternates between the two, request by request: 64-image .npy
requests and single PNGs to /classify, with ood=false (an INT8 variant has no OOD statistics of its own, so both
sides do the same work). The ratio is INT8 img/s over FP32 img/s at the median latency. With --write-cards the
figures go into each INT8 card's `quantization.served` (re-run this after `make int8`, which rewrites the cards).

    .venv/bin/python -m benchmarks.int8_served --write-cards        # the last step of make int8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from benchmarks.report import argument_parser, write_results
from loadtests.machine import git_commit, load_average, processor_name
from loadtests.payloads import fashion_test_images, npy, png
from loadtests.server import folder_of, models_folder_environment, running_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--requests", type=int, default=400, help="requests per model per request kind (after warm-up)")
    p.add_argument("--write-cards", action="store_true", help="write the figures into the INT8 cards")
    p.add_argument("--dry-run", action="store_true", help="measure but do not write results")
    return p.parse_args(argv)


def int8_pairs(models: Path) -> list[tuple[str, str]]:
    """(source, int8 variant) of every released INT8 card whose source is released too."""
    pairs = []
    for card_path in sorted(models.glob("*/card.json")):
        card = json.loads(card_path.read_text())
        source = card.get("quantization", {}).get("from", {}).get("model")
        if source and (models / source / "model.onnx").is_file():
            pairs.append((source, card["name"]))
    return pairs


def alternating_ms(client: httpx.Client, requests: dict[str, dict], count: int) -> dict[str, float]:
    """Median ms of each named request, sent in turn (A, B, A, B, ...) so that both see the same machine."""
    times: dict[str, list[float]] = {name: [] for name in requests}
    for index in range(count + 20):
        for name, request in requests.items():
            started = time.perf_counter()
            client.post(**request).raise_for_status()
            if index >= 20:  # warm-up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def measure_pair(client: httpx.Client, source: str, int8: str, count: int) -> dict:
    images = fashion_test_images(64, 0)
    body, image = npy(images), png(images[0])
    cells = {}
    for kind, images_per_call, request_of in (
            ("64 tensor", 64, lambda name: {"url": "/classify/tensor", "params": {"model": name, "ood": "false"},
                                            "content": body}),
            ("1 png", 1, lambda name: {"url": "/classify", "data": {"model": name, "ood": "false"},
                                       "files": [("images", ("image.png", image, "image/png"))]})):
        ms = alternating_ms(client, {source: request_of(source), int8: request_of(int8)}, count)
        cells[kind] = {"fp32_ms": round(ms[source], 3), "int8_ms": round(ms[int8], 3),
                       "images_per_call": images_per_call,
                       "fp32_img_per_s": round(images_per_call / ms[source] * 1e3, 1),
                       "int8_img_per_s": round(images_per_call / ms[int8] * 1e3, 1),
                       "served_speedup": round(ms[source] / ms[int8], 3)}
    return cells


def markdown_report(results: dict) -> str:
    lines = ["# INT8 variants served against their FP32 sources", "",
             f"Command: `{results['command']}` ({results['started']}, commit {results['commit']}). Machine: "
             f"{results['processor']}; load average {results['load_average_start']} at the start. One server, one "
             f"worker; one sequential client alternating between the two models request by request, "
             f"{results['requests']} requests each per cell, ood=false on both; medians.", "",
             "| model | request | FP32 ms | INT8 ms | FP32 img/s | INT8 img/s | served INT8/FP32 | raw INT8/FP32 "
             "(make int8) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for pair in results["pairs"]:
        for kind, cell in pair["cells"].items():
            raw = pair["raw_speedup"].get(kind)
            lines.append(f"| {pair['int8']} | {kind} | {cell['fp32_ms']:.3f} | {cell['int8_ms']:.3f} | "
                         f"{cell['fp32_img_per_s']:,.0f} | {cell['int8_img_per_s']:,.0f} | "
                         f"{cell['served_speedup']:.2f}x | {f'{raw:.2f}x' if raw else 'n/a'} |")
    lines += ["", "Served, the fixed cost of a request (HTTP, parsing, the answer) is the same for both models, so a "
              "faster graph shows less of its gain than in raw onnxruntime, most of all for single images.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    models = Path(args.models)
    pairs = int8_pairs(models)
    if not pairs:
        raise SystemExit(f"no INT8 variant with its source in {models}")
    served = folder_of([models / name for name in sorted({name for pair in pairs for name in pair})],
                       Path(tempfile.mkdtemp(prefix="int8-served-")) / "models")
    results = {"command": "python -m benchmarks.int8_served " + " ".join(sys.argv[1:]),
               "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
               "processor": processor_name(), "load_average_start": load_average(), "requests": args.requests,
               "pairs": []}
    env = models_folder_environment(served, {"VISIONSERVE_WORKERS": "1"})
    with running_server(env, served.parent / "server.log") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for source, int8 in pairs:
            quantization = json.loads((models / int8 / "card.json").read_text())["quantization"]
            cells = measure_pair(client, source, int8, args.requests)
            results["pairs"].append({"source": source, "int8": int8, "cells": cells,
                                     "raw_speedup": {"64 tensor": quantization.get("speedup_batch_64"),
                                                     "1 png": quantization.get("speedup_batch_1")}})
            print(int8, cells, flush=True)
    write_results(args.out, "int8_served", results, markdown_report(results), args.dry_run)
    if args.write_cards and not args.dry_run:
        for pair in results["pairs"]:
            card_path = models / pair["int8"] / "card.json"
            card = json.loads(card_path.read_text())
            card["quantization"]["served"] = {
                "speedup_batch_64": pair["cells"]["64 tensor"]["served_speedup"],
                "speedup_batch_1": pair["cells"]["1 png"]["served_speedup"],
                "measured_by": "python -m benchmarks.int8_served: one server, a sequential client alternating "
                               "between this model and its source, 64-image .npy and single-PNG /classify requests, "
                               "ood=false, img/s at the median latency",
                "measured_at": results["started"],
            }
            card_path.write_text(json.dumps(card, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(parse_args())
