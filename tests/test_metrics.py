"""Per-model metrics on /metrics of a server with two workers (the only two-worker server of the suite: two small
classifiers, ready in about 6 s on 2 cores), and the request id in its access log line."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODELS_DIR, start_server, stop_server
from helpers import png

CPU = "CPUExecutionProvider"
CALLS = {"cnn": (20, 1), "mlp": (6, 3)}  # model -> (requests, images per request)


@pytest.fixture(scope="module")
def two_worker_server(tmp_path_factory):
    models = tmp_path_factory.mktemp("metrics-models")
    for name in CALLS:
        shutil.copytree(MODELS_DIR / name, models / name)
    running = start_server(tmp_path_factory.mktemp("metrics-server") / "server.log",
                           {"VISIONSERVE_MODELS_DIR": str(models), "VISIONSERVE_WORKERS": "2",
                            "VISIONSERVE_ACCESS_LOG": "on", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    yield running
    stop_server(running)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, for our metrics."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text)
            if family.name.startswith("visionserve_") for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_per_model_counts_batches_and_provider_are_the_servers_across_two_workers(two_worker_server):
    url = two_worker_server.url
    scored, flagged = dict.fromkeys(CALLS, 0), dict.fromkeys(CALLS, 0)
    for model, (requests, images) in CALLS.items():
        for i in range(requests):  # a fresh connection each: the two workers share them
            uploads = [("images", (f"{k}.png", png(np.full((28, 28), k, np.uint8)), "image/png"))
                       for k in range(images)]
            response = httpx.post(url + "/classify", files=uploads,
                                  data={"model": model}, headers={"X-Request-ID": f"m-{model}-{i}"}, timeout=30)
            assert response.status_code == 200, response.text
            answers = [p.get("ood") for p in response.json()["predictions"]]
            scored[model] += sum(a is not None for a in answers)
            flagged[model] += sum(bool(a and a["flag"]) for a in answers)
    assert httpx.post(url + "/classify", files={"images": ("a.png", png(), "image/png")},
                      data={"model": "cnn", "top_k": "99"}, timeout=30).status_code == 422
    assert httpx.post(url + "/classify", files={"images": ("a.png", png(), "image/png")},
                      data={"model": "nonesuch"}, timeout=30).status_code == 404

    # Each worker's own batch counts, from GET /models on fresh connections until both have answered.
    batches_by_worker: dict[int, dict] = {}
    for _ in range(60):
        serving = httpx.get(url + "/models", timeout=10).json()["serving"]
        batches_by_worker[serving["worker_pid"]] = serving["batch_sizes_seen"]
        if len(batches_by_worker) == 2:
            break
    assert len(batches_by_worker) == 2, "one worker never answered"
    found = samples(httpx.get(url + "/metrics", timeout=10).text)

    for model, (requests, images) in CALLS.items():
        assert value(found, "visionserve_requests_total", route="/classify", model=model, status="200") == requests
        assert value(found, "visionserve_images_total", model=model) == requests * images
        assert value(found, "visionserve_queue_wait_seconds_count", model=model) == requests
        total = sum(sum(worker.get(model, {}).values()) for worker in batches_by_worker.values())
        assert value(found, "visionserve_batch_size_count", model=model) == total
        assert value(found, "visionserve_inference_seconds_count", model=model) == total
        assert value(found, "visionserve_batch_size_sum", model=model) == requests * images
        assert value(found, "visionserve_queued_images", model=model) == 0
        # The OOD answers /classify gave (uniform images: some flagged), counted per model.
        assert value(found, "visionserve_ood_scored_images_total", model=model) == scored[model] == requests * images
        assert value(found, "visionserve_ood_flagged_images_total", model=model) == flagged[model]
        card = json.loads((MODELS_DIR / model / "card.json").read_text())
        assert value(found, "visionserve_model_info", model=model, version=card["version"], sha256=card["sha256"],
                     provider=CPU) == 1
    # Both workers ran classification batches, so the counts above are summed over workers, not one worker's.
    assert all(sum(sum(sizes.values()) for sizes in worker.values()) > 0 for worker in batches_by_worker.values())
    # Errors by route, status and the error body's code; a model the server does not have is no label.
    assert value(found, "visionserve_request_errors_total", route="/classify", model="", status="422",
                 code="invalid_parameter") == 1
    assert value(found, "visionserve_request_errors_total", route="/classify", model="", status="404",
                 code="unknown_model") == 1
    assert not any(dict(labels).get("model") == "nonesuch" for _, labels in found)
    assert value(found, "visionserve_request_duration_seconds_count", route="/classify", model="cnn") == CALLS["cnn"][0]


def test_the_access_log_line_names_the_request_id(two_worker_server):
    response = httpx.get(two_worker_server.url + "/models/nonesuch", headers={"X-Request-ID": "log-me.1"}, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["request_id"] == "log-me.1"
    generated = httpx.get(two_worker_server.url + "/models", timeout=10).headers["x-request-id"]
    for _ in range(20):  # the line is written just after the answer is sent
        log = two_worker_server.log()
        if f"request_id={generated}" in log:
            break
        time.sleep(0.1)
    lines = [line for line in log.splitlines() if "path=/models/nonesuch" in line]
    assert lines and "status=404" in lines[-1] and "request_id=log-me.1" in lines[-1], lines
    assert any("path=/models," in line and f"request_id={generated}" in line for line in log.splitlines())
