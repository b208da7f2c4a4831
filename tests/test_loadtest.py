"""The load-test driver (`make loadtest`, loadtests/run.py) end to end: real servers, real Locust, no mocks.

Runs in about 90 s: a tiny SegNet and a tiny DCGAN stand in for a segmenter and a generator where models/
holds none (conftest's every_task_models), so the smoke run always covers every endpoint. The other tests
share one classifier-only server started here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import MODELS_DIR, REPO, free_port, model_tasks, start_server, stop_server

pytestmark = pytest.mark.server

# Every command here shares 2 cores with the server under test: one OpenMP thread, no busy-waiting.
QUIET_CPU = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "BENTOML_DO_NOT_TRACK": "True"}
REPORT_FILES = ("locust_stats.csv", "locust_failures.csv", "locust.json", "locust.html", "locust.log",
                "latency_percentiles.png", "summary.json", "summary.md")
ENDPOINTS_OF_TASK = {
    "classification": {"POST /classify", "POST /classify [batch16]", "POST /classify/tensor [batch16]"},
    "segmentation": {"POST /segment"},
    "generation": {"POST /generate"},
    "reconstruction": {"POST /reconstruct"},
}
# Served, but with no Locust user yet (loadtests/scenarios.py): the driver must still run, loading the others.
NOT_LOAD_TESTED: set[str] = set()


def released_models(task: str | None = None) -> list[Path]:
    folders = []
    for card_path in sorted(MODELS_DIR.glob("*/card.json")):
        if task is None or json.loads(card_path.read_text()).get("task") == task:
            folders.append(card_path.parent)
    return folders


def run_quietly(command: list[str], env: dict[str, str] | None = None, timeout: float = 300,
                cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **QUIET_CPU, **(env or {})})


def run_driver(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_quietly([sys.executable, "-m", "loadtests.run", *args], env, timeout=240)


def only_report(out: Path) -> Path:
    (report,) = out.iterdir()
    return report


@pytest.fixture(scope="module")
def classifier_server(tmp_path_factory):
    """A running server with the released classifiers only: the driver must use it, not start another."""
    models = tmp_path_factory.mktemp("classifiers")
    for folder in released_models("classification"):
        shutil.copytree(folder, models / folder.name)
    running = start_server(tmp_path_factory.mktemp("classifier-server") / "server.log",
                           {**QUIET_CPU, "VISIONSERVE_MODELS_DIR": str(models)})
    yield running
    stop_server(running)


def test_smoke_load_on_a_server_the_driver_starts_meets_the_objectives(every_task_models, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = run_driver("--scenario", "available", "--users", "8", "--duration", "20s", "--host", url,
                        "--out", str(tmp_path), env={"VISIONSERVE_MODELS_DIR": str(every_task_models)})
    assert result.returncode == 0, result.stdout + result.stderr
    report = only_report(tmp_path)
    for name in REPORT_FILES:
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    summary = json.loads((report / "summary.json").read_text())
    tasks = model_tasks(every_task_models)
    assert tasks <= set(ENDPOINTS_OF_TASK) | NOT_LOAD_TESTED, tasks
    expected = set().union(*(ENDPOINTS_OF_TASK[task] for task in tasks - NOT_LOAD_TESTED))
    assert set(summary["run"]["endpoints"]) == expected
    assert summary["run"]["server_started"] and summary["passed"] and not summary["missed"]
    for endpoint in expected:
        measured = summary["endpoints"][endpoint]
        assert measured["requests"] > 0 and measured["failures"] == 0, measured
    assert {r["endpoint"] for r in summary["objectives"]} == expected  # every endpoint was judged
    assert "server.log" in os.listdir(report)
    with pytest.raises(OSError):  # the driver stopped the server it started
        urllib.request.urlopen(url + "/readyz", timeout=2)


def test_an_unreachable_objective_fails_the_run_and_is_named(classifier_server, tmp_path):
    slo = tmp_path / "slo.yaml"
    slo.write_text("objectives:\n  POST /classify: {p99_ms: 0.001, max_error_rate: 0.0}\n")
    result = run_driver("--scenario", "smoke", "--users", "2", "--duration", "3s", "--host", classifier_server.url,
                        "--slo", str(slo), "--out", str(tmp_path / "reports"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "POST /classify p99_ms <= 0.001" in result.stderr and "MISSED" in result.stderr
    assert "max_error_rate" not in result.stderr  # only what was missed is listed as missed
    summary = json.loads((only_report(tmp_path / "reports") / "summary.json").read_text())
    assert not summary["passed"] and not summary["run"]["server_started"]


def test_distributed_run_with_two_workers(classifier_server, tmp_path):
    result = run_driver("--workers", "2", "--scenario", "classify", "--users", "8", "--duration", "10s",
                        "--host", classifier_server.url, "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = only_report(tmp_path)
    assert "to 2 ready workers" in (report / "locust.log").read_text()
    assert (report / "worker-1.log").is_file() and (report / "worker-2.log").is_file()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["run"]["locust_workers"] == 2
    for endpoint in ENDPOINTS_OF_TASK["classification"]:
        assert summary["endpoints"][endpoint]["requests"] > 0 and summary["endpoints"][endpoint]["failures"] == 0


def test_users_of_a_task_the_server_lacks_fail_loudly(classifier_server, tmp_path):
    """Locust itself (at its init event) and the driver refuse /segment users when no segmenter is served."""
    locust = run_quietly([str(Path(sys.executable).parent / "locust"), "--config", "loadtests/locust.conf",
                          "--host", classifier_server.url, "--scenario", "segment", "--run-time", "3s"], timeout=60)
    assert locust.returncode == 1
    assert "POST /segment (tag segment) needs a segmentation model" in locust.stderr
    driver = run_driver("--scenario", "segment", "--host", classifier_server.url, "--out", str(tmp_path))
    assert driver.returncode == 2 and "needs a segmentation model" in driver.stderr
