"""POST /segment against a real `bentoml serve` subprocess, compared with onnxruntime in this process.

The segmenter is a small SegNet trained for two batches and exported by the real exporter into a temporary
models folder (beside a released classifier), so these tests do not depend on a released segmenter.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import MODELS_DIR, REPO, classification_cards, start_server, stop_server

pytestmark = pytest.mark.server
SEGMENT_PIXEL_LIMIT = 128 * 128


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory) -> Path:
    """models/-like folder: a released classifier and a freshly exported SegNet named `segnet`."""
    work = tmp_path_factory.mktemp("segmenter")
    # A tiny SegNet (stride 4, so padding is exercised), two batches of one short epoch.
    train = subprocess.run([sys.executable, "-m", "training.train_segnet", "--canvas", "32", "32", "--widths", "8", "16",
                            "--batch-size", "8", "--epochs", "1", "--dry-run", "--train-scenes-per-epoch", "64",
                            "--val-scenes", "32", "--no-progress", "--seed", "1", "--out", str(work / "runs")],
                           cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert train.returncode == 0, train.stderr
    (run,) = (work / "runs" / "segnet").iterdir()
    models = work / "models"
    export = subprocess.run([sys.executable, "-m", "export.segmenter", "--run", str(run), "--name", "segnet",
                             "--out", str(models), "--parity-scenes", "64",
                             "--parity-size", "48", "80"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    classifier = next(iter(classification_cards()))
    shutil.copytree(MODELS_DIR / classifier, models / classifier)
    return models


@pytest.fixture(scope="module")
def segment_server(tmp_path_factory, segmenter_dir):
    running = start_server(tmp_path_factory.mktemp("segment-server") / "server.log",
                           {"VISIONSERVE_MODELS_DIR": str(segmenter_dir),
                            "VISIONSERVE_MAX_SEGMENT_PIXELS": str(SEGMENT_PIXEL_LIMIT)})
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def reference(segmenter_dir) -> ort.InferenceSession:
    return ort.InferenceSession(str(segmenter_dir / "segnet" / "model.onnx"), providers=["CPUExecutionProvider"])


def scene_png(height: int, width: int, seed: int) -> tuple[bytes, np.ndarray]:
    """A grey light-on-dark picture of blobs (what the segmenter was trained on: bright items, dark ground)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        pixels[y:y + rng.integers(6, 20), x:x + rng.integers(6, 20)] = rng.integers(120, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), pixels


TRUNCATED_PNG = scene_png(64, 64, seed=0)[0][:120]  # a valid header, then the data stops


def expected_mask(session: ort.InferenceSession, pixels: np.ndarray, stride: int) -> np.ndarray:
    height, width = pixels.shape
    padded = np.pad(pixels, ((0, -height % stride), (0, -width % stride)))[None, None]
    (mask,) = session.run(["mask"], {"pixels": padded})
    return mask[0, :height, :width]


def stride_of(server) -> int:
    card = httpx.get(server.url + "/models/segnet", timeout=10).json()
    return int(card["input"]["stride"])


def post_image(url: str, data: bytes, **fields) -> httpx.Response:
    return httpx.post(url + "/segment", files={"image": ("scene.png", data, "image/png")},
                      data={k: str(v) for k, v in fields.items()}, timeout=60)


def test_segmenter_is_listed_with_both_tasks(segment_server):
    described = httpx.get(segment_server.url + "/models", timeout=10).json()
    tasks = {m["name"]: m["task"] for m in described["models"] if m["status"] == "available"}
    assert tasks["segnet"] == "segmentation" and "classification" in tasks.values()
    assert described["default"]["segmentation"] == "segnet"


@pytest.mark.parametrize("height,width", [(64, 64), (50, 75), (13, 9)])
def test_json_answer_matches_onnxruntime_at_the_input_size(segment_server, reference, height, width):
    data, pixels = scene_png(height, width, seed=height)
    answer = post_image(segment_server.url, data, invert="false")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["height"], body["width"], body["model"]) == (height, width, "segnet")
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    np.testing.assert_array_equal(mask, expected_mask(reference, pixels, stride_of(segment_server)))
    counts = np.bincount(mask.ravel(), minlength=11)
    assert sum(c["pixels"] for c in body["classes"]) == height * width
    assert {c["index"]: c["pixels"] for c in body["classes"]} == {k: int(n) for k, n in enumerate(counts) if n}
    for component in body["components"]:
        box = component["box"]
        assert 0 <= box["x0"] < box["x1"] <= width and 0 <= box["y0"] < box["y1"] <= height
        assert (mask[box["y0"]:box["y1"], box["x0"]:box["x1"]] == component["index"]).sum() >= component["pixels"]


