"""BentoML's model store between export/ and the service, and the rule for what is served: idempotent import
keyed by checksum; refusal of a model whose bytes do not match its card; a server that serves exactly the
models its checkout's cards (or VISIONSERVE_MODELS) name, whatever else the store holds and whichever version
was imported last."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import (FOREIGN_MODEL, MODELS_DIR, REPO, classification_cards, import_into_store, model_copy,
                      newest_version_in_store, start_server, stop_server)
from service.config import ModelSelection, parse_model_tags
from service.model_store import store_tag

pytestmark = pytest.mark.server


def served_list(home: Path, **selection: str) -> subprocess.CompletedProcess:
    """`python -m service.model_store list`: what a server with these VISIONSERVE_* settings would serve."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
           **{f"VISIONSERVE_{key.upper()}": value for key, value in selection.items()}}
    return subprocess.run([sys.executable, "-m", "service.model_store", "list"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def served_tags(home: Path, **selection: str) -> list[str]:
    result = served_list(home, **selection)
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()]


def released_classifier() -> str:
    return "cnn" if "cnn" in classification_cards() else next(iter(classification_cards()))


def tensor_body() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, 28, 28), np.uint8))
    return buffer.getvalue()


def test_import_is_idempotent_and_keyed_by_checksum(tmp_path):
    home, models = tmp_path / "home", tmp_path / "models"
    name = released_classifier()
    folder = model_copy(MODELS_DIR / name, models)
    card = json.loads((folder / "card.json").read_text())
    first = import_into_store(home, models)
    assert first.returncode == 0 and f"{name}:{card['sha256'][:16]}: imported" in first.stdout
    again = import_into_store(home, models)
    assert again.returncode == 0 and "already in the store" in again.stdout
    assert len(list((home / "models" / name).iterdir())) == 2  # one version folder plus BentoML's `latest` file
    # New bytes (a valid card for them) make a new version beside the first; the cards say which one is served.
    shutil.rmtree(folder)
    newer = model_copy(MODELS_DIR / name, models, extra_bytes=b"\0")
    assert import_into_store(home, models).returncode == 0
    assert len([p for p in (home / "models" / name).iterdir() if p.is_dir()]) == 2
    newer_card = json.loads((newer / "card.json").read_text())
    assert served_tags(home, cards_dir=str(models)) == [store_tag(newer_card)]
    assert served_tags(home, models=store_tag(card)) == [store_tag(card)]


def test_a_model_that_does_not_match_its_card_is_not_imported(tmp_path):
    home, models = tmp_path / "home", tmp_path / "models"
    name = released_classifier()
    folder = model_copy(MODELS_DIR / name, models)
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    result = import_into_store(home, models)
    assert result.returncode == 1
    assert "not imported" in result.stderr and "sha256" in result.stderr
    assert not (home / "models" / name).exists()


def test_server_loads_from_the_store(server, store_home):
    # The load log names each model's file, which lies in the test's own store.
    assert f"loaded from {store_home}/models/" in server.log()


