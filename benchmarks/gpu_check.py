"""Raw onnxruntime-CUDA against the served models, on a GPU machine; elsewhere it says why it skipped.

    .venv/bin/python -m benchmarks.gpu_check --models models --out benchmarks/results     # make gpu-check

On a machine where the CUDA execution provider really runs (read back from a session, not from the list of
available providers): img/s of raw onnxruntime-CUDA for the ResNet and the CNN at batch 1 and 64, FP32 and FP16
(FP16: the released variant of export/fp16.py, or one converted the same way for a model without one, its
argmax agreement with FP32 on the same images reported beside it), then a server with VISIONSERVE_DEVICE=cuda
(and so the FP16 variants, VISIONSERVE_PRECISION=auto) answering 64-image tensor requests (/classify/tensor) sequentially, and served/raw for batched ResNet (target >= 0.80).
Writes gpu.json and gpu.md. Without CUDA it prints the reason and exits 0 writing nothing: no figures are made up.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.report import argument_parser, write_results
from service.onnx_models import CPU, CUDA, cuda_missing  # the service's own check, one definition

MODELS = ("resnet", "cnn")
BATCHES = (1, 64)
TARGET = 0.80  # served batched ResNet img/s over raw onnxruntime-CUDA img/s (issue 23)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="per measured cell")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def fp16_model(model_path: Path, workdir: Path) -> Path:
    """The model's released FP16 variant (`make fp16`), or one made here by the same converter for a model that
    has none (the ResNet ensemble); uint8 pixels in and float32 out kept, so clients see no difference."""
    from export.fp16 import VARIANT_FILE, to_fp16

    if (model_path.parent / VARIANT_FILE).is_file():
        return model_path.parent / VARIANT_FILE
    out = workdir / f"{model_path.parent.name}-fp16.onnx"
    out.write_bytes(to_fp16(model_path))
    return out


def cuda_session(model_path: Path) -> ort.InferenceSession:
    session = ort.InferenceSession(str(model_path), providers=[CUDA, CPU])
    if session.get_providers()[0] != CUDA:
        raise RuntimeError(f"{model_path}: the session fell back to {session.get_providers()[0]}")
    return session


def images_per_second(session: ort.InferenceSession, pixels: np.ndarray, seconds: float) -> float:
    """Steady-state throughput with IO binding: the input is copied to the GPU once, as a batched server's
    copy overlaps its next request's parsing; the output comes back to the host each call, as a server's must."""
    binding = session.io_binding()
    binding.bind_ortvalue_input("pixels", ort.OrtValue.ortvalue_from_numpy(pixels, "cuda", 0))
    binding.bind_output("probabilities")
    for _ in range(10):
        session.run_with_iobinding(binding)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()
        calls += 1
    return calls * len(pixels) / (time.perf_counter() - start)


def raw_cells(models_dir: Path, images: np.ndarray, seconds: float, workdir: Path) -> dict:
    cells = {}
    for name in MODELS:
        fp32_path = models_dir / name / "model.onnx"
        fp32, fp16 = cuda_session(fp32_path), cuda_session(fp16_model(fp32_path, workdir))
        (reference,) = fp32.run(["probabilities"], {"pixels": images})
        (half,) = fp16.run(["probabilities"], {"pixels": images})
        cells[name] = {
            "fp16_argmax_agreement": float((reference.argmax(1) == half.argmax(1)).mean()),
            "fp16_max_abs_probability_delta": float(np.abs(reference - half).max()),
            **{f"{precision} batch {size} img/s": images_per_second(session, images[:size], seconds)
               for precision, session in (("fp32", fp32), ("fp16", fp16)) for size in BATCHES},
        }
    return cells


def served_cells(models_dir: Path, images: np.ndarray, seconds: float, workdir: Path) -> dict:
    import httpx

    from benchmarks.bench_serve import npy_body, served_sequential
    from loadtests.server import models_folder_environment, running_server

    env = models_folder_environment(models_dir, {"VISIONSERVE_DEVICE": "cuda"})
    with running_server(env, workdir / "server.log") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        providers = {model["name"]: model["provider"] for model in client.get("/models").json()["models"]}
        return {"providers": providers, **{
            name: served_sequential(client, f"/classify/tensor?model={name}", npy_body(images[:64]),
                                    "application/octet-stream", 64, seconds) for name in MODELS}}


def markdown_report(results: dict) -> str:
    lines = [f"# GPU check ({results['device']}, onnxruntime {results['onnxruntime']})", "",
             "| model | precision | batch 1 img/s | batch 64 img/s | FP16 argmax agreement |", "|---|---|---|---|---|"]
    for name, cell in results["raw"].items():
        for precision in ("fp32", "fp16"):
            agreement = f"{cell['fp16_argmax_agreement']:.4f}" if precision == "fp16" else ""
            lines.append(f"| {name} | {precision} | {cell[f'{precision} batch 1 img/s']:.0f} | "
                         f"{cell[f'{precision} batch 64 img/s']:.0f} | {agreement} |")
    lines += ["", f"Served batched ResNet (64-image tensor requests, VISIONSERVE_DEVICE=cuda): "
              f"{results['served_over_raw']:.2f} of raw onnxruntime-CUDA FP32 batch 64 (target {TARGET:.2f})."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    models_dir = Path(args.models)
    reason = cuda_missing(models_dir / "cnn" / "model.onnx")
    if reason:
        print(f"gpu-check skipped: {reason}. No figures written.")
        return 0
    from loadtests.payloads import fashion_test_images

    images = fashion_test_images(64, args.seed)[:, None]  # uint8 [64, 1, 28, 28]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        raw = raw_cells(models_dir, images, args.seconds, Path(scratch))
        served = served_cells(models_dir, images, args.seconds, Path(scratch))
    results = {"device": platform.node(), "onnxruntime": ort.__version__, "raw": raw, "served": served,
               "served_over_raw": served["resnet"]["img_per_s_at_median"] / raw["resnet"]["fp32 batch 64 img/s"]}
    write_results(args.out, "gpu", results, markdown_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
