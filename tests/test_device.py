"""VISIONSERVE_DEVICE on a machine without CUDA: `cuda` refuses to start, fast, naming what is missing; `auto`
serves on CPU and says so. In-process, except the one start-up check, which runs as `bentoml serve` runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import InferenceConfig, device_from_environment, precision_from_environment
from service.onnx_models import CPU, CUDA, ModelEntry, cuda_driver_present, cuda_missing, graph_to_serve, \
    load_verified_model, requested_providers, sessions_not_on_cuda

REPO = Path(__file__).resolve().parent.parent
CNN = REPO / "models" / "cnn"
no_cuda_here = pytest.mark.skipif(cuda_driver_present(), reason="this machine has an NVIDIA driver")


@pytest.mark.parametrize("environ, device", [({}, "auto"), ({"VISIONSERVE_DEVICE": "CUDA"}, "cuda"),
                                              ({"VISIONSERVE_DEVICE": "cpu"}, "cpu"),
                                              ({"VISIONSERVE_PROVIDER": "cpu"}, "cpu")])
def test_device_is_read_from_the_environment(environ, device):
    assert device_from_environment(environ) == device
    assert InferenceConfig.from_environ(environ).device == device


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="VISIONSERVE_DEVICE=gpu: choose auto, cpu, cuda"):
        device_from_environment({"VISIONSERVE_DEVICE": "gpu"})


@no_cuda_here
def test_cuda_missing_names_the_missing_driver():
    reason = cuda_missing(CNN / "model.onnx")
    assert reason is not None and "NVIDIA driver" in reason


@no_cuda_here
def test_auto_runs_on_cpu_and_reports_it():
    providers = requested_providers("auto")
    assert providers == [CPU]
    entry = ModelEntry("cnn", CNN, json.loads((CNN / "card.json").read_text()))
    load_verified_model(entry, 1, providers, (1,))
    assert entry.available and entry.provider == CPU and entry.describe()["provider"] == CPU
    assert sessions_not_on_cuda([entry]) == [f"cnn ({CPU})"]  # what `cuda` would refuse


@no_cuda_here
def test_cuda_on_a_machine_without_it_refuses_to_start_fast():
    """The check `bentoml serve` runs when it imports the service, before any worker (a worker's failure would be
    respawned forever): exit status 1 and the reason, in seconds."""
    env = {**os.environ, "VISIONSERVE_DEVICE": "cuda", "VISIONSERVE_MODELS_DIR": str(REPO / "models"),
           "BENTOML_DO_NOT_TRACK": "True"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", "import service.app"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "VISIONSERVE_DEVICE=cuda, but CUDA cannot run: no NVIDIA driver" in result.stderr
    assert time.monotonic() - started < 30


@no_cuda_here
def test_gpu_check_says_why_it_skipped_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gpu-check skipped: no NVIDIA driver")
    assert not (tmp_path / "out").exists()


@no_cuda_here
@pytest.mark.server
def test_the_session_server_reports_the_device_and_each_provider(server):
    """`auto` (the default) on this machine: every model on CPU, said by GET /models and by /metrics."""
    import httpx

    described = httpx.get(server.url + "/models", timeout=10).json()
    assert described["serving"]["device"] == "auto"
    assert {model["provider"] for model in described["models"] if model["status"] == "available"} == {CPU}
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    for model in described["models"]:
        if model["status"] == "available":
            assert f'visionserve_model_provider{{model="{model["name"]}",provider="{CPU}"}} 1.0' in metrics


@pytest.mark.parametrize("environ, precision", [({}, "auto"), ({"VISIONSERVE_PRECISION": "FP16"}, "fp16"),
                                                 ({"VISIONSERVE_PRECISION": "fp32"}, "fp32")])
def test_precision_is_read_from_the_environment(environ, precision):
    assert InferenceConfig.from_environ(environ).precision == precision


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="VISIONSERVE_PRECISION=int4: choose auto, fp32, fp16"):
        precision_from_environment({"VISIONSERVE_PRECISION": "int4"})


def cnn_entry(folder: Path = CNN) -> ModelEntry:
    return ModelEntry("cnn", folder, json.loads((folder / "card.json").read_text()))


@pytest.mark.skipif(not (CNN / "model-fp16.onnx").is_file(), reason="models/cnn has no FP16 variant (make fp16)")
def test_the_fp16_graph_serves_where_precision_asks_for_it_and_auto_keeps_it_for_cuda():
    entry = cnn_entry()
    assert graph_to_serve(entry, "auto", [CPU])[:2] == (CNN / "model.onnx", "fp32")
    assert graph_to_serve(entry, "auto", [CUDA, CPU])[:2] == (CNN / "model-fp16.onnx", "fp16")
    assert graph_to_serve(entry, "fp32", [CUDA, CPU])[1] == "fp32"
    pixels = np.stack([np.asarray(Image.open(sample).convert("L").resize((28, 28)))[None] for sample in
                       sorted((REPO / "service" / "static" / "samples").glob("*.png"))[:4]])
    answers = {}
    for precision in ("fp32", "fp16"):
        entry = cnn_entry()
        load_verified_model(entry, 1, [CPU], (1,), precision=precision)
        assert entry.available and entry.describe()["precision"] == precision
        answers[precision] = entry.run(pixels, ["probabilities"])["probabilities"]
    assert (answers["fp32"].argmax(1) == answers["fp16"].argmax(1)).all()
    assert np.abs(answers["fp32"] - answers["fp16"]).max() < 1e-2


@pytest.mark.skipif(not (CNN / "model-fp16.onnx").is_file(), reason="models/cnn has no FP16 variant (make fp16)")
def test_an_fp16_graph_whose_bytes_are_not_its_cards_is_refused(tmp_path):
    shutil.copytree(CNN, tmp_path / "cnn", ignore=shutil.ignore_patterns("*.npz", "*.faiss"))
    variant = tmp_path / "cnn" / "model-fp16.onnx"
    variant.write_bytes(variant.read_bytes() + b"\0")
    entry = cnn_entry(tmp_path / "cnn")
    load_verified_model(entry, 1, [CPU], (1,), precision="fp16")
    assert not entry.available and entry.unavailable_reason.startswith("sha256 mismatch")
