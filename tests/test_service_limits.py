"""Every limit and bad input gets its 4xx (or 503) in the one error shape, never a 500.

The error mapping is checked in this process, on the ASGI app `bentoml serve` runs (BentoML's own middlewares and
routes around ours) over a released classifier in a real onnxruntime session: a subprocess adds nothing to
it. The app runs with small limits (conftest.TEST_SERVER_LIMITS) so each can be crossed cheaply; the defaults are
checked separately. Bad files, unknown models and bad parameters of every route are cases of the bad-input corpus
(tests/test_bad_inputs.py); a URL sent as an image is tests/test_security.py's.
"""

from __future__ import annotations

import os
import base64
import shutil
from typing import Iterator

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from conftest import MODELS_DIR, TEST_SERVER_LIMITS
from helpers import assert_error, npy, png
from service.config import InferenceConfig, RequestLimits, ServingConfig, available_cores

BODY_LIMIT = int(TEST_SERVER_LIMITS["VISIONSERVE_MAX_BODY_BYTES"])
IMAGE_LIMIT = int(TEST_SERVER_LIMITS["VISIONSERVE_MAX_IMAGES"])
PIXEL_LIMIT = int(TEST_SERVER_LIMITS["VISIONSERVE_MAX_PIXELS"])
FIELD_LIMIT = int(TEST_SERVER_LIMITS["VISIONSERVE_MAX_FIELD_BYTES"])


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[TestClient]:
    """The service in this process, over the released CNN, configured as `bentoml serve` would be by the same
    environment; its start-up (model checks, sessions, warm-up) runs when the client enters.

    One such app per test process: BentoML keeps the current service instance in a global, and its traffic-metrics
    middleware registers Prometheus histograms in the process-wide registry on the first request, so a second
    app's first request fails with DuplicateTimeseries. Tests of other configurations start a server."""
    models = tmp_path_factory.mktemp("in-process-models")
    shutil.copytree(MODELS_DIR / "cnn", models / "cnn")
    environment = {**TEST_SERVER_LIMITS, "VISIONSERVE_MODELS_DIR": str(models),
                   "VISIONSERVE_GC_TUNING": "off"}  # gc.freeze() would reach the whole test process
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        from service.app import VisionService  # imported here: the import checks the configuration, like serve

        with TestClient(VisionService.to_asgi(), base_url="http://127.0.0.1") as client:
            yield client


def post_files(app: TestClient, files: list, data: dict | None = None) -> httpx.Response:
    return app.post("/classify", files=files, data=data or {})


# --- defaults ---------------------------------------------------------------------------------------

def test_default_limits_are_safe():
    limits = RequestLimits.from_environ({})
    assert limits.max_body_bytes == 32 * 1024 * 1024
    assert limits.max_images_per_request == 256
    assert limits.max_pixels_per_image == 40_000_000
    assert limits.max_form_field_bytes == 64 * 1024
    inference = InferenceConfig.from_environ({})
    assert inference.workers == available_cores() and inference.batching  # one worker per usable core
    assert inference.max_queued_images >= limits.max_images_per_request


def test_default_models_configuration():
    assert InferenceConfig.from_environ({}).default_models == {"classification": "cnn"}
    config = InferenceConfig.from_environ({"VISIONSERVE_DEFAULT_MODELS": " classification = resnet, segmentation=segnet"})
    assert config.default_models == {"classification": "resnet", "segmentation": "segnet"}
    assert InferenceConfig.from_environ({"VISIONSERVE_DEFAULT_MODELS": ""}).default_models == {}
    for bad in ("resnet", "classification=", "colouring=x", "classification=a,classification=b"):
        with pytest.raises(ValueError, match="DEFAULT_MODELS"):
            InferenceConfig.from_environ({"VISIONSERVE_DEFAULT_MODELS": bad})


def test_limits_and_threads_come_from_the_environment():
    config = ServingConfig.from_environ({"VISIONSERVE_MAX_IMAGES": "7", "VISIONSERVE_WORKERS": "2",
                                         "VISIONSERVE_THREADS": "1", "VISIONSERVE_BATCHING": "off"})
    assert config.limits.max_images_per_request == 7
    assert (config.inference.workers, config.inference.intra_op_threads, config.inference.batching) == (2, 1, False)
    with pytest.raises(ValueError):
        ServingConfig.from_environ({"VISIONSERVE_MAX_IMAGES": "0"})


# --- size limits (413) ------------------------------------------------------------------------------

def test_body_over_the_limit_by_content_length(app):
    big = [("images", ("big.png", b"\0" * (BODY_LIMIT + 1), "image/png"))]
    assert_error(post_files(app, big), 413, "body_too_large")


def test_streamed_body_over_the_limit(app):
    def chunks():  # no Content-Length: the middleware must count what it reads
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b"\0" * 65536

    assert_error(app.post("/classify/tensor", content=chunks()), 413, "body_too_large")


def test_too_many_images_multipart(app):
    tiny = png()
    files = [("images", (f"{i}.png", tiny, "image/png")) for i in range(IMAGE_LIMIT + 1)]
    assert_error(post_files(app, files), 413, "too_many_images", "images")


def test_too_many_images_base64_and_tensor(app):
    encoded = base64.b64encode(png()).decode()
    assert_error(app.post("/classify/json", json={"images": [encoded] * (IMAGE_LIMIT + 1)}), 413, "too_many_images",
                 "images")
    response = app.post("/classify/tensor", content=npy(np.zeros((IMAGE_LIMIT + 1, 28, 28), np.uint8)))
    assert_error(response, 413, "too_many_images", "body")


