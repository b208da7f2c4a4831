"""The convolutional autoencoder: shapes and gradients, the trainer's run folder, and the export's parity gate."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import autoencoder as export_autoencoder
from export.onnx_io import ParityError
from training import train_autoencoder
from training.models import count_parameters
from training.models.autoencoder import Autoencoder, AutoencoderConfig


def test_shapes_range_and_gradients():
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig(channels=8, code_dim=5))
    x = torch.rand(3, 1, 28, 28)
    code = model.encode(x)
    assert code.shape == (3, 5)
    y = model(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1  # sigmoid: the input's range
    torch.nn.functional.mse_loss(y, x).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert count_parameters(Autoencoder(AutoencoderConfig())) == 256_257
    with pytest.raises(ValueError, match="multiples of 4"):
        Autoencoder(AutoencoderConfig(in_shape=(1, 30, 30)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("autoencoder")
    run = train_autoencoder.main(train_autoencoder.parse_args(
        ["--epochs", "1", "--dry-run", "--channels", "8", "--code-dim", "8", "--no-progress", "--seed", "3",
         "--out", str(work / "runs")]))
    card = export_autoencoder.main(export_autoencoder.parse_args(
        ["--run", str(run), "--name", "autoencoder", "--out", str(work / "models"), "--parity-images", "256"]))
    return run, work / "models" / "autoencoder", card


def test_run_folder_records_the_run(exported):
    run, _, _ = exported
    assert {"config.json", "metrics.json", "best.pt", "last.pt", "curves.png", "reconstructions.png"} <= \
        {p.name for p in run.iterdir()}
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["seed"] == 3 and record["data_files"] and record["hardware"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["wall_seconds"] > 0 and len(metrics["test_mse_per_class_torch"]) == 10


def test_export_contract_and_parity(exported, fashion_test_images):
    _, model_dir, card = exported
    assert card["task"] == "reconstruction"
    assert [o["name"] for o in card["outputs"]] == ["reconstruction", "error", "code"]
    assert card["parity"]["max_abs_grey_level_diff"] <= 1 and card["parity"]["max_abs_error_diff"] <= 1e-6
    assert set(card["metrics"]["per_class_test_mse"]) == set(card["labels"])
    assert card["release"]["figures"][0]["floor"] == pytest.approx(card["metrics"]["mean_image_baseline_mse"])
    images, _ = fashion_test_images
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    reconstruction, error, code = session.run(None, {"pixels": images[:7]})
    assert reconstruction.dtype == np.uint8 and reconstruction.shape == (7, 1, 28, 28)
    assert error.dtype == np.float32 and error.shape == (7,) and code.shape == (7, 8)
    # The error is the mean squared difference to the unrounded reconstruction: within half a grey level squared.
    recomputed = ((reconstruction / 255.0 - images[:7] / 255.0) ** 2).reshape(7, -1).mean(1)
    assert np.allclose(error, recomputed, atol=2 * (0.5 / 255) + 1e-6)


def test_parity_gate_refuses_a_graph_that_differs(exported, fashion_test_images):
    run, model_dir, _ = exported
    graph, _, _, _ = export_autoencoder.load_run(run)
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        graph.model.decoder[-2].bias += 0.5  # PyTorch's model no longer matches the exported bytes
    with pytest.raises(ParityError):
        export_autoencoder.check_parity(graph, session, fashion_test_images[0][:64])
