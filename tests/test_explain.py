"""POST /explain on the session server: map shapes, the method named, bad parameters, and faithfulness on 100 Fashion-
MNIST test images (occluding the 10% most salient pixels lowers the target's probability more than a random 10%);
the student ResNet's class activation maps equal PyTorch's."""

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
from service.explain import contained_box, map_at_input_size, occluded_copies, occlusion_positions, resize_map

STUDENT = "resnet-student"


def explain_tensor(url: str, image: np.ndarray, **params) -> dict:
    response = httpx.post(url + "/explain/tensor", params=params, content=npy(image[None]), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def has_cam(available_models: dict) -> bool:
    return STUDENT in available_models and any(o["name"] == "cam" for o in available_models[STUDENT]["outputs"])


@pytest.mark.parametrize("size", [(28, 28), (30, 17), (1000, 3)])
def test_the_map_goes_back_where_the_fit_put_the_image(size):
    """contained_box is ImageOps.pad's geometry: the white input lands exactly in the box."""
    from PIL import ImageOps

    width, height = size
    fitted = np.asarray(ImageOps.pad(Image.new("L", size, 255), (28, 28), color=0))
    left, top, w, h = contained_box(width, height, 28, 28)
    if fitted.any():
        ys, xs = np.nonzero(fitted)
        assert (left, top, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert map_at_input_size(np.ones((28, 28), np.float32), width, height).shape == (height, width)
    assert occlusion_positions(28, 5, 3)[-1] == 23 and occlusion_positions(28, 4, 2) == list(range(0, 25, 2))
    copies, squares = occluded_copies(np.full((1, 28, 28), 9, np.uint8), 4, 2, 0)
    assert copies.shape == (169, 1, 28, 28) and (copies == 0).sum() == 169 * 16


def test_occlusion_answer_shapes_method_and_overlay(server_url, fashion_test_images):
    images, _ = fashion_test_images
    # A non-square upload, 3x larger: the input map comes at the upload's own size.
    upload = np.asarray(Image.fromarray(images[0, 0]).resize((84, 60)))
    response = httpx.post(server_url + "/explain", files={"images": ("a.png", png(upload), "image/png")},
                          data={"model": "cnn", "patch": "4", "stride": "2"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "occlusion" and body["passes"] == 1 + 13 * 13 and body["model"] == "cnn"
    assert body["target"]["index"] == body["top_k"][0]["index"]
    values = np.array(body["map"]["values"])
    assert values.shape == (28, 28) and (body["map"]["height"], body["map"]["width"]) == (28, 28)
    assert np.array(body["input_map"]["values"]).shape == (60, 84) == (body["input_map"]["height"],
                                                                       body["input_map"]["width"])
    assert values.max() > 0
    # npy encoding: the same map, float32.
    as_npy = httpx.post(server_url + "/explain", files={"images": ("a.png", png(upload), "image/png")},
                        data={"model": "cnn", "format": "npy"}, timeout=60).json()
    decoded = np.load(io.BytesIO(base64.b64decode(as_npy["map"]["values"])))
    assert decoded.dtype == np.float32 and np.allclose(decoded, values, atol=1e-5)
    overlay = httpx.post(server_url + "/explain", files={"images": ("a.png", png(upload), "image/png")},
                         data={"model": "cnn", "format": "overlay", "target": "Coat"}, timeout=60)
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    assert overlay.headers["x-method"] == "occlusion" and overlay.headers["x-target"] == "Coat"
    assert Image.open(io.BytesIO(overlay.content)).size == (84, 60)


@pytest.mark.parametrize("params, files, code, field", [
    ({"patch": "1"}, 1, "invalid_parameter", "patch"),
    ({"patch": "15"}, 1, "invalid_parameter", "patch"),
    ({"patch": "4", "stride": "5"}, 1, "invalid_parameter", "stride"),
    ({"stride": "0"}, 1, "invalid_parameter", "stride"),
    ({"target": "nonesuch"}, 1, "unknown_class", "target"),
    ({"method": "cam", "model": "cnn"}, 1, "method_unavailable", "method"),
    ({}, 2, "one_image_only", "images"),
])
def test_bad_explain_requests_are_422(server_url, params, files, code, field):
    image = png(np.zeros((28, 28), np.uint8))
    response = httpx.post(server_url + "/explain", data={"model": "cnn", **params},
                          files=[("images", (f"{k}.png", image, "image/png")) for k in range(files)], timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["field"] == field, error


def target_probability(session: ort.InferenceSession, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    (probabilities,) = session.run(["probabilities"], {"pixels": images})
    return probabilities[np.arange(len(targets)), targets]


def occluded_fraction(images: np.ndarray, order: np.ndarray, fraction: float) -> np.ndarray:
    """images [N,1,H,W]; order [N, H*W] pixel indices, first removed first: the first `fraction` set to 0."""
    out = images.reshape(len(images), -1).copy()
    count = int(round(fraction * out.shape[1]))
    np.put_along_axis(out, order[:, :count], 0, axis=1)
    return out.reshape(images.shape)


@pytest.mark.parametrize("model, method", [("cnn", "occlusion"), (STUDENT, "cam")])
def test_the_most_salient_tenth_matters_more_than_a_random_tenth(server_url, available_models, fashion_test_images,
                                                                 model, method):
    if method == "cam" and not has_cam(available_models):
        pytest.skip(f"{STUDENT} is not served with a cam output")
    images = fashion_test_images[0][:100]
    maps, targets = [], []
    for image in images:
        body = explain_tensor(server_url, image, model=model, method=method, format="npy", patch=4, stride=4)
        assert body["method"] == method
        maps.append(np.load(io.BytesIO(base64.b64decode(body["map"]["values"]))))
        targets.append(body["target"]["index"])
    maps, targets = np.stack(maps), np.array(targets)
    session = ort.InferenceSession(str(MODELS_DIR / model / "model.onnx"), providers=["CPUExecutionProvider"])
    base = target_probability(session, images, targets)
    salient = np.argsort(-maps.reshape(len(maps), -1), axis=1, kind="stable")
    random_order = np.stack([np.random.default_rng(k).permutation(28 * 28) for k in range(len(images))])
    salient_drop = base - target_probability(session, occluded_fraction(images, salient, 0.10), targets)
    random_drop = base - target_probability(session, occluded_fraction(images, random_order, 0.10), targets)
    assert salient_drop.mean() > random_drop.mean() + 0.1, (salient_drop.mean(), random_drop.mean())


def test_the_student_cam_equals_pytorch(server_url, available_models, fashion_test_images):
    if not has_cam(available_models):
        pytest.skip(f"{STUDENT} is not served with a cam output")
    import torch

    from export.classifier import TTA_DESCRIPTIONS, load_run

    card = json.loads((MODELS_DIR / STUDENT / "card.json").read_text())
    run = MODELS_DIR.parent / "runs" / "resnet" / card["training"]["run"]
    tta = next(k for k, v in TTA_DESCRIPTIONS.items() if v == card["input"]["test_time_augmentation"])
    graph, _, _, _ = load_run(run, tta)
    graph.with_cam = True
    images = fashion_test_images[0][:64]
    with torch.no_grad():
        torch_cam = graph(torch.from_numpy(images))[2].numpy()
    session = ort.InferenceSession(str(MODELS_DIR / STUDENT / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_cam,) = session.run(["cam"], {"pixels": images})
    assert np.abs(onnx_cam - torch_cam).max() <= 1e-4 * np.abs(torch_cam).max()
    # The served map is PyTorch's map of the target class, upsampled.
    body = explain_tensor(server_url, images[3], model=STUDENT, format="npy")
    served = np.load(io.BytesIO(base64.b64decode(body["map"]["values"])))
    expected = resize_map(torch_cam[3, body["target"]["index"]], 28, 28)
    assert body["method"] == "cam" and body["passes"] == 1 and body["feature_map"] == [7, 7]
    assert np.abs(served - expected).max() <= 1e-4 * np.abs(expected).max()
