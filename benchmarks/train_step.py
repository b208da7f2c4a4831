"""Training-step speed of each released architecture, NCHW against channels_last, on this machine.

    python -m benchmarks.train_step --out benchmarks/results            # or: make bench-train

One step is what the training loops do per batch: forward, cross-entropy, backward, optimiser step, on
random data of the release recipe's batch shape. Both memory formats are measured in one run, alternating,
so the ratio holds on a shared machine even when the absolute times do not. Writes train_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training.models import build_classifier, build_segmenter
from training.common import hardware_description

# (name, builder, input shape, number of classes, target shape): the release recipes' batch shapes.
CASES = {
    "cnn": (lambda: build_classifier("cnn", init="default", in_shape=(1, 28, 28), num_classes=10, activation="relu",
                                     hidden=[128], dropout=0.0, depth=20, width=1.0)[0], (128, 1, 28, 28), 10, (128,)),
    "resnet-20 (width 1)": (lambda: build_classifier("resnet", init="kaiming-normal", in_shape=(1, 28, 28),
                                                     num_classes=10, activation="relu", hidden=[128], dropout=0.0,
                                                     depth=20, width=1.0)[0], (128, 1, 28, 28), 10, (128,)),
    "segnet (release widths)": (lambda: build_segmenter("segnet", init="kaiming-normal", num_classes=11,
                                                        widths=[16, 32, 64, 128], convs_per_stage=2)[0],
                                (64, 1, 64, 64), 11, (64, 64, 64)),
}


def step_times(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(steps + 2):  # two warm-up steps: first-call allocations and kernel selection
        started = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return times


def measure(name: str, steps: int, rounds: int) -> dict:
    build, shape, classes, target = CASES[name]
    torch.manual_seed(0)
    x, y = torch.randn(shape), torch.randint(0, classes, target)
    models = {"nchw": build(), "channels_last": build().to(memory_format=torch.channels_last)}
    inputs = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    times = {fmt: [] for fmt in models}
    for _ in range(rounds):  # alternate, so that a busy moment of the machine hits both formats
        for fmt in models:
            times[fmt] += step_times(models[fmt], inputs[fmt], y, steps)
    medians = {fmt: statistics.median(t) for fmt, t in times.items()}
    return {"model": name, "batch": list(shape), "steps_per_format": len(times["nchw"]),
            "median_step_s": medians, "channels_last_speedup": medians["nchw"] / medians["channels_last"]}


def markdown(results: list[dict], hardware: str) -> str:
    lines = [f"Measured by `python -m benchmarks.train_step` on {hardware}: median seconds per training step "
             "(forward, loss, backward, SGD step), fp32, both formats alternating in one run.", "",
             "| model | batch | NCHW | channels_last | speed-up |", "|---|---|---:|---:|---:|"]
    for r in results:
        m = r["median_step_s"]
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['batch']))} | {m['nchw']:.3f} s | "
                     f"{m['channels_last']:.3f} s | {r['channels_last_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--steps", type=int, default=5, help="timed steps per format per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    hardware = hardware_description(torch.device("cpu"))
    results = []
    for name in args.models:
        results.append(measure(name, args.steps, args.rounds))
        print(f"{name}: {results[-1]['median_step_s']} ({results[-1]['channels_last_speedup']:.2f}x)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps({"hardware": hardware, "torch": torch.__version__,
                                                     "python": platform.python_version(), "results": results},
                                                    indent=2) + "\n")
    table = markdown(results, hardware)
    (out / "train_step.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main(parse_args())