def test_mask_and_overlay_formats(segment_server, reference):
    data, pixels = scene_png(40, 56, seed=1)
    mask_answer = post_image(segment_server.url, data, format="mask", invert="false")
    assert mask_answer.status_code == 200 and mask_answer.headers["content-type"] == "image/png"
    mask_image = Image.open(io.BytesIO(mask_answer.content))
    assert mask_image.mode == "L" and mask_image.size == (56, 40)
    np.testing.assert_array_equal(np.asarray(mask_image), expected_mask(reference, pixels, stride_of(segment_server)))
    overlay = post_image(segment_server.url, data, format="overlay", invert="false")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    overlay_image = Image.open(io.BytesIO(overlay.content))
    assert overlay_image.mode == "RGB" and overlay_image.width >= 56 and overlay_image.height > 40


def test_base64_json_body_gives_the_multipart_answer(segment_server):
    data, _ = scene_png(32, 48, seed=2)
    multipart = post_image(segment_server.url, data, invert="false").json()
    as_json = httpx.post(segment_server.url + "/segment", timeout=60, json={
        "image": "data:image/png;base64," + base64.b64encode(data).decode(), "invert": "false"}).json()
    assert as_json == multipart


def test_concurrent_requests_of_mixed_sizes_each_get_their_own_mask(segment_server, reference):
    stride = stride_of(segment_server)
    cases = [scene_png(24 + 8 * (i % 3), 40, seed=10 + i) for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda case: post_image(segment_server.url, case[0], format="mask", invert="false"),
                                cases))
    for answer, (_, pixels) in zip(answers, cases):
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(answer.content))),
                                      expected_mask(reference, pixels, stride))


@pytest.mark.parametrize("request_kwargs,status,code", [
    (dict(files=[("image", ("a.png", b"x", "image/png")), ("image", ("b.png", b"y", "image/png"))]), 422,
     "one_image_only"),
    (dict(files={"image": ("a.txt", b"not an image at all", "text/plain")}), 415, "unsupported_image"),
    (dict(files={"image": ("a.png", TRUNCATED_PNG, "image/png")}), 400, "corrupt_image"),
    (dict(content=b"raw bytes", headers={"content-type": "application/octet-stream"}), 415, "unsupported_media_type"),
    (dict(json={"image": "%%% not base64"}), 400, "invalid_base64"),
    (dict(json={"format": "json"}), 422, "invalid_parameter"),
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json"),
    (dict(files={"image": (None, "http://127.0.0.1:9/x.png")}), 422, "not_a_file"),  # text, never fetched
    (dict(data={"image": "http://127.0.0.1:9/x.png"}), 415, "unsupported_media_type"),  # a urlencoded form
])
def test_bad_requests_get_their_4xx(segment_server, request_kwargs, status, code):
    answer = httpx.post(segment_server.url + "/segment", timeout=30, **request_kwargs)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


@pytest.mark.parametrize("fields,status,code", [
    ({"format": "svg"}, 422, "invalid_parameter"),
    ({"model": "nope"}, 404, "unknown_model"),
    ({"model": "cnn"}, 404, "unknown_model"),  # a classifier is no segmenter
])
def test_bad_parameters_get_their_4xx(segment_server, fields, status, code):
    data, _ = scene_png(16, 16, seed=3)
    answer = post_image(segment_server.url, data, **fields)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


def test_segment_pixel_limit(segment_server):
    data, _ = scene_png(129, 128, seed=4)  # one row over the server's limit of 128 x 128
    answer = post_image(segment_server.url, data)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_many_pixels"
    assert post_image(segment_server.url, scene_png(128, 128, seed=4)[0]).status_code == 200


def test_server_without_a_segmenter_answers_503(tampered_server):
    """A server over a folder of classifiers only (whether or not models/ holds a segmenter)."""
    data, _ = scene_png(16, 16, seed=5)
    answer = post_image(tampered_server.url, data)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_unavailable"
