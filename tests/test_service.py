"""The classification service over HTTP, against a real `bentoml serve` subprocess (tests/conftest.py).

Every prediction is compared with onnxruntime run in this process on the same fitted pixels.
"""

from __future__ import annotations

import base64
import io
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import start_server, stop_server
from helpers import encode, png
from service.images import InputSpec, decode_image, fit_to_input_spec

pytestmark = pytest.mark.server
TOLERANCE = 1e-5  # same graph, same provider: only thread-count rounding differs
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="session")
def reference_sessions(available_models) -> dict[str, ort.InferenceSession]:
    return {name: ort.InferenceSession(str(MODELS_DIR / Path(name) / "model.onnx"), providers=["CPUExecutionProvider"])
            for name in available_models}


def reference_probabilities(session: ort.InferenceSession, pixels: np.ndarray) -> np.ndarray:
    return session.run(["probabilities"], {"pixels": pixels})[0]


def fitted_like_the_server(image_bytes: bytes, card: dict, invert: str = "auto") -> np.ndarray:
    pixels, _ = fit_to_input_spec(decode_image(image_bytes, 10**8, "test"), InputSpec.from_card(card), invert)
    return pixels


def post_pngs(url: str, images: list[bytes], **fields) -> httpx.Response:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(url + "/classify", files=files, data={k: str(v) for k, v in fields.items()}, timeout=60)


def probabilities_from_answer(answer: dict, classes: int) -> np.ndarray:
    """Rebuild the [N, K] probability rows from a top_k=K answer."""
    rows = np.zeros((len(answer["predictions"]), classes), np.float32)
    for row, prediction in zip(rows, answer["predictions"]):
        for entry in prediction["top_k"]:
            row[entry["index"]] = entry["probability"]
    return rows


def test_ready_only_after_models_are_loaded(server):
    assert not server.ready_before_load
    assert "sha256 verified" in server.log()