def test_a_stored_model_that_no_card_names_is_not_served(server, store_home):
    assert (store_home / "models" / FOREIGN_MODEL).is_dir()  # the store holds it ...
    described = httpx.get(server.url + "/models", timeout=10).json()
    served = {model["name"] for model in described["models"]}
    cards = {json.loads(path.read_text())["name"] for path in MODELS_DIR.glob("*/card.json")}
    assert served == cards  # ... but the server serves exactly the checkout's cards
    response = httpx.post(server.url + "/classify/tensor", params={"model": FOREIGN_MODEL}, content=tensor_body(),
                          headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_model"
    assert f"model {FOREIGN_MODEL} " not in server.log()


def test_the_checkouts_card_decides_the_version_not_the_newest_import(server, store_home):
    name = released_classifier()
    card = json.loads((MODELS_DIR / name / "card.json").read_text())
    tag = store_tag(card)
    assert newest_version_in_store(store_home, name) != card["sha256"][:16]  # `latest` is another checkout's
    detail = httpx.get(f"{server.url}/models/{name}", timeout=10).json()
    assert detail["status"] == "available"
    assert (detail["tag"], detail["sha256"], detail["source"]) == (tag, card["sha256"], "checkout card")
    # One start-up line per model says the same, with the card that named it.
    assert (f"sha256 verified ({card['sha256']}), tag {tag}, from checkout card {MODELS_DIR / name / 'card.json'}"
            in server.log())


@pytest.fixture(scope="module")
def tag_list_home(tmp_path_factory) -> Path:
    """A store holding models/, one of whose stored files was changed after its import."""
    home = tmp_path_factory.mktemp("tag-list-home")
    assert import_into_store(home).returncode == 0
    return home


def tampered_tag(home: Path) -> str:
    """mlp's stored model.onnx, one byte longer than its card says (done once per home)."""
    card = json.loads((MODELS_DIR / "mlp" / "card.json").read_text())
    stored = home / "models" / "mlp" / card["sha256"][:16] / "model.onnx"
    if stored.stat().st_size == card["file_bytes"]:
        with open(stored, "ab") as f:
            f.write(b"\0")
    return store_tag(card)


@pytest.fixture(scope="module")
def tag_list_server(tmp_path_factory, tag_list_home) -> dict:
    """VISIONSERVE_MODELS naming the CNN by an 8-digit version prefix and the tampered MLP (the ResNet, also in
    the store, not named). Small: only the CNN gets a session."""
    cnn = json.loads((MODELS_DIR / "cnn" / "card.json").read_text())
    tags = f"cnn:{cnn['sha256'][:8]},{tampered_tag(tag_list_home)}"
    running = start_server(tmp_path_factory.mktemp("tag-list") / "server.log",
                           {"BENTOML_HOME": str(tag_list_home), "VISIONSERVE_MODELS": tags,
                            "OMP_NUM_THREADS": "1", "VISIONSERVE_THREADS": "1"})
    yield {"server": running, "cnn": cnn}
    stop_server(running)


@pytest.mark.skipif(not {"cnn", "mlp", "resnet"} <= set(classification_cards()), reason="needs mlp, cnn and resnet")
def test_a_tag_list_serves_exactly_those_tags_and_refuses_tampered_bytes(tag_list_server):
    server, cnn = tag_list_server["server"], tag_list_server["cnn"]
    described = {model["name"]: model for model in httpx.get(server.url + "/models", timeout=10).json()["models"]}
    assert set(described) == {"cnn", "mlp"}
    assert described["cnn"]["status"] == "available" and described["cnn"]["tag"] == store_tag(cnn)
    assert {model["source"] for model in described.values()} == {"tag list"}
    assert described["mlp"]["status"] == "unavailable" and "sha256 mismatch" in described["mlp"]["unavailable_reason"]
    assert "model mlp refused" in server.log() and "does not match card.json sha256" in server.log()
    response = httpx.post(server.url + "/classify/tensor", params={"model": "resnet"}, content=tensor_body(),
                          headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_model"


@pytest.mark.skipif("mlp" not in classification_cards(), reason="needs mlp")
def test_import_refuses_a_stored_file_that_was_changed(tag_list_home):
    tag = tampered_tag(tag_list_home)
    result = import_into_store(tag_list_home)
    assert result.returncode == 1
    assert f"{tag} in the store has sha256" in result.stderr and "refused" in result.stderr


def test_an_unknown_tag_stops_start_up_with_a_clear_message(tmp_path):
    with pytest.raises(RuntimeError) as failed:
        running = start_server(tmp_path / "server.log", {"VISIONSERVE_MODELS": "cnn:0000dead"}, timeout_s=60)
        stop_server(running)
    assert "VISIONSERVE_MODELS names cnn:0000dead, which is not in BentoML's model store" in str(failed.value)


def test_server_with_an_empty_store_says_what_to_run(tmp_path):
    with pytest.raises(RuntimeError) as failed:
        running = start_server(tmp_path / "server.log", {"BENTOML_HOME": str(tmp_path / "empty-home")}, timeout_s=60)
        stop_server(running)
    assert "which is not in BentoML's model store" in str(failed.value)
    assert "python -m service.model_store import models" in str(failed.value)


@pytest.mark.parametrize("value, says", [
    ("cnn:latest", "never by latest"),
    ("cnn", "is not <name>:<version>"),
    ("cnn:95eb,cnn:5455", "cnn is named twice"),
    (" , ", "names no model"),
])
def test_a_tag_list_names_versions(value, says):
    with pytest.raises(ValueError, match=says):
        parse_model_tags(value)


def test_models_are_named_one_way_only():
    with pytest.raises(ValueError, match="name the models to serve one way only"):
        ModelSelection.from_environ({"VISIONSERVE_MODELS": "cnn:95eb", "VISIONSERVE_MODELS_DIR": "models"})
    assert ModelSelection.from_environ({}) == ModelSelection()


def test_the_load_test_driver_serves_from_a_store_of_its_own(monkeypatch, tmp_path):
    """`make loadtest` / `make fuzz` start their server over a temporary store with models/ imported, so the
    machine's ~/bentoml cannot change what they measure; a BENTOML_HOME that is set is used as given."""
    from loadtests.run import server_environment

    for name in ("BENTOML_HOME", "VISIONSERVE_MODELS", "VISIONSERVE_MODELS_DIR", "VISIONSERVE_CARDS_DIR"):
        monkeypatch.delenv(name, raising=False)
    with server_environment() as env:
        home = Path(env["BENTOML_HOME"])
        assert served_tags(home) == [store_tag(json.loads(path.read_text()))
                                     for path in sorted(MODELS_DIR.glob("*/card.json"))]
    assert not home.exists()
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "given"))
    with server_environment() as env:
        assert env["BENTOML_HOME"] == str(tmp_path / "given") and (tmp_path / "given" / "models").is_dir()
