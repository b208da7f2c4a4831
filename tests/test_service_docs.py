"""docs/SERVING.md's examples run as written (only the port differs), `bentoml build` packs the models, and the
image built from that bento is what deploy/ expects (and, where a container runtime works, serves)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
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
        assert any(key in answer for key in ("predictions", "models", "embeddings", "results", "reconstructions"))


def test_python_client_example_runs_as_written(example_dir, server):
    output = run_python(example_blocks("python")[1], example_dir, server.url)
    lines = output.strip().splitlines()
    assert lines[0].startswith("0 ") and lines[1].startswith("1 ")  # one line per image, in order
    assert lines[-1].startswith("[")


def test_every_relative_link_in_the_docs_resolves_inside_the_repository():
    """README.md and docs/*.md link to files that exist here, never outside the checkout (web addresses and
    in-page anchors are not followed; links inside fenced code blocks are not links)."""
    broken = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or not path.is_relative_to(REPO):
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, broken


@pytest.fixture(scope="module")
def built_bento(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """As `make bento` does: import models/ into a store of the test's own, then build. One build for the module."""
    home = tmp_path_factory.mktemp("bento-home") / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    assert import_into_store(home).returncode == 0
    build = subprocess.run([sys.executable, "-m", "service.model_store", "build-bento", "models"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr + build.stdout
    (bento,) = [p for p in (home / "bentos" / "visionserve").iterdir() if p.is_dir() and not p.is_symlink()]
    return bento, env


def test_bentoml_build_packs_service_and_models(built_bento):
    """The bento pins each card's own tag, never `latest`, and the service inside it serves those tags without the
    checkout's models/."""
    bento, env = built_bento
    assert "models" not in yaml.safe_load((REPO / "bentofile.yaml").read_text())  # the template names none
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


# What `bentoml containerize` builds from: BentoML's own build context (the bento plus the store's copies of its
# models) and its Dockerfile, made in a subprocess because BENTOML_HOME is fixed when bentoml is imported.
CONTAINER_CONTEXT = """
import hashlib, json, sys
from pathlib import Path
import bentoml
from bentoml._internal.container import construct_containerfile
with construct_containerfile(bentoml.bentos.get(sys.argv[1])) as (context, dockerfile):
    models = {f"{p.parent.parent.name}:{p.parent.name}": hashlib.sha256(p.read_bytes()).hexdigest()
              for p in Path(context, "models").glob("*/*/model.onnx")}
    print(json.dumps({"dockerfile": Path(context, dockerfile).read_text(), "models": models}))
"""


def test_image_dockerfile_has_what_the_deployment_expects(built_bento):
    """The generated Dockerfile and build context: Debian's slim Python 3.11, the bentofile's pinned packages (no
    torch), every released model by its card's checksum, a non-root user whose uid the manifests run as, the port
    they expose and the listening host from the environment."""
    bento, env = built_bento
    result = subprocess.run([sys.executable, "-c", CONTAINER_CONTEXT, f"visionserve:{bento.name}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    context = json.loads(result.stdout)
    dockerfile = context["dockerfile"]
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert f"FROM python:{bentofile['docker']['python_version']}-slim" in dockerfile
    assert bentofile["docker"]["python_version"] == "3.11"
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().split()
    assert all("==" in line for line in requirements) and set(bentofile["python"]["packages"]) <= set(requirements)
    cards = [json.loads(path.read_text()) for path in sorted((REPO / "models").glob("*/card.json"))]
    assert context["models"] == {f"{card['name']}:{card['sha256'][:16]}": card["sha256"] for card in cards}
    deployment = yaml.safe_load((REPO / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    uid = re.search(r"^ARG BENTO_USER_UID=(\d+)$", dockerfile, re.M).group(1)
    assert "\nUSER bentoml\n" in dockerfile and int(uid) == pod["securityContext"]["runAsUser"] != 0
    assert "ENV BENTOML_HOME=/home/bentoml/" in dockerfile  # the emptyDir for its Prometheus files lies under it
    port = pod["containers"][0]["ports"][0]["containerPort"]
    assert f"\nEXPOSE {port}\n" in dockerfile
    assert "ARG BENTOML_HOST=0.0.0.0" in dockerfile and "ENV BENTOML_HOST=$BENTOML_HOST" in dockerfile


def container_runtime() -> tuple[str | None, str]:
    """docker or podman if one can run containers here (its daemon answers), else None and why not."""
    reasons = []
    for tool in ("docker", "podman"):
        if shutil.which(tool) is None:
            reasons.append(f"{tool} not installed")
            continue
        try:
            info = subprocess.run([tool, "info"], capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            reasons.append(f"`{tool} info` did not answer in 10 s")
            continue
        if info.returncode == 0:
            return tool, ""
        last_line = ((info.stderr or info.stdout).strip().splitlines() or ["no output"])[-1]
        reasons.append(f"`{tool} info` failed: {last_line}")
    return None, "; ".join(reasons)


def test_image_builds_runs_and_classifies(request):
    """What `make image` runs (bentoml containerize), then the image run as the Deployment runs it (non-root, read-only root, /tmp writable) and
    one image classified through it. Skipped, with the reason, where no container runtime works."""
    tool, why_not = container_runtime()
    if tool is None:
        pytest.skip(f"no container runtime can run here: {why_not}")
    bento, env = request.getfixturevalue("built_bento")
    image = "visionserve:test-" + bento.name
    built = subprocess.run([sys.executable, "-m", "bentoml", "containerize", f"visionserve:{bento.name}", "--backend",
                            tool, "-t", image], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stderr[-4000:]
    run = subprocess.run([tool, "run", "-d", "--rm", "--read-only", "--tmpfs", "/tmp",
                          "--tmpfs", "/home/bentoml/prometheus_multiproc_dir", "-p", "127.0.0.1::3000", image],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    container = run.stdout.strip()
    try:
        port = subprocess.run([tool, "port", container, "3000/tcp"], capture_output=True, text=True,
                              timeout=30).stdout.split(":")[-1].strip()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        pixels = np.zeros((1, 1, 28, 28), np.uint8)
        buffer = io.BytesIO()
        np.save(buffer, pixels)
        answer = httpx.post(url + "/classify/tensor", content=buffer.getvalue(),
                            headers={"Content-Type": "application/octet-stream"}, timeout=30)
        assert answer.status_code == 200, answer.text
    finally:
        subprocess.run([tool, "rm", "-f", container], capture_output=True, timeout=60)
