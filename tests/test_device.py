"""VISIONSERVE_DEVICE on a machine without CUDA: `cuda` refuses to start, fast, naming what is missing; `auto`
serves on CPU and says so. In-process, except the one start-up check, which runs as `bentoml serve` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.config import InferenceConfig, device_from_environment
from service.onnx_models import CPU, ModelEntry, cuda_driver_present, cuda_missing, load_verified_model, \
    requested_providers, sessions_not_on_cuda

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
    import json

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
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "out")], cwd=REPO,
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
