"""POST /reconstruct (multipart, /json, /tensor) against the session server (tests/conftest.py), each answer
compared with onnxruntime run in this process on the same pixels; and its 4xx cases."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import MODELS_DIR
from helpers import npy, png

pytestmark = pytest.mark.server
AUTOENCODER = MODELS_DIR / "autoencoder"
ERROR_TOLERANCE = 1e-6  # same graph, same provider: only thread-count rounding differs


@pytest.fixture(scope="module")
def reference() -> ort.InferenceSession:
    if not (AUTOENCODER / "card.json").is_file():
        pytest.fail("models/autoencoder is not released (python -m export.autoencoder --run ... --name autoencoder)")
    return ort.InferenceSession(str(AUTOENCODER / "model.onnx"), providers=["CPUExecutionProvider"])


def decoded(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


def test_one_upload_answers_its_reconstruction_png(server_url, reference, fashion_test_images):
    images, _ = fashion_test_images
    pixels = images[:1]  # 28x28, dark background: the fit leaves it as it is
    response = httpx.post(server_url + "/reconstruct", files=[("images", ("0.png", png(pixels[0, 0]), "image/png"))],
                          timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-model"] == "autoencoder" and response.headers["x-inverted"] == "false"
    want_reconstruction, want_error, _ = reference.run(None, {"pixels": pixels})
    assert np.array_equal(decoded(response.content), want_reconstruction[0, 0])
    assert float(response.headers["x-reconstruction-error"]) == pytest.approx(float(want_error[0]), rel=1e-4)


def test_tensor_batch_answers_json_equal_to_onnxruntime(server_url, reference, fashion_test_images):
    images, _ = fashion_test_images
    pixels = images[:6]
    response = httpx.post(server_url + "/reconstruct/tensor", content=npy(pixels),
                          headers={"content-type": "application/octet-stream"}, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    want_reconstruction, want_error, _ = reference.run(None, {"pixels": pixels})
    assert answer["model"] == "autoencoder" and [item["image"] for item in answer["reconstructions"]] == list(range(6))
    for item, reconstruction, error in zip(answer["reconstructions"], want_reconstruction, want_error):
        assert abs(item["error"] - float(error)) <= ERROR_TOLERANCE
        assert np.array_equal(decoded(base64.b64decode(item["reconstruction_png"])), reconstruction[0])
        assert "inverted" not in item


def test_base64_json_and_format_png(server_url, reference, fashion_test_images):
    images, _ = fashion_test_images
    encoded = [base64.b64encode(png(image[0])).decode() for image in images[10:12]]
    response = httpx.post(server_url + "/reconstruct/json", json={"images": encoded}, timeout=60)
    assert response.status_code == 200, response.text
    errors = [item["error"] for item in response.json()["reconstructions"]]
    want = reference.run(["error"], {"pixels": images[10:12]})[0]
    assert np.allclose(errors, want, atol=ERROR_TOLERANCE)
    one = httpx.post(server_url + "/reconstruct/json", json={"images": encoded[:1], "format": "json"}, timeout=60)
    assert one.status_code == 200 and len(one.json()["reconstructions"]) == 1  # JSON even for one image
    as_png = httpx.post(server_url + "/reconstruct/tensor", params={"format": "png"}, content=npy(images[:1, 0]),
                        timeout=60)  # [N, H, W] is taken for a one-channel model
    assert as_png.status_code == 200 and as_png.headers["content-type"] == "image/png"


def test_inverted_image_scores_a_larger_error(server_url, fashion_test_images):
    """The error is an out-of-distribution score: a dark garment on white, sent as a tensor (not re-inverted)."""
    images, _ = fashion_test_images
    pixels = np.concatenate([images[:8], 255 - images[:8]])
    answer = httpx.post(server_url + "/reconstruct/tensor", params={"format": "json"}, content=npy(pixels),
                        timeout=60).json()
    errors = np.array([item["error"] for item in answer["reconstructions"]])
    assert errors[8:].min() > errors[:8].max()


@pytest.mark.parametrize("path,kwargs,status,code", [
    ("/reconstruct", dict(files=[("images", ("a.png", b"not an image", "image/png"))]), 415, "unsupported_image"),
    ("/reconstruct", dict(content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    ("/reconstruct", dict(files=[("images", ("a.png", "PNG", "image/png"))] * 2, params={"format": "png"}), 422,
     "one_image_only"),
    ("/reconstruct", dict(files=[("images", ("a.png", "PNG", "image/png"))], params={"format": "gif"}), 422,
     "invalid_parameter"),
    ("/reconstruct", dict(files=[("images", ("a.png", "PNG", "image/png"))], params={"model": "nope"}), 404,
     "unknown_model"),
    ("/reconstruct/json", dict(content=b"{", headers={"content-type": "application/json"}), 400, "invalid_json"),
    ("/reconstruct/json", dict(json={"images": ["%%%"]}), 400, "invalid_base64"),
    ("/reconstruct/json", dict(json={"images": []}), 422, "invalid_parameter"),
    ("/reconstruct/tensor", dict(content=b"\x93NUMPY garbage"), 422, "invalid_tensor"),
    ("/reconstruct/tensor", dict(content="FLOAT"), 422, "invalid_tensor"),
    ("/reconstruct/tensor", dict(content="WRONG_SHAPE"), 422, "invalid_tensor"),
    ("/reconstruct/nothing-here", dict(json={}), 404, "not_found"),
])
def test_client_mistakes_are_4xx_in_our_error_shape(server_url, reference, fashion_test_images, path, kwargs, status,
                                                    code):
    images, _ = fashion_test_images
    stand_ins = {"PNG": png(images[0, 0]), "FLOAT": npy(images[:2].astype(np.float32)),
                 "WRONG_SHAPE": npy(images[:2, :, :14])}
    if "files" in kwargs:
        kwargs = {**kwargs, "files": [(f, (n, stand_ins.get(d, d) if isinstance(d, str) else d, t))
                                      for f, (n, d, t) in kwargs["files"]]}
    if isinstance(kwargs.get("content"), str):
        kwargs = {**kwargs, "content": stand_ins[kwargs["content"]]}
    response = httpx.post(server_url + path, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"code", "message"}
    if code:
        assert error["code"] == code


def test_wrong_method_and_openapi_document(server_url, reference):
    response = httpx.get(server_url + "/reconstruct", timeout=10)
    assert response.status_code == 405 and "POST" in response.headers["allow"]
    document = httpx.get(server_url + "/openapi.json", timeout=10).json()
    assert {"/reconstruct", "/reconstruct/json", "/reconstruct/tensor"} <= set(document["paths"])
    assert "ReconstructionAnswer" in document["components"]["schemas"]
    described = httpx.get(server_url + "/models/autoencoder", timeout=10).json()
    assert described["task"] == "reconstruction" and described["status"] == "available"
    assert json.loads((AUTOENCODER / "card.json").read_text())["sha256"] == described["sha256"]
