"""docs/SERVING.md's examples run as written (only the port differs), and `bentoml build` packs the models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import import_into_store

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "SERVING.md"
DOC_ADDRESS = "127.0.0.1:3000"


def example_blocks(language: str) -> list[str]:
    """Fenced blocks of `language` in the doc's "## Examples" section, in order."""
    text = DOC.read_text()
    section = text.split("## Examples", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory, server) -> Path:
    """A working directory where the doc's first Python block has written its sample files."""
    workdir = tmp_path_factory.mktemp("doc-examples")
    setup = example_blocks("python")[0]
    run_python(setup, workdir, server.url)
    for name in ("boot.png", "pullover.png", "batch.npy"):
        assert (workdir / name).is_file(), name
    return workdir


def run_python(code: str, workdir: Path, url: str) -> str:
    code = code.replace(DOC_ADDRESS, url.removeprefix("http://"))
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_doc_has_examples():
    assert len(example_blocks("python")) >= 2 and example_blocks("sh")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_run_as_written(example_dir, server):
    commands = [line for block in example_blocks("sh") for line in block.splitlines() if line.startswith("curl")]
    assert len(commands) >= 4
    for command in commands:
        result = subprocess.run(["bash", "-c", command.replace(DOC_ADDRESS, server.url.removeprefix("http://"))],
                                cwd=example_dir, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        answer = json.loads(result.stdout)
        assert "error" not in answer, (command, answer)
        assert "predictions" in answer or "models" in answer


def test_python_client_example_runs_as_written(example_dir, server):
    output = run_python(example_blocks("python")[1], example_dir, server.url)
    lines = output.strip().splitlines()
    assert lines[0].startswith("0 ") and lines[1].startswith("1 ")  # one line per image, in order
    assert lines[-1].startswith("[")


def test_bentoml_build_packs_service_and_models(tmp_path):
    """As `make bento` does: import models/ into the store, then build; the bento pins each card's own tag, never
    `latest`, and the service inside it serves those tags without the checkout's models/."""
    home = tmp_path / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    assert import_into_store(home).returncode == 0
    assert "models" not in yaml.safe_load((REPO / "bentofile.yaml").read_text())  # the template names none
    build = subprocess.run([sys.executable, "-m", "service.model_store", "build-bento", "models"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr + build.stdout
    (bento,) = [p for p in (home / "bentos" / "visionserve").iterdir() if p.is_dir()]
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    # The image listens on its own interfaces (the service alone defaults to loopback, unreachable there).
    assert "ARG BENTOML_HOST=0.0.0.0" in dockerfile and "ARG VISIONSERVE_WORKERS=1" in dockerfile
    assert (bento / "src" / "service" / "classify.py").is_file() and not (bento / "src" / "models").exists()
    packed = [entry["tag"] for entry in yaml.safe_load((bento / "bento.yaml").read_text())["models"]]
    cards = [json.loads(path.read_text()) for path in sorted((REPO / "models").glob("*/card.json"))]
    assert sorted(packed) == sorted(f"{card['name']}:{card['sha256'][:16]}" for card in cards)
    # What the bento's service would serve: its pinned tags, named by its bento.yaml.
    served = subprocess.run([sys.executable, "-m", "service.model_store", "list"], cwd=bento / "src", env=env,
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 0, served.stderr
    assert sorted(line.split()[0] for line in served.stdout.splitlines()) == sorted(packed)
    assert all(f"bento: {bento / 'bento.yaml'}" in line for line in served.stdout.splitlines())
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch" not in requirements and "onnxruntime-gpu==" in requirements
