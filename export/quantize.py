"""INT8 variants of released classifiers: static QDQ quantization calibrated on training images, measured, and
released only when the measurement says yes.

    python -m export.quantize --model cnn resnet-student            # measure; release what passes
    python -m export.quantize --model cnn --dry-run                 # measure only

For each model: onnxruntime.quantization's pre-processing (shape inference, graph optimisation), then
`quantize_static` in QDQ format (uint8 activations, int8 per-channel weights) calibrated on `--calibration`
seeded training-split images (any of the 60,000; no test image: the test split is only for the report).
Then, in one run, on the same CPU: accuracy of the fp32 and int8 graphs over the whole test split, and raw
onnxruntime ms per image at batch 1 and 64, the two graphs alternating round by round (median of `--rounds`).

The release rule is the issue's (22): a variant ships as `<model>-int8` only if it loses at most `--max-delta`
points of test accuracy and runs at least `--min-speedup` times as many images per second at batch 64; else
nothing is written to models/ and the reason is in the results. benchmarks/results/int8.{md,json} hold every
figure either way.

Measured here (AMD EPYC, AVX2 without VNNI): without `reduce_range` the CNN lost 4.6 points — onnxruntime's
AVX2 u8s8 kernels (VPMADDUBSW) saturate int16 sums of products of full-range weights; 7-bit weights
(`reduce_range=True`) fix it (delta 0.07 points), so they are the default here.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from training.data import load_dataset

from .onnx_io import export_command, runtime_versions, sha256_bytes, with_command, write_model
from .release import classifier_targets, release_block

REPO = Path(__file__).resolve().parent.parent


class TrainingImages(CalibrationDataReader):
    """Batches of `count` training-split images picked by `seed` (calibration never sees a test image)."""

    def __init__(self, images: np.ndarray, count: int, seed: int, batch: int = 64) -> None:
        chosen = np.sort(np.random.default_rng(seed).choice(len(images), count, replace=False))
        self._batches = [{"pixels": images[chosen[i:i + batch]]} for i in range(0, count, batch)]
        self._next = 0

    def get_next(self) -> dict | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return self._batches[self._next - 1]


def quantize(source: Path, calibration: TrainingImages, reduce_range: bool) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_static(str(prepared), str(quantized), calibration, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=reduce_range, calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": 99.99})
        return quantized.read_bytes()


def session(model: bytes | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def predictions(sess: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    return np.concatenate([sess.run(["probabilities"], {"pixels": images[i:i + 500]})[0].argmax(1)
                           for i in range(0, len(images), 500)])


def ms_per_image(sessions: dict[str, ort.InferenceSession], images: np.ndarray, batch: int, rounds: int) -> dict:
    """Median ms per image of each session, alternating them round by round so load on the machine falls on both."""
    x = images[:batch]
    calls = max(1, 256 // batch)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():
        sess.run(["probabilities"], {"pixels": x})  # warm-up
    for _ in range(rounds):
        for name, sess in sessions.items():
            start = time.perf_counter()
            for _ in range(calls):
                sess.run(["probabilities"], {"pixels": x})
            times[name].append((time.perf_counter() - start) * 1e3 / (calls * batch))
    return {name: float(np.median(values)) for name, values in times.items()}


def measure(name: str, args: argparse.Namespace, train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> dict:
    folder = args.models / name
    card = json.loads((folder / "card.json").read_text())
    started = time.time()
    int8 = quantize(folder / "model.onnx", TrainingImages(train, args.calibration, args.seed), args.reduce_range)
    quantize_s = time.time() - started
    fp32_session, int8_session = session(str(folder / "model.onnx"), args.threads), session(int8, args.threads)
    fp32_pred, int8_pred = predictions(fp32_session, test), predictions(int8_session, test)
    fp32_acc, int8_acc = float((fp32_pred == labels).mean()), float((int8_pred == labels).mean())
    speed = {f"batch_{b}": ms_per_image({"fp32": fp32_session, "int8": int8_session}, test, b, args.rounds)
             for b in (1, 64)}
    delta_points = (fp32_acc - int8_acc) * 100
    speedup = speed["batch_64"]["fp32"] / speed["batch_64"]["int8"]
    reasons = []
    if delta_points > args.max_delta:
        reasons.append(f"loses {delta_points:.2f} points of test accuracy (at most {args.max_delta})")
    if speedup < args.min_speedup:
        reasons.append(f"runs {speedup:.2f}x fp32's img/s at batch 64 (at least {args.min_speedup}x)")
    return {
        "model": name, "int8_name": f"{name}-int8", "source_sha256": card["sha256"],
        "fp32_accuracy": fp32_acc, "int8_accuracy": int8_acc, "delta_points": delta_points,
        "predictions_changed": int((fp32_pred != int8_pred).sum()), "images": len(labels),
        "ms_per_image": speed, "speedup_batch_1": speed["batch_1"]["fp32"] / speed["batch_1"]["int8"],
        "speedup_batch_64": speedup, "fp32_bytes": (folder / "model.onnx").stat().st_size, "int8_bytes": len(int8),
        "quantize_seconds": quantize_s, "release": not reasons, "not_released_because": reasons,
        "card": card, "int8_model": int8,
    }


def int8_card(result: dict, args: argparse.Namespace) -> dict:
    card = dict(result["card"])
    card["name"] = result["int8_name"]
    card["metrics"] = {**card["metrics"], "accuracy": result["int8_accuracy"],
                       "measured_by": "onnxruntime CPUExecutionProvider on the quantized graph"}
    card["metrics"].pop("per_class_accuracy", None)
    card["metrics"].pop("nll", None)
    card.pop("features", None)  # OOD statistics, indexes: files of the source's folder, fitted on fp32 embeddings
    card["parity"] = {"against": f"the fp32 graph of {result['model']}", "images": result["images"],
                      "predictions_changed": result["predictions_changed"]}
    # The source model's goal and floor: an int8 variant is the same model, held to the same figures.
    card["release"] = release_block(classifier_targets(result["model"]), {"accuracy": result["int8_accuracy"]})
    card["quantization"] = {
        "from": {"model": result["model"], "sha256": result["source_sha256"]},
        "method": "static QDQ (onnxruntime.quantization.quantize_static): uint8 activations, int8 per-channel "
                  f"weights{', 7-bit (reduce_range)' if args.reduce_range else ''}, percentile 99.99 calibration",
        "calibration": f"{args.calibration} Fashion-MNIST training images, seed {args.seed}",
        "fp32_accuracy": result["fp32_accuracy"], "delta_points": result["delta_points"],
        "speedup_batch_1": result["speedup_batch_1"], "speedup_batch_64": result["speedup_batch_64"],
    }
    card["export"] = {**card.get("export", {}), **runtime_versions(),
                      "command": export_command("export.quantize", args)}
    return card


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# INT8 variants", "",
        f"Measured by `{export_command('export.quantize', args)}` on {platform.processor() or platform.machine()} "
        f"({cpu_name()}), onnxruntime {ort.__version__}, {args.threads} intra-op thread(s); accuracy on all "
        f"{args.test_images:,} test images; ms per image the median of {args.rounds} rounds, "
        "fp32 and int8 alternating. Release rule: delta <= "
        f"{args.max_delta} points and >= {args.min_speedup}x img/s at batch 64.", "",
        "| model | fp32 accuracy | int8 accuracy | accuracy lost (points) | ms/img b1 fp32 / int8 | ms/img b64 fp32 / int8 | "
        "speedup b1 | speedup b64 | size fp32 / int8 | released |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        b1, b64 = r["ms_per_image"]["batch_1"], r["ms_per_image"]["batch_64"]
        released = f"`{r['int8_name']}`" if r["release"] else "no: " + "; ".join(r["not_released_because"])
        lines.append(f"| {r['model']} | {r['fp32_accuracy']:.2%} | {r['int8_accuracy']:.2%} | {r['delta_points']:.2f} | "
                     f"{b1['fp32']:.3f} / {b1['int8']:.3f} | {b64['fp32']:.3f} / {b64['int8']:.3f} | "
                     f"{r['speedup_batch_1']:.2f}x | {r['speedup_batch_64']:.2f}x | "
                     f"{r['fp32_bytes'] / 1e6:.2f} / {r['int8_bytes'] / 1e6:.2f} MB | {released} |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                "unknown CPU")
    return f"{name}, {'VNNI' if ('avx512_vnni' in cpuinfo or 'avx_vnni' in cpuinfo) else 'no VNNI'}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["cnn", "resnet-student"], help="released classifiers in --models")
    p.add_argument("--models", type=Path, default=REPO / "models")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--calibration", type=int, default=512, help="training images seen by the calibrator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--test-images", type=int, default=10_000, help="accuracy on the first N test images")
    p.add_argument("--max-delta", type=float, default=0.3, help="most test-accuracy points an int8 variant may lose")
    p.add_argument("--min-speedup", type=float, default=1.5, help="least img/s ratio over fp32 at batch 64")
    p.add_argument("--no-reduce-range", dest="reduce_range", action="store_false",
                   help="full 8-bit weights (saturates on AVX2 without VNNI: see the module's doc)")
    p.add_argument("--dry-run", action="store_true", help="measure and write results, release nothing")
    return with_command(p.parse_args(argv), argv)


def main(args: argparse.Namespace) -> list[dict]:
    train = load_dataset("fashion-mnist", "train").images.numpy()
    test_set = load_dataset("fashion-mnist", "test")
    test, labels = test_set.images.numpy()[:args.test_images], test_set.labels.numpy()[:args.test_images]
    results = []
    for name in args.model:
        result = measure(name, args, train, test, labels)
        results.append(result)
        verdict = "released" if result["release"] else "not released: " + "; ".join(result["not_released_because"])
        print(f"{name}: int8 {result['int8_accuracy']:.4f} vs fp32 {result['fp32_accuracy']:.4f}, "
              f"{result['speedup_batch_64']:.2f}x at batch 64; {verdict}")
        if result["release"] and not args.dry_run:
            write_model(args.models / result["int8_name"], result["int8_model"], int8_card(result, args))
    args.out.mkdir(parents=True, exist_ok=True)
    kept = [{k: v for k, v in r.items() if k not in ("card", "int8_model")} for r in results]
    for r in kept:
        r["int8_sha256"] = sha256_bytes(next(x["int8_model"] for x in results if x["model"] == r["model"]))
    (args.out / "int8.json").write_text(json.dumps({"cpu": cpu_name(), "command": export_command("export.quantize", args),
                                                    "results": kept}, indent=2) + "\n")
    (args.out / "int8.md").write_text(markdown(results, args))
    return results


if __name__ == "__main__":
    main(parse_args())
