"""Export of a small trained model: contract, parity gate, card, and the independent evaluator."""

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import classifier as export_classifier
from export.evaluate_classifier import evaluate_classifier
from export.onnx_io import ParityError
from training.data import load_dataset, train_val_split
from training.train_classifier import main as train_main
from training.train_classifier import split_seed
from training.train_classifier import parse_args as train_args


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train_main(train_args(["--model", "cnn", "--dataset", "digits", "--epochs", "3", "--seed", "1",
                                  "--out", str(out), "--no-progress"]))


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    card = export_classifier.main(export_classifier.parse_args(
        ["--run", str(digits_run), "--name", "digits-cnn", "--out", str(out), "--parity-images", "512"]))
    return out / "digits-cnn", card


def test_files_and_checksum(exported):
    model_dir, card = exported
    assert {p.name for p in model_dir.iterdir()} == {"model.onnx", "card.json", "confusion.png", "curves.png"}
    assert hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest() == card["sha256"]
    assert card["file_bytes"] == (model_dir / "model.onnx").stat().st_size


def test_card_fields(exported, digits_run):
    _, card = exported
    for key in ("name", "version", "task", "architecture", "input", "outputs", "labels", "sha256", "metrics",
                "training", "parity", "export"):
        assert key in card, key
    assert card["input"]["dtype"] == "uint8" and card["input"]["shape"] == ["N", 1, 8, 8]
    assert set(card["input"]["fit"]) >= {"color", "resize", "padding_value", "polarity"}
    assert [o["name"] for o in card["outputs"]] == ["probabilities", "embedding"]
    assert card["labels"] == [str(d) for d in range(10)]
    training = card["training"]
    assert training["seed"] == 1 and training["data_files"] and training["hardware"] and training["wall_seconds"] > 0
    assert training["command"].endswith("--seed 1") and "--dataset digits" in training["command"]
    n_test = len(load_dataset("digits", "test"))
    assert card["metrics"]["images"] == n_test and card["metrics"]["measured_by"].startswith("onnxruntime")
    assert card["parity"]["images"] == n_test and card["parity"]["argmax_agreement"] == 1.0
    assert card["parity"]["max_abs_probability_diff"] <= 1e-4
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert card["training"]["test_acc_torch"] == metrics["test_acc_torch"]


def test_graph_contract_and_dynamic_batch(exported, digits_run):
    model_dir, _ = exported
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "pixels" and inp.type == "tensor(uint8)" and inp.shape[1:] == [1, 8, 8]
    assert not isinstance(inp.shape[0], int)
    graph, _, _, _ = export_classifier.load_run(digits_run)
    images = load_dataset("digits", "test").images.numpy()
    for n in (1, 3, 64):
        probs, emb = session.run(None, {"pixels": images[:n]})
        assert probs.shape == (n, 10) and emb.shape == (n, 128)
        with torch.no_grad():
            want, _ = graph(torch.from_numpy(images[:n]))
        np.testing.assert_allclose(probs, want.numpy(), atol=1e-4)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_parity_gate_refuses_and_writes_nothing(digits_run, tmp_path):
    args = export_classifier.parse_args(["--run", str(digits_run), "--name", "x", "--out", str(tmp_path),
                                         "--tolerance", "-1"])
    with pytest.raises(ParityError, match="disagrees"):
        export_classifier.main(args)
    assert not (tmp_path / "x").exists()


def test_independent_evaluation_agrees_with_card(exported):
    model_dir, card = exported
    result = evaluate_classifier(model_dir)
    assert result["accuracy"] == card["metrics"]["accuracy"]
    assert result["problems"] == [] and result["batch_independent"]


def test_evaluation_catches_a_tampered_model(exported, tmp_path):
    model_dir, card = exported
    bad = tmp_path / "digits-cnn"
    bad.mkdir()
    (bad / "card.json").write_text(json.dumps(card | {"metrics": card["metrics"] | {"accuracy": 0.999}}))
    data = bytearray((model_dir / "model.onnx").read_bytes())
    (bad / "model.onnx").write_bytes(bytes(data))
    problems = evaluate_classifier(bad)["problems"]
    assert any("card claims accuracy" in p for p in problems)
    card_wrong_sha = card | {"sha256": "0" * 64}
    (bad / "card.json").write_text(json.dumps(card_wrong_sha))
    assert any("sha256" in p for p in evaluate_classifier(bad)["problems"])


