"""benchmarks/peers.py's pure logic (the run itself is `make bench-peers`, minutes long, never in CI)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from benchmarks import peers

REPO = Path(__file__).resolve().parent.parent


def test_peer_requirements_are_exact_pins_outside_the_service_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = peers.peer_requirements()
    assert all("==" in pin for pin in requirements)
    names = {pin.split("==")[0].split("[")[0] for pin in requirements}
    assert {"fastapi", "litserve", "onnxruntime-gpu", "numpy", "pillow"} <= names
    service = {pin.split("==")[0].split("[")[0] for pin in project["dependencies"]}
    assert not {"fastapi", "litserve", "uvloop", "httptools"} & service  # peers never reach the service's venv
    assert "litserve" not in (REPO / "bentofile.yaml").read_text()


def test_cpu_sets_are_disjoint_from_four_cores_and_shared_below():
    assert peers.cpu_sets([0, 1]) == ([0, 1], [0, 1], False)
    servers, locust, pinned = peers.cpu_sets(list(range(8)))
    assert pinned and servers == [0, 1, 2, 3, 4, 5] and locust == [6, 7]
    assert not set(servers) & set(locust)


def test_medians_over_rounds():
    runs = [{"req_per_s": r, "p50_ms": 10.0, "p99_ms": p, "errors": 0, "requests": 100} for r, p in
            ((100.0, 50.0), (300.0, 70.0), (200.0, None))]
    assert peers.medians(runs) == {"req_per_s": 200.0, "p50_ms": 10.0, "p99_ms": 60.0, "errors": 0,
                                   "requests": 300, "rounds": 3}