def test_too_many_pixels(app):
    side = int(PIXEL_LIMIT ** 0.5) + 1
    wide = png(np.zeros((side, side), np.uint8))
    assert_error(post_files(app, [("images", ("wide.png", wide, "image/png"))]), 413, "too_many_pixels", "images[0]")


def test_oversized_text_field(app):
    response = post_files(app, [("images", ("a.png", png(), "image/png"))], {"model": "x" * (FIELD_LIMIT + 1)})
    assert_error(response, 413, "field_too_large")


# --- parameters and tensors (422) -------------------------------------------------------------------

@pytest.mark.parametrize("top_k", ["0", "11", "-1", "three"])
def test_top_k_out_of_range_is_422(app, top_k):
    files = [("images", ("a.png", png(), "image/png"))]
    assert_error(post_files(app, files, {"top_k": top_k}), 422, "invalid_parameter", "top_k")
    response = app.post(f"/classify/tensor?top_k={top_k}", content=npy(np.zeros((1, 28, 28), np.uint8)))
    assert_error(response, 422, "invalid_parameter", "top_k")


def test_invert_must_be_auto_true_or_false(app):
    files = [("images", ("a.png", png(), "image/png"))]
    assert_error(post_files(app, files, {"invert": "maybe"}), 422, "invalid_parameter", "invert")


@pytest.mark.parametrize("array", [
    np.zeros((2, 28, 28), np.float32),       # wrong dtype
    np.zeros((2, 28, 27), np.uint8),         # wrong size
    np.zeros((2, 3, 28, 28), np.uint8),      # wrong channels
    np.zeros((28, 28), np.uint8),            # no batch axis
], ids=["float32", "28x27", "3-channels", "no-batch"])
def test_wrong_tensor_dtype_or_shape_is_422(app, array):
    assert_error(app.post("/classify/tensor", content=npy(array)), 422, "invalid_tensor", "body")


def test_non_npy_body_and_pickles_are_422(app):
    assert_error(app.post("/classify/tensor", content=b"not numpy"), 422, "invalid_tensor")
    pickled = npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert_error(app.post("/classify/tensor", content=pickled), 422, "invalid_tensor")


def test_wrong_method_and_path_are_json_errors(app):
    assert_error(app.get("/classify"), 405, "method_not_allowed")
    assert_error(app.post("/classify/nothing-here"), 404, "not_found")


def test_json_body_errors_name_the_field(app):
    assert_error(app.post("/classify/json", json={"images": [123]}), 422, "invalid_parameter", "images[0]")
    assert_error(app.post("/classify/json", content=b"null"), 422, "invalid_parameter", "body")


def test_bad_image_late_in_a_large_request_is_named(app):
    # One bad file fails the whole request with 4xx, naming the image, and nothing is half-answered.
    files = [("images", (f"{i}.png", png(), "image/png")) for i in range(40)]
    files[35] = ("images", ("bad.png", b"not an image at all", "image/png"))
    assert_error(post_files(app, files), 415, "unsupported_image", "images[35]")
    assert post_files(app, files[:35]).status_code == 200


# --- checksum and overload (a real server: conftest's tampered_server, shared with other files) -------------

def classify_on(server, files: list, data: dict) -> httpx.Response:
    return httpx.post(server.url + "/classify", files=files, data=data, timeout=60)


@pytest.mark.server
def test_model_with_wrong_checksum_is_refused_and_others_serve(tampered_server):
    described = {m["name"]: m for m in httpx.get(tampered_server.url + "/models", timeout=10).json()["models"]}
    assert described["tampered"]["status"] == "unavailable"
    assert "sha256 mismatch" in described["tampered"]["unavailable_reason"]
    assert described["good"]["status"] == "available"
    assert "model tampered refused" in tampered_server.log()
    files = [("images", ("a.png", png(), "image/png"))]
    assert classify_on(tampered_server, files, {"model": "good"}).status_code == 200
    assert_error(classify_on(tampered_server, files, {"model": "tampered"}), 503, "model_unavailable", "model")


@pytest.mark.server
def test_overload_is_503_with_retry_after(tampered_server):
    # The tampered server queues at most one image: a two-image request is over the bound.
    response = httpx.post(tampered_server.url + "/classify/tensor?model=good",
                          content=npy(np.zeros((2, 28, 28), np.uint8)), timeout=30)
    assert_error(response, 503, "overloaded")
    assert int(response.headers["retry-after"]) >= 1


def test_workers_follow_the_usable_cores_unless_set(tmp_path):
    from service import config as config_module

    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU quota: one whole core
    assert config_module.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert config_module.cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert config_module.cgroup_cpu_limit(v1) == 3.0
    assert config_module.cgroup_cpu_limit(tmp_path / "none") is None

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert config_module.available_cores(tmp_path) == 1
    affinity = len(os.sched_getaffinity(0))
    assert config_module.available_cores(tmp_path / "none") == affinity
    assert config_module.workers_from_environment({}) == config_module.available_cores()
    assert config_module.workers_from_environment({"VISIONSERVE_WORKERS": "1"}) == 1


def test_tracing_is_off_unless_asked_for():
    from service.config import tracing_from_environment

    assert tracing_from_environment({}) == {"excluded_urls": [".*"]}  # BentoML's middleware passes every URL through
    assert tracing_from_environment({"VISIONSERVE_TRACING": "on"}) == {}
    with pytest.raises(ValueError, match="TRACING"):
        tracing_from_environment({"VISIONSERVE_TRACING": "sometimes"})