def test_models_lists_every_card_on_disk_with_its_provider(server):
    answer = httpx.get(server.url + "/models", timeout=10).json()
    on_disk = server.cards_at_start
    assert {m["name"] for m in answer["models"]} == set(on_disk)
    available = [m for m in answer["models"] if m["status"] == "available"]
    assert available, answer
    for model in available:
        assert model["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
        assert model["sha256"] == on_disk[model["name"]]["sha256"]
        assert model["labels"] == on_disk[model["name"]]["labels"]
    classifiers = [m for m in available if m["task"] == "classification"]
    # The shipped VISIONSERVE_DEFAULT_MODELS pins the CNN; without it, the most accurate classifier.
    expected = "cnn" if any(m["name"] == "cnn" for m in classifiers) else \
        max(classifiers, key=lambda m: m["metrics"]["accuracy"])["name"]
    assert answer["default"]["classification"] == expected


def test_model_detail_and_default(server_url, available_models):
    name = next(iter(available_models))
    detail = httpx.get(f"{server_url}/models/{name}", timeout=10).json()
    assert detail["name"] == name and detail["status"] == "available" and "provider" in detail


def test_bentoml_endpoints_keep_working(server_url):
    for path in ("/livez", "/readyz", "/metrics", "/docs.json", "/"):
        assert httpx.get(server_url + path, timeout=10).status_code == 200, path


def test_png_predictions_equal_in_process_onnxruntime(server_url, available_models, reference_sessions,
                                                      fashion_test_images):
    images, labels = fashion_test_images
    pngs = [png(image[0]) for image in images[:64]]
    for name, description in available_models.items():
        answer = post_pngs(server_url, pngs, model=name, top_k=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == name and body["version"] == description["version"]
        fitted = np.stack([fitted_like_the_server(png, description) for png in pngs])
        expected = reference_probabilities(reference_sessions[name], fitted)
        served = probabilities_from_answer(body, expected.shape[1])
        np.testing.assert_allclose(served, expected, atol=TOLERANCE)
        assert [p["top_k"][0]["index"] for p in body["predictions"]] == expected.argmax(1).tolist()
        # Sanity on the model itself: real test images are mostly classified right.
        assert (expected.argmax(1) == labels[:64]).mean() > 0.7


def test_multi_image_answers_keep_request_order(server_url, fashion_test_images, available_models):
    images, _ = fashion_test_images
    order = [5, 0, 3, 9, 1, 7]
    pngs = [png(images[i][0]) for i in order]
    together = post_pngs(server_url, pngs, top_k=10).json()
    one_by_one = [post_pngs(server_url, [png], top_k=10).json()["predictions"][0] for png in pngs]
    assert [p["image"] for p in together["predictions"]] == list(range(len(order)))
    for joint, alone in zip(together["predictions"], one_by_one):
        assert [e["index"] for e in joint["top_k"]] == [e["index"] for e in alone["top_k"]]
        np.testing.assert_allclose([e["probability"] for e in joint["top_k"]],
                                   [e["probability"] for e in alone["top_k"]], atol=TOLERANCE)


def test_top_k_default_is_three_sorted_descending(server_url, fashion_test_images):
    images, _ = fashion_test_images
    prediction = post_pngs(server_url, [png(images[0][0])]).json()["predictions"][0]
    probabilities = [e["probability"] for e in prediction["top_k"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)


def test_base64_and_tensor_paths_agree_with_multipart(server_url, fashion_test_images, available_models):
    images, _ = fashion_test_images
    pngs = [png(image[0]) for image in images[:8]]
    for name in available_models:
        multipart = post_pngs(server_url, pngs, model=name, top_k=10).json()
        as_json = httpx.post(server_url + "/classify/json", timeout=30, json={
            "images": [base64.b64encode(png).decode() for png in pngs], "model": name, "top_k": 10}).json()
        buffer = io.BytesIO()
        np.save(buffer, images[:8, 0])  # [N, 28, 28]; the [N, 1, 28, 28] form is tested below
        as_tensor = httpx.post(f"{server_url}/classify/tensor?model={name}&top_k=10", content=buffer.getvalue(),
                               headers={"content-type": "application/octet-stream"}, timeout=30).json()
        reference = probabilities_from_answer(multipart, 10)
        np.testing.assert_allclose(probabilities_from_answer(as_json, 10), reference, atol=TOLERANCE)
        np.testing.assert_allclose(probabilities_from_answer(as_tensor, 10), reference, atol=TOLERANCE)


def test_tensor_accepts_channel_axis(server_url, fashion_test_images):
    images, _ = fashion_test_images
    buffer = io.BytesIO()
    np.save(buffer, images[:3])
    answer = httpx.post(server_url + "/classify/tensor", content=buffer.getvalue(), timeout=30)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3


def test_200_concurrent_requests_each_get_their_own_answer(server_url, fashion_test_images, available_models,
                                                           reference_sessions):
    images, _ = fashion_test_images
    name = httpx.get(server_url + "/models", timeout=10).json()["default"]["classification"]
    pngs = [png(image[0]) for image in images[:200]]
    expected = reference_probabilities(reference_sessions[name],
                                       np.stack([fitted_like_the_server(p, available_models[name]) for p in pngs]))
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
        def classify_one(png: bytes) -> httpx.Response:
            return client.post(server_url + "/classify", files=[("images", ("x.png", png, "image/png"))],
                               data={"top_k": "10"})

        with ThreadPoolExecutor(max_workers=200) as pool:
            responses = list(pool.map(classify_one, pngs))
    assert [r.status_code for r in responses] == [200] * 200
    served = np.concatenate([probabilities_from_answer(r.json(), 10) for r in responses])
    np.testing.assert_allclose(served, expected, atol=TOLERANCE)


def test_every_format_and_mode_is_fitted(server_url, fashion_test_images):
    images, _ = fashion_test_images
    item = Image.fromarray(images[0, 0])
    photo_like = item.resize((90, 60)).convert("RGB")  # non-square, colour
    rgba = item.convert("RGBA")
    rgba.putalpha(128)
    cases = {
        "png-rgb": encode(photo_like, "PNG"),
        "jpeg": encode(photo_like, "JPEG", quality=95),
        "bmp": encode(photo_like, "BMP"),
        "gif": encode(item.convert("P"), "GIF", save_all=True, append_images=[Image.new("P", item.size)]),
        "webp": encode(photo_like, "WEBP"),
        "tiff": encode(photo_like, "TIFF"),
        "png-rgba": encode(rgba, "PNG"),
        "png-16bit": encode(item.convert("I;16"), "PNG"),
    }
    files = [("images", (f"{name}.img", data, "application/octet-stream")) for name, data in cases.items()]
    answer = httpx.post(server_url + "/classify", files=files, timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == len(cases)


def test_auto_invert_turns_dark_on_light_into_the_training_polarity(server_url, fashion_test_images):
    images, _ = fashion_test_images
    original = png(images[0][0])
    negative = png(255 - images[0][0])  # a dark item on a light background, like a photo on paper
    answer = post_pngs(server_url, [original, negative], top_k=1).json()["predictions"]
    assert [p["inverted"] for p in answer] == [False, True]
    assert answer[0]["top_k"][0]["index"] == answer[1]["top_k"][0]["index"]
    forced = post_pngs(server_url, [original], top_k=1, invert="true").json()["predictions"][0]
    assert forced["inverted"] is True


def test_served_top1_agrees_with_onnxruntime_on_all_test_images(server_url, reference_sessions):
    """All 10,000 Fashion-MNIST test images as PNG with default options (invert=auto) against onnxruntime on the
    same uint8 arrays: the old border-vs-centre rule inverted 52 of them (99.2% agreement)."""
    from training.data import load_dataset

    split = load_dataset("fashion-mnist", "test")
    images = split.images.numpy()
    expected = reference_probabilities(reference_sessions["cnn"], images).argmax(1)
    served, inverted = [], []
    for start in range(0, len(images), 250):
        answer = post_pngs(server_url, [png(p[0]) for p in images[start:start + 250]], top_k=1, model="cnn")
        assert answer.status_code == 200, answer.text
        for offset, prediction in enumerate(answer.json()["predictions"]):
            served.append(prediction["top_k"][0]["index"])
            if prediction["inverted"]:
                inverted.append(start + offset)
    disagree = np.flatnonzero(np.asarray(served) != expected).tolist()
    assert inverted == [] and disagree == [], (inverted[:20], disagree[:20])


def test_exif_orientation_is_applied(server_url, fashion_test_images):
    images, _ = fashion_test_images
    upright = Image.fromarray(images[1, 0])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are rotated the other way
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    with_exif = encode(stored, "JPEG", quality=100, exif=exif.tobytes())
    plain = encode(upright, "JPEG", quality=100)
    answer = post_pngs(server_url, [with_exif, plain], top_k=1).json()["predictions"]
    assert answer[0]["top_k"][0]["index"] == answer[1]["top_k"][0]["index"]


def test_default_model_comes_from_the_configuration(tmp_path):
    """VISIONSERVE_DEFAULT_MODELS picks what a request without `model` gets; a name the server does not have
    falls back to the best available by its card, and says so in the log. Two released classifiers are enough
    (the servers load nothing else: each start-up is the cost of this test)."""
    models = tmp_path / "models"
    for name in ("mlp", "cnn"):
        shutil.copytree(MODELS_DIR / name, models / name)
    image = png()
    running = start_server(tmp_path / "server.log", {"VISIONSERVE_MODELS_DIR": str(models),
                                                     "VISIONSERVE_DEFAULT_MODELS": "classification=mlp"})
    try:
        assert httpx.get(running.url + "/models", timeout=10).json()["default"]["classification"] == "mlp"
        assert post_pngs(running.url, [image]).json()["model"] == "mlp"
        assert post_pngs(running.url, [image], model="cnn").json()["model"] == "cnn"
    finally:
        stop_server(running)
    running = start_server(tmp_path / "server2.log", {"VISIONSERVE_MODELS_DIR": str(models),
                                                      "VISIONSERVE_DEFAULT_MODELS": "classification=nonesuch"})
    try:
        described = httpx.get(running.url + "/models", timeout=10).json()
        classifiers = [m for m in described["models"] if m["task"] == "classification" and m["status"] == "available"]
        best = max(classifiers, key=lambda m: m["metrics"]["accuracy"])["name"]
        assert described["default"]["classification"] == best
        assert post_pngs(running.url, [image]).json()["model"] == best
        assert "names nonesuch for classification" in running.log()
    finally:
        stop_server(running)


def test_make_serve_serves_every_task_with_the_released_models(server_url):
    """The store-backed server (what `make serve` runs) over the checkout's five released models: a two-item
    64x64 test scene comes back as a mask of its own size equal to onnxruntime's, naming both garments; the
    generator's grid is the same for the same seed and its samples are of the class asked for."""
    from training.data import load_dataset
    from training.scenes import fixed_test_scenes

    described = httpx.get(server_url + "/models", timeout=10).json()
    tasks = {m["name"]: m["task"] for m in described["models"] if m["status"] == "available"}
    assert {"mlp", "cnn", "resnet", "segnet", "dcgan"} <= set(tasks)
    assert tasks["segnet"] == "segmentation" and tasks["dcgan"] == "generation"

    scenes = fixed_test_scenes(40, test=load_dataset("fashion-mnist", "test"))
    index = next(i for i in range(len(scenes)) if (scenes.classes[i] >= 0).sum() == 2)
    pixels, truth = scenes.images[index].numpy(), scenes.masks[index].numpy()
    answer = httpx.post(server_url + "/segment", files={"image": ("scene.png", png(pixels[0]), "image/png")},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    assert (body["height"], body["width"]) == (64, 64) and mask.shape == (64, 64) and body["inverted"] is False
    segnet = ort.InferenceSession(str(MODELS_DIR / "segnet" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(mask, segnet.run(["mask"], {"pixels": pixels[None]})[0][0])
    named = {c["index"] for c in body["classes"]}
    assert {int(k) + 1 for k in scenes.classes[index] if k >= 0} <= named, (body["classes"], truth.max())

    request = {"n": 16, "class": "Trouser", "seed": 7, "format": "images"}
    first = httpx.post(server_url + "/generate", json=request, timeout=60)
    again = httpx.post(server_url + "/generate", json=request, timeout=60)
    assert first.status_code == 200 and first.content == again.content
    samples = [base64.b64decode(image["png"]) for image in first.json()["images"]]
    verdict = post_pngs(server_url, samples, top_k=1, model="cnn").json()["predictions"]
    assert sum(p["top_k"][0]["label"] == "Trouser" for p in verdict) >= 15
