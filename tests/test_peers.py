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
    assert not {"fastapi", "litserve"} & service  # peers never reach the service's venv
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
                                   "requests": 300, "rounds": 3, "sequential_ms": None}


def test_sequential_target_is_served_time_over_floor_plus_raw_model():
    def row(*sequential):
        return {"median": peers.medians([{"req_per_s": 1.0, "p50_ms": 1.0, "p99_ms": 1.0, "errors": 0, "requests": 1,
                                          "sequential_ms": value} for value in sequential])}
    results = {"peers": {"visionserve": row(1.1, 1.3, 1.2), "http-floor": row(0.5, 0.6, 0.7)}, "raw_model_ms": 0.2}
    target = peers.sequential_target(results)
    assert target == {"served_ms": 1.2, "floor_ms": 0.6, "raw_model_ms": 0.2, "ratio": 1.5, "target": 1.5}
    assert peers.sequential_target({**results, "raw_model_ms": None}) is None  # run with --sequential 0
    assert peers.sequential_target({"peers": {"visionserve": row(1.0)}, "raw_model_ms": 0.2}) is None  # no floor


def test_folder_of_links_exactly_the_named_models_and_can_be_called_again(tmp_path):
    from loadtests.server import folder_of

    sources = tmp_path / "models"
    for name in ("cnn", "mlp"):
        (sources / name).mkdir(parents=True)
        (sources / name / "card.json").write_text("{}")
    folder = folder_of([sources / "cnn"], tmp_path / "served" / "models")
    assert folder_of([sources / "cnn"], folder) == folder  # a second round finds its link in place
    assert sorted(p.name for p in folder.iterdir()) == ["cnn"]
    assert (folder / "cnn").resolve() == (sources / "cnn").resolve() and (folder / "cnn" / "card.json").is_file()
