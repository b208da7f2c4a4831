"""Raw onnxruntime cost per image of every released classifier, beside its test accuracy, in one run.

    .venv/bin/python -m benchmarks.classifier_cost --out benchmarks/results          # make bench-classifiers

For each models/<name>/ with a classification card: the median time of `session.run` on Fashion-MNIST test
images at batch 1 and batch 64 (rounds interleaved across models, so that a busy moment of a shared machine
falls on all of them alike), the cost relative to the cheapest and to the `resnet` ensemble, and the card's
test accuracy per millisecond. Writes classifier_cost.json and classifier_cost.md. A benchmark, not a test:
it asserts nothing. One intra-op thread and one inter-op thread per session, as one served worker of the
shipped configuration runs a model on 2 cores beside its HTTP front.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.report import argument_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds; each times every model once per batch")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    return p.parse_args(argv)


def session_for(model_path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def time_once(session: ort.InferenceSession, pixels: np.ndarray) -> float:
    start = time.perf_counter()
    session.run(["probabilities"], {"pixels": pixels})
    return time.perf_counter() - start


def measure(sessions: dict[str, ort.InferenceSession], images: np.ndarray, rounds: int) -> dict[str, dict]:
    batches = {1: images[:1], 64: images[:64]}
    for session in sessions.values():  # warm-up: first runs allocate
        for pixels in batches.values():
            session.run(["probabilities"], {"pixels": pixels})
    times = {name: {size: [] for size in batches} for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for size, pixels in batches.items():
                times[name][size].append(time_once(session, pixels))
    return {name: {f"batch_{size}_ms_per_image": 1000 * float(np.median(t)) / size for size, t in by_size.items()}
            for name, by_size in times.items()}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Measured by `python -m benchmarks.classifier_cost` on {meta['cpu']} ({meta['cpu_count']} cores), "
             f"onnxruntime {meta['onnxruntime']}, {meta['threads']} intra-op thread(s), median of {meta['rounds']} "
             "interleaved rounds; accuracy from each card (onnxruntime, 10,000 test images).", "",
             "| model | test accuracy | ms / image, batch 1 | ms / image, batch 64 | cost vs resnet (batch 64) | "
             "test accuracy per ms (batch 1) |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        vs = f"{r['cost_vs_resnet']:.3f}x" if r["cost_vs_resnet"] is not None else "-"
        lines.append(f"| {r['name']} | {r['accuracy']:.2%} | {r['batch_1_ms_per_image']:.3f} | "
                     f"{r['batch_64_ms_per_image']:.3f} | {vs} | {r['accuracy_per_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> list[dict]:
    from training.data import load_dataset  # the test images, read the way the evaluators read them

    cards = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(args.models).glob("*/card.json"))}
    classifiers = {name: card for name, card in cards.items() if card.get("task") == "classification"}
    sessions = {name: session_for(Path(args.models) / name / "model.onnx", args.threads) for name in classifiers}
    images = np.ascontiguousarray(load_dataset("fashion-mnist", "test").images.numpy()[:64])
    timings = measure(sessions, images, args.rounds)
    reference = timings.get("resnet", {}).get("batch_64_ms_per_image")
    results = []
    for name, card in classifiers.items():
        t = timings[name]
        accuracy = card["metrics"]["accuracy"]
        results.append({"name": name, "version": card.get("version"), "accuracy": accuracy,
                        "parameters": card["architecture"]["parameters"],
                        "test_time_augmentation": card["input"].get("test_time_augmentation"), **t,
                        "cost_vs_resnet": t["batch_64_ms_per_image"] / reference if reference else None,
                        "accuracy_per_ms": accuracy / t["batch_1_ms_per_image"]})
    meta = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
            "rounds": args.rounds, "onnxruntime": ort.__version__}
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classifier_cost.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, meta)
    (out / "classifier_cost.md").write_text(table)
    print(table, end="")
    return results


if __name__ == "__main__":
    main(parse_args())
