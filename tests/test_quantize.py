"""export.quantize on a released classifier, small: the int8 graph is measured against fp32 and the release rule
decides from the measurement (no model is written in a dry run; with a loose rule, a variant is written whose card
holds the int8 figures and is loadable by onnxruntime)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort

from export import quantize

from conftest import MODELS_DIR


def test_quantized_mlp_is_measured_and_released_only_by_the_rule(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR / "mlp", models / "mlp", ignore=shutil.ignore_patterns("*.npz", "*.usearch", "*.faiss"))
    common = ["--model", "mlp", "--models", str(models), "--calibration", "64", "--test-images", "500",
              "--rounds", "2"]
    strict = quantize.main(quantize.parse_args(common + ["--out", str(tmp_path / "strict"), "--min-speedup", "100"]))
    (result,) = strict
    assert not result["release"] and "100" in result["not_released_because"][0]
    assert not (models / "mlp-int8").exists()
    table = (tmp_path / "strict" / "int8.md").read_text()
    assert "| mlp |" in table and "no: runs" in table
    assert 0.8 < result["int8_accuracy"] <= 1 and abs(result["delta_points"]) < 3  # 500 images: a coarse check

    loose = quantize.main(quantize.parse_args(common + ["--out", str(tmp_path / "loose"), "--min-speedup", "0",
                                                        "--max-delta", "100"]))
    assert loose[0]["release"]
    card = json.loads((models / "mlp-int8" / "card.json").read_text())
    assert card["name"] == "mlp-int8" and card["quantization"]["from"]["model"] == "mlp"
    assert card["metrics"]["accuracy"] == loose[0]["int8_accuracy"] and "features" not in card
    session = ort.InferenceSession(str(models / "mlp-int8" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(models / "mlp-int8" / "model.onnx")).graph.node)
    (probabilities,) = session.run(["probabilities"], {"pixels": np.zeros((2, 1, 28, 28), np.uint8)})
    assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-3)


def test_int8_served_pairs_each_released_variant_with_its_released_source(tmp_path):
    from benchmarks.int8_served import int8_pairs

    for name in ("cnn", "cnn-int8", "resnet-student-int8"):
        (tmp_path / name).mkdir()
    shutil.copy(MODELS_DIR / "cnn" / "model.onnx", tmp_path / "cnn" / "model.onnx")
    (tmp_path / "cnn" / "card.json").write_text(json.dumps({"name": "cnn"}))
    (tmp_path / "cnn-int8" / "card.json").write_text(json.dumps({"name": "cnn-int8",
                                                                 "quantization": {"from": {"model": "cnn"}}}))
    # its source is not in this folder: nothing to serve it against
    (tmp_path / "resnet-student-int8" / "card.json").write_text(
        json.dumps({"name": "resnet-student-int8", "quantization": {"from": {"model": "resnet-student"}}}))
    assert int8_pairs(tmp_path) == [("cnn", "cnn-int8")]
