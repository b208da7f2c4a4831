"""Every limit and bad input gets its 4xx (or 503) in the one error shape, never a 500.

The test server runs with small limits (conftest.TEST_SERVER_LIMITS) so each can be crossed cheaply;
the defaults are checked separately.
"""

from __future__ import annotations

import os
import base64
import io
import socket
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from service.config import InferenceConfig, RequestLimits, ServingConfig, available_cores

pytestmark = pytest.mark.server


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = ...) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"], body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if field is not ...:
        assert body["error"]["field"] == field, body
    return body["error"]


def png(size=(28, 28), mode="L", color=0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def post_files(url: str, files: list, data: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/classify", files=files, data=data or {}, timeout=60)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


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

def test_body_over_the_limit_by_content_length(server):
    limit = int(server.env["VISIONSERVE_MAX_BODY_BYTES"])
    big = [("images", ("big.png", b"\0" * (limit + 1), "image/png"))]
    assert_error(post_files(server.url, big), 413, "body_too_large")


def test_streamed_body_over_the_limit(server):
    limit = int(server.env["VISIONSERVE_MAX_BODY_BYTES"])

    def chunks():  # no Content-Length: the middleware must count while streaming
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    response = httpx.post(server.url + "/classify/tensor", content=chunks(), timeout=60)
    assert_error(response, 413, "body_too_large")


def test_too_many_images_multipart(server):
    limit = int(server.env["VISIONSERVE_MAX_IMAGES"])
    tiny = png()
    files = [("images", (f"{i}.png", tiny, "image/png")) for i in range(limit + 1)]
    assert_error(post_files(server.url, files), 413, "too_many_images", "images")


def test_too_many_images_base64_and_tensor(server):
    limit = int(server.env["VISIONSERVE_MAX_IMAGES"])
    encoded = base64.b64encode(png()).decode()
    response = httpx.post(server.url + "/classify/json", json={"images": [encoded] * (limit + 1)}, timeout=60)
    assert_error(response, 413, "too_many_images", "images")
    response = httpx.post(server.url + "/classify/tensor", content=npy(np.zeros((limit + 1, 28, 28), np.uint8)),
                          timeout=60)
    assert_error(response, 413, "too_many_images", "body")


def test_too_many_pixels(server):
    limit = int(server.env["VISIONSERVE_MAX_PIXELS"])
    side = int(limit ** 0.5) + 1
    assert_error(post_files(server.url, [("images", ("wide.png", png((side, side)), "image/png"))]),
                 413, "too_many_pixels", "images[0]")


def test_decompression_bomb_is_refused_before_decoding(server):
    bomb = png((20_000, 20_000))  # 400 MP of zeros compress to a few hundred KB
    assert len(bomb) < int(server.env["VISIONSERVE_MAX_BODY_BYTES"])
    assert_error(post_files(server.url, [("images", ("bomb.png", bomb, "image/png"))]), 413, "too_many_pixels")


def test_oversized_text_field(server):
    limit = int(server.env["VISIONSERVE_MAX_FIELD_BYTES"])
    response = post_files(server.url, [("images", ("a.png", png(), "image/png"))], {"model": "x" * (limit + 1)})
    assert_error(response, 413, "field_too_large")


# --- bad files (415 / 400 / 422) --------------------------------------------------------------------

def test_unsupported_file_is_415(server):
    files = [("images", ("notes.txt", b"just some text, not an image", "text/plain"))]
    assert_error(post_files(server.url, files), 415, "unsupported_image", "images[0]")


def test_corrupt_image_is_400(server):
    truncated = png((64, 64), color=128)[:60]  # a valid PNG signature and header, then nothing
    assert_error(post_files(server.url, [("images", ("cut.png", truncated, "image/png"))]), 400, "corrupt_image",
                 "images[0]")


def test_string_in_file_field_is_refused_and_never_fetched(server):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(1.5)
    fetched = []

    def watch():
        try:
            connection, _ = listener.accept()
            fetched.append(True)
            connection.close()
        except OSError:
            pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/secret.png"
    response = httpx.post(server.url + "/classify", data={"images": url}, files=[("other", ("x", b"x"))], timeout=30)
    watcher.join()
    listener.close()
    assert_error(response, 422, "not_a_file", "images")
    assert not fetched, "the server connected to a URL sent in a file field"


def test_missing_images_and_wrong_content_type(server):
    assert_error(post_files(server.url, [("other", ("a.png", png(), "image/png"))]), 422, "missing_images")
    assert_error(httpx.post(server.url + "/classify", json={"images": []}, timeout=30), 415,
                 "unsupported_media_type")


def test_invalid_base64_and_json(server):
    assert_error(httpx.post(server.url + "/classify/json", json={"images": ["%%%not base64"]}, timeout=30),
                 400, "invalid_base64", "images[0]")
    assert_error(httpx.post(server.url + "/classify/json", content=b"{not json", timeout=30), 400, "invalid_json")
    assert_error(httpx.post(server.url + "/classify/json", json={"images": []}, timeout=30), 422,
                 "invalid_parameter", "images")


# --- parameters (404 / 422) -------------------------------------------------------------------------

def test_unknown_model_is_404(server):
    files = [("images", ("a.png", png(), "image/png"))]
    assert_error(post_files(server.url, files, {"model": "no-such-model"}), 404, "unknown_model", "model")
    assert_error(httpx.get(server.url + "/models/no-such-model", timeout=10), 404, "unknown_model")
    response = httpx.post(server.url + "/classify/tensor?model=no-such-model",
                          content=npy(np.zeros((1, 28, 28), np.uint8)), timeout=30)
    assert_error(response, 404, "unknown_model", "model")


@pytest.mark.parametrize("top_k", ["0", "11", "-1", "three"])
def test_top_k_out_of_range_is_422(server, top_k):
    files = [("images", ("a.png", png(), "image/png"))]
    assert_error(post_files(server.url, files, {"top_k": top_k}), 422, "invalid_parameter", "top_k")
    response = httpx.post(f"{server.url}/classify/tensor?top_k={top_k}", content=npy(np.zeros((1, 28, 28), np.uint8)),
                          timeout=30)
    assert_error(response, 422, "invalid_parameter", "top_k")


def test_invert_must_be_auto_true_or_false(server):
    files = [("images", ("a.png", png(), "image/png"))]
    assert_error(post_files(server.url, files, {"invert": "maybe"}), 422, "invalid_parameter", "invert")


@pytest.mark.parametrize("array", [
    np.zeros((2, 28, 28), np.float32),       # wrong dtype
    np.zeros((2, 28, 27), np.uint8),         # wrong size
    np.zeros((2, 3, 28, 28), np.uint8),      # wrong channels
    np.zeros((28, 28), np.uint8),            # no batch axis
], ids=["float32", "28x27", "3-channels", "no-batch"])
def test_wrong_tensor_dtype_or_shape_is_422(server, array):
    response = httpx.post(server.url + "/classify/tensor", content=npy(array), timeout=30)
    assert_error(response, 422, "invalid_tensor", "body")


def test_non_npy_body_and_pickles_are_422(server):
    assert_error(httpx.post(server.url + "/classify/tensor", content=b"not numpy", timeout=30), 422, "invalid_tensor")
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert_error(httpx.post(server.url + "/classify/tensor", content=buffer.getvalue(), timeout=30), 422,
                 "invalid_tensor")


def test_wrong_method_and_path_are_json_errors(server):
    assert_error(httpx.get(server.url + "/classify", timeout=10), 405, "method_not_allowed")
    assert_error(httpx.post(server.url + "/classify/nothing-here", timeout=10), 404, "not_found")


def test_json_body_errors_name_the_field(server):
    assert_error(httpx.post(server.url + "/classify/json", json={"images": [123]}, timeout=10), 422,
                 "invalid_parameter", "images[0]")
    assert_error(httpx.post(server.url + "/classify/json", content=b"null", timeout=10), 422,
                 "invalid_parameter", "body")


# --- checksum and overload (second server) ----------------------------------------------------------

def test_model_with_wrong_checksum_is_refused_and_others_serve(tampered_server):
    described = {m["name"]: m for m in httpx.get(tampered_server.url + "/models", timeout=10).json()["models"]}
    assert described["tampered"]["status"] == "unavailable"
    assert "sha256 mismatch" in described["tampered"]["unavailable_reason"]
    assert described["good"]["status"] == "available"
    assert "model tampered refused" in tampered_server.log()
    files = [("images", ("a.png", png(), "image/png"))]
    assert post_files(tampered_server.url, files, {"model": "good"}).status_code == 200
    assert_error(post_files(tampered_server.url, files, {"model": "tampered"}), 503, "model_unavailable", "model")


def test_overload_is_503_with_retry_after(tampered_server):
    # The tampered server queues at most one image: a two-image request is over the bound.
    response = httpx.post(tampered_server.url + "/classify/tensor?model=good",
                          content=npy(np.zeros((2, 28, 28), np.uint8)), timeout=30)
    assert_error(response, 503, "overloaded")
    assert int(response.headers["retry-after"]) >= 1


def test_bad_image_late_in_a_large_request_is_named(server):
    # One bad file fails the whole request with 4xx, naming the image, and nothing is half-answered.
    files = [("images", (f"{i}.png", png(), "image/png")) for i in range(40)]
    files[35] = ("images", ("bad.png", b"not an image at all", "image/png"))
    assert_error(post_files(server.url, files), 415, "unsupported_image", "images[35]")
    assert post_files(server.url, files[:35]).status_code == 200


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