@pytest.mark.parametrize("tta", ["flip", "flip-shift"])
def test_tta_graph_averages_the_mirror(digits_run, tmp_path, tta):
    card = export_classifier.main(export_classifier.parse_args(
        ["--run", str(digits_run), "--name", "tta", "--out", str(tmp_path), "--tta", tta]))
    assert card["input"]["test_time_augmentation"].startswith("mean of the image" if tta == "flip" else "mean over")
    session = ort.InferenceSession(str(tmp_path / "tta" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = load_dataset("digits", "test").images.numpy()[:16]
    probs, _ = session.run(None, {"pixels": images})
    mirrored, _ = session.run(None, {"pixels": np.ascontiguousarray(images[..., ::-1])})
    np.testing.assert_allclose(probs, mirrored, atol=1e-5)  # symmetric by construction


def test_choose_tta_picks_the_best_on_validation_and_records_it(digits_run, tmp_path):
    card = export_classifier.main(export_classifier.parse_args(
        ["--run", str(digits_run), "--name", "chosen", "--out", str(tmp_path), "--choose-tta"]))
    scores = card["input"]["tta_validation_accuracy"]
    assert set(scores) == {"none", "flip", "flip-shift"} and all(0 <= v <= 1 for v in scores.values())
    best = max(scores.values())
    chosen = [k for k, v in export_classifier.TTA_DESCRIPTIONS.items() if v == card["input"]["test_time_augmentation"]]
    assert chosen and scores[chosen[0]] == best


def test_tta_validation_scores_match_the_graph_with_those_views(digits_run):
    """validation_accuracy_by_tta runs each view once; its scores must be what the exported graph itself gets."""
    graph, (run,) = export_classifier.load_runs([digits_run])
    config = run.record["config"]
    scores = export_classifier.validation_accuracy_by_tta(graph, config)
    _, val = train_val_split(load_dataset(config["dataset"], "train", None), config["val_fraction"],
                             split_seed(config))
    for tta in export_classifier.TTA_VIEWS:
        graph.tta = tta
        with torch.no_grad():
            correct = int((graph(val.images)[0].argmax(1) == val.labels).sum())
        assert scores[tta] == correct / len(val), tta


@pytest.fixture(scope="module")
def second_member(tmp_path_factory):
    """A second digits run with its own seed on the first run's validation split (--split-seed)."""
    out = tmp_path_factory.mktemp("runs2")
    return train_main(train_args(["--model", "cnn", "--dataset", "digits", "--epochs", "3", "--seed", "2",
                                  "--split-seed", "1", "--out", str(out), "--no-progress"]))


def test_ensemble_graph_is_the_mean_of_its_members(digits_run, second_member, exported, tmp_path):
    card = export_classifier.main(export_classifier.parse_args(
        ["--run", str(digits_run), str(second_member), "--name", "pair", "--out", str(tmp_path),
         "--parity-images", "512"]))
    images = load_dataset("digits", "test").images.numpy()
    pair = ort.InferenceSession(str(tmp_path / "pair" / "model.onnx"), providers=["CPUExecutionProvider"])
    first = ort.InferenceSession(str(exported[0] / "model.onnx"), providers=["CPUExecutionProvider"])
    graph, _, _, _ = export_classifier.load_run(second_member)
    probs, emb = pair.run(None, {"pixels": images})
    probs_1, emb_1 = first.run(None, {"pixels": images})
    with torch.no_grad():
        probs_2, emb_2 = (t.numpy() for t in graph(torch.from_numpy(images)))
    np.testing.assert_allclose(probs, (probs_1 + probs_2) / 2, atol=1e-5)
    np.testing.assert_allclose(emb, np.concatenate([emb_1, emb_2], axis=1), atol=1e-4)
    assert card["outputs"][1]["shape"] == ["N", emb_1.shape[1] + emb_2.shape[1]]
    assert card["architecture"]["ensemble"]["members"] == 2
    assert card["architecture"]["parameters"] == sum(card["architecture"]["ensemble"]["parameters_per_member"])
    training = card["training"]
    assert training["ensemble_of"] == 2 and training["seed"] == [1, 2] and training["split_seed"] == 1
    assert [m["command"] for m in training["members"]] == training["command"].split(" && ")
    assert "--split-seed 1" in training["members"][1]["command"]
    assert (tmp_path / "pair" / "curves-member2.png").is_file()
    assert evaluate_classifier(tmp_path / "pair")["problems"] == []


def test_ensemble_refuses_members_with_different_validation_splits(digits_run, tmp_path):
    other = train_main(train_args(["--model", "cnn", "--dataset", "digits", "--epochs", "1", "--seed", "3",
                                   "--out", str(tmp_path / "runs"), "--no-progress", "--dry-run"]))
    with pytest.raises(ValueError, match="validation split"):
        export_classifier.main(export_classifier.parse_args(
            ["--run", str(digits_run), str(other), "--name", "bad", "--out", str(tmp_path / "models")]))
    assert not (tmp_path / "models" / "bad").exists()
