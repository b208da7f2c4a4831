"""BentoML's model store between export/ and the service: idempotent import keyed by checksum, refusal of a
model whose bytes do not match its card, and a server that loads the store's newest versions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODELS_DIR, REPO, classification_cards, import_into_store, start_server, stop_server


def store_list(home: Path) -> list[str]:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    result = subprocess.run([sys.executable, "-m", "service.model_store", "list"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    return [line.split()[0] for line in result.stdout.splitlines()]


def copy_model(name: str, to: Path) -> Path:
    folder = to / name
    shutil.copytree(MODELS_DIR / name, folder)
    return folder


def test_import_is_idempotent_and_keyed_by_checksum(tmp_path):
    home, models = tmp_path / "home", tmp_path / "models"
    name = next(iter(classification_cards()))
    folder = copy_model(name, models)
    card = json.loads((folder / "card.json").read_text())
    first = import_into_store(home, models)
    assert first.returncode == 0 and f"{name}:{card['sha256'][:16]}: imported" in first.stdout
    again = import_into_store(home, models)
    assert again.returncode == 0 and "already in the store" in again.stdout
    assert len(list((home / "models" / name).iterdir())) == 2  # one version folder plus BentoML's `latest` file
    # New bytes (a valid card for them) make a new version, and the newest is what the service loads.
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    card["sha256"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    (folder / "card.json").write_text(json.dumps(card))
    assert import_into_store(home, models).returncode == 0
    assert store_list(home) == [f"{name}:{card['sha256'][:16]}"]


def test_a_model_that_does_not_match_its_card_is_not_imported(tmp_path):
    home, models = tmp_path / "home", tmp_path / "models"
    name = next(iter(classification_cards()))
    folder = copy_model(name, models)
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    result = import_into_store(home, models)
    assert result.returncode == 1
    assert "not imported" in result.stderr and "sha256" in result.stderr
    assert store_list(home) == []


def test_server_loads_from_the_store(server, store_home):
    # The load log names each model's file, which lies in the test's own store.
    assert f"loaded from {store_home}/models/" in server.log()


def test_server_with_an_empty_store_says_what_to_run(tmp_path):
    with pytest.raises(RuntimeError) as failed:
        running = start_server(tmp_path / "server.log", {"BENTOML_HOME": str(tmp_path / "empty-home")}, timeout_s=60)
        stop_server(running)
    assert "python -m service.model_store import models" in str(failed.value)
