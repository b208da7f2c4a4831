"""POST /segment against a real `bentoml serve` subprocess, compared with onnxruntime in this process.

The server is conftest's every_task_server: its segmenter is the released SegNet, or a tiny one trained for
two batches and exported by the real exporter where none is released. Bad requests to /segment are cases of
the bad-input corpus (tests/test_bad_inputs.py), its pixel limit among them.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def reference(every_task_models) -> ort.InferenceSession:
    return ort.InferenceSession(str(every_task_models / "segnet" / "model.onnx"), providers=["CPUExecutionProvider"])


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


def test_segmenter_is_listed_with_both_tasks(every_task_server):
    described = httpx.get(every_task_server.url + "/models", timeout=10).json()
    tasks = {m["name"]: m["task"] for m in described["models"] if m["status"] == "available"}
    assert tasks["segnet"] == "segmentation" and "classification" in tasks.values()
    assert described["default"]["segmentation"] == "segnet"


@pytest.mark.parametrize("height,width", [(64, 64), (50, 75), (13, 9)])
def test_json_answer_matches_onnxruntime_at_the_input_size(every_task_server, reference, height, width):
    data, pixels = scene_png(height, width, seed=height)
    answer = post_image(every_task_server.url, data, invert="false")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["height"], body["width"], body["model"]) == (height, width, "segnet")
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    np.testing.assert_array_equal(mask, expected_mask(reference, pixels, stride_of(every_task_server)))
    counts = np.bincount(mask.ravel(), minlength=11)
    assert sum(c["pixels"] for c in body["classes"]) == height * width
    assert {c["index"]: c["pixels"] for c in body["classes"]} == {k: int(n) for k, n in enumerate(counts) if n}
    for component in body["components"]:
        box = component["box"]
        assert 0 <= box["x0"] < box["x1"] <= width and 0 <= box["y0"] < box["y1"] <= height
        assert (mask[box["y0"]:box["y1"], box["x0"]:box["x1"]] == component["index"]).sum() >= component["pixels"]


def test_mask_and_overlay_formats(every_task_server, reference):
    data, pixels = scene_png(40, 56, seed=1)
    mask_answer = post_image(every_task_server.url, data, format="mask", invert="false")
    assert mask_answer.status_code == 200 and mask_answer.headers["content-type"] == "image/png"
    mask_image = Image.open(io.BytesIO(mask_answer.content))
    assert mask_image.mode == "L" and mask_image.size == (56, 40)
    want = expected_mask(reference, pixels, stride_of(every_task_server))
    np.testing.assert_array_equal(np.asarray(mask_image), want)
    overlay = post_image(every_task_server.url, data, format="overlay", invert="false")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    overlay_image = Image.open(io.BytesIO(overlay.content))
    assert overlay_image.mode == "RGB" and overlay_image.width >= 56 and overlay_image.height > 40


def test_base64_json_body_gives_the_multipart_answer(every_task_server):
    data, _ = scene_png(32, 48, seed=2)
    multipart = post_image(every_task_server.url, data, invert="false").json()
    as_json = httpx.post(every_task_server.url + "/segment", timeout=60, json={
        "image": "data:image/png;base64," + base64.b64encode(data).decode(), "invert": "false"}).json()
    assert as_json == multipart


def test_concurrent_requests_of_mixed_sizes_each_get_their_own_mask(every_task_server, reference):
    stride = stride_of(every_task_server)
    cases = [scene_png(24 + 8 * (i % 3), 40, seed=10 + i) for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda case: post_image(every_task_server.url, case[0], format="mask",
                                                        invert="false"), cases))
    for answer, (_, pixels) in zip(answers, cases):
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(answer.content))),
                                      expected_mask(reference, pixels, stride))


def test_server_without_a_segmenter_answers_503(tampered_server):
    """A server over a folder of classifiers only (whether or not models/ holds a segmenter)."""
    data, _ = scene_png(16, 16, seed=5)
    answer = post_image(tampered_server.url, data)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_unavailable"
