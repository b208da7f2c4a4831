"""The released classifiers in models/: contract, checksum, size and the accuracy gates, re-measured here."""

import hashlib
import json
from pathlib import Path

import pytest

from export.evaluate import ACCURACY_GATES, evaluate_classifier

MODELS = Path(__file__).resolve().parent.parent / "models"


def released_classifiers() -> list[str]:
    return sorted(p.parent.name for p in MODELS.glob("*/card.json")
                  if json.loads(p.read_text()).get("task") == "classification")


def test_every_released_classifier_has_a_gate():
    released = released_classifiers()
    assert {"mlp", "cnn"} <= set(released)  # the ones released so far; a model may be added, never lost
    assert set(released) <= set(ACCURACY_GATES), "a released classifier without a release gate"


@pytest.mark.parametrize("name", released_classifiers())
def test_released_classifier_meets_its_gate(name):
    model_dir = MODELS / name
    card = json.loads((model_dir / "card.json").read_text())
    assert hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest() == card["sha256"]
    assert card["input"]["shape"] == ["N", 1, 28, 28] and card["labels"][0] == "T-shirt/top"
    assert (model_dir / "confusion.png").is_file() and (model_dir / "curves.png").is_file()
    result = evaluate_classifier(model_dir)  # onnxruntime over all 10,000 Fashion-MNIST test images
    assert result["images"] == 10_000
    assert result["problems"] == []
    assert result["accuracy"] >= ACCURACY_GATES[name]
