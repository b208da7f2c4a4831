"""export.fp16: FP16 variants keep the model contract (uint8 in, float32 out), carry their parity figures and
checksum in the card, and are written only when the accuracy rule allows; the released variants match their cards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import fp16
from export.onnx_io import sha256_bytes

from conftest import MODELS_DIR


def io_types(session: ort.InferenceSession) -> list[tuple[str, str]]:
    return [(arg.name, arg.type) for arg in session.get_inputs() + session.get_outputs()]


def test_mlp_variant_is_written_with_its_parity_and_keeps_the_contract(tmp_path):
    shutil.copytree(MODELS_DIR / "mlp", tmp_path / "mlp", ignore=shutil.ignore_patterns("*.npz", "*.faiss", "*-fp16.onnx"))
    card = json.loads((tmp_path / "mlp" / "card.json").read_text())
    card.get("features", {}).clear()  # the copy carries no feature files
    (tmp_path / "mlp" / "card.json").write_text(json.dumps(card))
    (row,) = fp16.main(fp16.parse_args(["--model", str(tmp_path / "mlp"), "--out", str(tmp_path / "out")]))
    parity = row["parity"]
    assert row["released"] and parity["images"] == 10_000
    assert abs(parity["delta_points"]) <= fp16.MAX_DELTA_POINTS and parity["top1_agreement"] > 0.99
    written = (tmp_path / "mlp" / fp16.VARIANT_FILE).read_bytes()
    section = json.loads((tmp_path / "mlp" / "card.json").read_text())["features"]["fp16"]
    assert section["sha256"] == sha256_bytes(written) and section["parity"] == parity
    graph = onnx.load_from_string(written)
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)
    half = ort.InferenceSession(written, providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(tmp_path / "mlp" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert io_types(half) == io_types(full)
    assert "| mlp | classification |" in (tmp_path / "out" / "fp16.md").read_text()


def test_a_variant_the_rule_refuses_is_not_written(tmp_path):
    shutil.copytree(MODELS_DIR / "mlp", tmp_path / "mlp", ignore=shutil.ignore_patterns("*.npz", "*.faiss", "*-fp16.onnx"))
    before = (tmp_path / "mlp" / "card.json").read_text()
    # A rule that asks FP16 to gain a point: no variant can pass it, so nothing may be written.
    (row,) = fp16.main(fp16.parse_args(["--model", str(tmp_path / "mlp"), "--out", str(tmp_path / "out"),
                                        "--max-delta", "-1", "--first-images", "500"]))
    assert not row["released"] and not (tmp_path / "mlp" / fp16.VARIANT_FILE).exists()
    assert (tmp_path / "mlp" / "card.json").read_text() == before


RELEASED = sorted(p.parent.name for p in MODELS_DIR.glob(f"*/{fp16.VARIANT_FILE}"))


@pytest.mark.parametrize("name", RELEASED)
def test_released_variant_matches_its_card(name):
    folder = MODELS_DIR / name
    section = json.loads((folder / "card.json").read_text())["features"]["fp16"]
    data = (folder / fp16.VARIANT_FILE).read_bytes()
    assert section["sha256"] == sha256_bytes(data) and section["released"]
    assert section["parity"]["delta_points"] >= -fp16.MAX_DELTA_POINTS
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    shape = [1, 1, 28, 28] if section["parity"].get("images") else [1, 1, 64, 64]
    outputs = session.run(None, {"pixels": np.zeros(shape, np.uint8)})
    assert all(np.isfinite(out).all() for out in outputs)
