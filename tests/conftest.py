"""Fixtures that start the real BentoML server as a subprocess (no mocks) and hold reference data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtests.server import MODEL_SOURCES, Server, free_port, stop_server
from loadtests.server import start_server as launch_server

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"
ISOLATED_HOME = pytest.StashKey[Path]()
# Small limits so that each limit can be exceeded cheaply in a test; the defaults have their own test.
TEST_SERVER_LIMITS = {
    "VISIONSERVE_MAX_BODY_BYTES": str(4 * 1024 * 1024),
    "VISIONSERVE_MAX_IMAGES": "300",
    "VISIONSERVE_MAX_PIXELS": str(2_000_000),
    "VISIONSERVE_MAX_FIELD_BYTES": "1024",
}


def pytest_configure(config: pytest.Config) -> None:
    """Every server and store command of the suite gets an empty BentoML home of its own unless a test gives
    one: the machine's ~/bentoml (models imported by other checkouts, other releases) cannot make a test pass
    or fail. Set here, before anything imports bentoml, so in-process calls and subprocesses alike see it."""
    home = Path(tempfile.mkdtemp(prefix="visionserve-test-bentoml-"))
    config.stash[ISOLATED_HOME] = home
    os.environ["BENTOML_HOME"] = str(home)
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(ISOLATED_HOME, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class RunningServer(Server):
    env: dict = field(default_factory=dict)  # what the test set (its limits, its models)
    cards_at_start: dict = field(default_factory=dict)  # the cards on disk when the server started


def start_server(log_path: Path, extra_env: dict[str, str], timeout_s: float = 120,
                 host: str | None = "127.0.0.1") -> RunningServer:
    """`bentoml serve` (loadtests/server.py) on a free port; `host=None` leaves the address to the service's own
    default."""
    env = {**os.environ, **extra_env, "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("BENTOML_HOST", None)
    # One worker unless the test asks for more (the shipped default is one per core): per-worker figures (batch
    # sizes, V2 statistics) stay exact, and the suite's servers do not each take every core.
    env["VISIONSERVE_WORKERS"] = extra_env.get("VISIONSERVE_WORKERS", "1")
    for way in MODEL_SOURCES:
        if way not in extra_env:  # the test names the models to serve, not the developer's shell
            env.pop(way, None)
    started = launch_server(env, log_path, host=host, timeout_s=timeout_s)
    return RunningServer(**vars(started), env=extra_env)


def classification_cards() -> dict[str, dict]:
    """Cards on disk, read when the tests start (models/ may change between sessions)."""
    cards = {}
    for card_path in sorted(MODELS_DIR.glob("*/card.json")):
        card = json.loads(card_path.read_text())
        if card.get("task") == "classification":
            cards[card["name"]] = card
    return cards


def import_into_store(bentoml_home: Path, models_dir: Path = MODELS_DIR) -> subprocess.CompletedProcess:
    """`python -m service.model_store import` (what `make serve` runs) into a store of the test's own."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
    return subprocess.run([sys.executable, "-m", "service.model_store", "import", str(models_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# What another checkout (or an older release) leaves in a shared store: the server must not serve it.
FOREIGN_MODEL = "foreign"


def model_copy(source: Path, to: Path, name: str | None = None, extra_bytes: bytes = b"") -> Path:
    """A copy of an exported model folder, renamed and/or with bytes appended to model.onnx (a different checksum,
    the same graph), its card made valid for the new bytes."""
    folder = to / (name or source.name)
    shutil.copytree(source, folder)
    card = json.loads((folder / "card.json").read_text())
    card["name"] = name or card["name"]
    if extra_bytes:
        with open(folder / "model.onnx", "ab") as f:
            f.write(extra_bytes)
        card["sha256"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def newest_version_in_store(bentoml_home: Path, name: str) -> str:
    return (bentoml_home / "models" / name / "latest").read_text().strip()


@pytest.fixture(scope="session")
def store_home(tmp_path_factory) -> Path:
    """A BentoML home whose model store holds models/, imported the way `make serve` does, and then what other
    checkouts put there: a copy of a released classifier under another name, and a second version of that
    classifier (other bytes, imported last, so it is the store's `latest`). No card of models/ names either."""
    home = tmp_path_factory.mktemp("bentoml-home")
    result = import_into_store(home)
    assert result.returncode == 0, result.stderr
    classifier = MODELS_DIR / ("cnn" if "cnn" in classification_cards() else next(iter(classification_cards())))
    elsewhere = tmp_path_factory.mktemp("other-checkout")
    model_copy(classifier, elsewhere, name=FOREIGN_MODEL)
    model_copy(classifier, elsewhere, extra_bytes=b"\0")
    result = import_into_store(home, elsewhere)
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture(scope="session")
def server(tmp_path_factory, store_home) -> RunningServer:
    """The server as `make serve` runs it: the checkout's cards, their models from BentoML's model store."""
    assert classification_cards(), "no classification models in models/"
    cards = {card["name"]: card for card in map(json.loads, (path.read_text() for path in
                                                             sorted(MODELS_DIR.glob("*/card.json"))))}
    running = start_server(tmp_path_factory.mktemp("server") / "server.log",
                           {**TEST_SERVER_LIMITS, "BENTOML_HOME": str(store_home)})
    running.cards_at_start = cards  # every card: the server serves exactly what they name
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def server_url(server) -> str:
    return server.url


@pytest.fixture(scope="session")
def available_models(server_url) -> dict[str, dict]:
    """Model name -> its /models description, for the models the server actually loaded."""
    described = httpx.get(server_url + "/models", timeout=10).json()
    return {m["name"]: m for m in described["models"] if m["status"] == "available" and m["task"] == "classification"}


@pytest.fixture(scope="session")
def fashion_test_images() -> tuple[np.ndarray, np.ndarray]:
    """The first 512 Fashion-MNIST test images, uint8 [N, 1, 28, 28], and their labels."""
    from training.data import load_dataset

    split = load_dataset("fashion-mnist", "test")
    return split.images[:512].numpy(), split.labels[:512].numpy()


@pytest.fixture(scope="session")
def tampered_server(tmp_path_factory, fashion_test_images) -> RunningServer:
    """A second server over a models folder where one model's bytes no longer match its card,
    and with a queue bound of one image so that overload (503) can be provoked deterministically."""
    cards = classification_cards()
    source = MODELS_DIR / next(iter(cards))
    models = tmp_path_factory.mktemp("models")
    for name in ("good", "tampered"):
        shutil.copytree(source, models / name)
        card = json.loads((models / name / "card.json").read_text())
        card["name"] = name
        (models / name / "card.json").write_text(json.dumps(card))
    with open(models / "tampered" / "model.onnx", "ab") as f:
        f.write(b"\0")  # one extra byte: a different checksum, same graph
    running = start_server(tmp_path_factory.mktemp("tampered") / "server.log",
                           {"VISIONSERVE_MODELS_DIR": str(models), "VISIONSERVE_MAX_QUEUED_IMAGES": "1"})
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def generator_models(tmp_path_factory) -> Path:
    """models/-like folder: a released classifier and a tiny conditional DCGAN trained for two batches and
    exported by the real exporter (judged by that classifier), so tests do not need a released generator."""
    work = tmp_path_factory.mktemp("generator")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = subprocess.run([sys.executable, "-m", "training.train_dcgan", "--epochs", "1", "--dry-run",
                            "--g-width", "8", "--d-width", "8", "--embed-dim", "10", "--batch-size", "16",
                            "--no-progress", "--seed", "1", "--out", str(work / "runs")],
                           cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert train.returncode == 0, train.stderr
    (run,) = (work / "runs" / "dcgan").iterdir()
    classifier = next(iter(classification_cards()))
    models = work / "models"
    export = subprocess.run([sys.executable, "-m", "export.generator", "--run", str(run), "--name", "dcgan",
                             "--out", str(models), "--judge", str(MODELS_DIR / classifier), "--per-class", "10",
                             "--parity-samples", "100"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert export.returncode == 0, export.stderr
    shutil.copytree(MODELS_DIR / classifier, models / classifier)
    return models


def model_tasks(models_dir: Path) -> set[str]:
    return {json.loads(card.read_text()).get("task") for card in models_dir.glob("*/card.json")}


@pytest.fixture(scope="session")
def every_task_models(tmp_path_factory, generator_models) -> Path:
    """Every released model, plus a tiny dry-run SegNet and DCGAN where none is released, in one models folder."""
    work = tmp_path_factory.mktemp("every-task-models")
    models = work / "models"
    for card_path in sorted(MODELS_DIR.glob("*/card.json")):
        shutil.copytree(card_path.parent, models / card_path.parent.name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if "segmentation" not in model_tasks(models):
        train = subprocess.run([sys.executable, "-m", "training.train_segnet", "--canvas", "32", "32", "--widths", "8",
                                "16", "--batch-size", "8", "--epochs", "1", "--dry-run",
                                "--train-scenes-per-epoch", "16", "--val-scenes", "8", "--no-progress", "--seed", "1",
                                "--out", str(work / "runs")],
                               cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert train.returncode == 0, train.stderr
        (run,) = (work / "runs" / "segnet").iterdir()
        export = subprocess.run([sys.executable, "-m", "export.segmenter", "--run", str(run), "--name", "segnet",
                                 "--out", str(models), "--parity-scenes", "8", "--parity-size", "32", "48"],
                                cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert export.returncode == 0, export.stderr
    if "generation" not in model_tasks(models):
        shutil.copytree(generator_models / "dcgan", models / "dcgan")
    return models


# Small limits so that each can be crossed cheaply, on the server that holds a model of every task.
EVERY_TASK_LIMITS = {**TEST_SERVER_LIMITS, "VISIONSERVE_MAX_SEGMENT_PIXELS": str(128 * 128),
                     "VISIONSERVE_MAX_SAMPLES": "32", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="session")
def every_task_server(tmp_path_factory, every_task_models) -> RunningServer:
    """One server with a classifier, a segmenter and a generator (the bad-input corpus, the fuzzer and the
    security tests share it), with small limits."""
    running = start_server(tmp_path_factory.mktemp("every-task-server") / "server.log",
                           {**EVERY_TASK_LIMITS, "VISIONSERVE_MODELS_DIR": str(every_task_models)})
    yield running
    stop_server(running)
