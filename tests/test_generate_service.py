"""POST /generate and /generate/interpolate against a real `bentoml serve` subprocess.

The server is conftest's every_task_server: its generator is the released DCGAN, or a tiny one trained for two
batches and exported by the real exporter where none is released. Every answer is compared with the same graph
run by onnxruntime in this process, from the noise the API documents: NumPy's default_rng(seed).standard_normal(
(n, 100)), then the classes. The bad-input corpus (tests/test_bad_inputs.py) holds more bad requests to /generate.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import EVERY_TASK_LIMITS, start_server, stop_server
from helpers import assert_error

pytestmark = pytest.mark.server
SAMPLE_LIMIT = int(EVERY_TASK_LIMITS["VISIONSERVE_MAX_SAMPLES"])
GAP = 2  # pixels between cells at scale 1 (service/generate.py)


@pytest.fixture(scope="module")
def reference(every_task_models) -> ort.InferenceSession:
    return ort.InferenceSession(str(every_task_models / "dcgan" / "model.onnx"), providers=["CPUExecutionProvider"])


def documented_inputs(seed: int, n: int, class_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 100)).astype(np.float32)
    labels = rng.integers(0, 10, n).astype(np.int64) if class_index is None else np.full(n, class_index, np.int64)
    return z, labels


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def decode_png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


def cell(grid: np.ndarray, row: int, column: int, scale: int = 1) -> np.ndarray:
    size, gap = 28 * scale, GAP * scale
    y, x = gap + row * (size + gap), gap + column * (size + gap)
    return grid[y:y + size, x:x + size]


def test_same_seed_same_bytes_other_seed_other_bytes(every_task_server):
    body = {"n": 9, "seed": 123, "class": "Trouser"}
    first, second = post(every_task_server, "/generate", body), post(every_task_server, "/generate", body)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content == second.content
    assert post(every_task_server, "/generate", {**body, "seed": 124}).content != first.content


def test_grid_is_the_graphs_output_for_the_documented_noise(every_task_server, reference):
    response = post(every_task_server, "/generate", {"n": 10, "seed": 7, "class": 3, "scale": 2})
    grid = decode_png(response.content)
    # 10 samples -> 4 columns, 3 rows of 56-pixel cells with 4-pixel gaps.
    assert grid.shape == (3 * 56 + 4 * 4, 4 * 56 + 5 * 4)
    z, labels = documented_inputs(7, 10, 3)
    (expected,) = reference.run(None, {"z": z, "label": labels})
    for i in range(10):
        row, column = divmod(i, 4)
        got = cell(grid, row, column, scale=2)
        assert np.array_equal(got[::2, ::2], expected[i, 0]), i
        assert np.array_equal(got, np.repeat(np.repeat(expected[i, 0], 2, 0), 2, 1))  # nearest neighbour
    assert response.headers["x-seed"] == "7" and response.headers["x-classes"] == ",".join(["3"] * 10)


def test_images_format_with_random_classes(every_task_server, reference):
    response = post(every_task_server, "/generate", {"n": 12, "seed": 99, "format": "images"})
    assert response.status_code == 200
    answer = response.json()
    z, labels = documented_inputs(99, 12, None)
    (expected,) = reference.run(None, {"z": z, "label": labels})
    assert answer["seed"] == 99 and answer["n"] == 12 and answer["model"] == "dcgan"
    names = httpx.get(every_task_server.url + "/models/dcgan", timeout=10).json()["labels"]
    for i, item in enumerate(answer["images"]):
        assert item["class_index"] == labels[i] and item["class"] == names[labels[i]]
        assert np.array_equal(decode_png(base64.b64decode(item["png"])), expected[i, 0])
    assert len(set(labels.tolist())) > 1  # omitted class: a class per sample
    grid = post(every_task_server, "/generate", {"n": 12, "seed": 99})
    assert grid.headers["x-classes"] == ",".join(str(k) for k in labels)


def test_a_seeds_first_sample_does_not_depend_on_n(every_task_server):
    one = post(every_task_server, "/generate", {"n": 1, "seed": 5, "class": 0, "format": "images"}).json()
    many = post(every_task_server, "/generate", {"n": 6, "seed": 5, "class": 0, "format": "images"}).json()
    assert one["images"][0]["png"] == many["images"][0]["png"]


def test_without_a_seed_the_answer_says_which_was_used(every_task_server):
    first = post(every_task_server, "/generate", {"n": 4, "class": "bag"})
    assert first.status_code == 200
    seed = int(first.headers["x-seed"])
    again = post(every_task_server, "/generate", {"n": 4, "class": "bag", "seed": seed})
    assert again.content == first.content
    other = post(every_task_server, "/generate", {"n": 4, "class": "bag"})
    assert other.headers["x-seed"] != first.headers["x-seed"]


def test_class_names_are_case_insensitive(every_task_server):
    by_name = post(every_task_server, "/generate", {"n": 2, "seed": 1, "class": "  ankle BOOT "})
    by_index = post(every_task_server, "/generate", {"n": 2, "seed": 1, "class": 9})
    assert by_name.status_code == 200 and by_name.content == by_index.content


@pytest.mark.parametrize("scale", [1, 3])
def test_interpolation_ends_are_the_seeds_samples(every_task_server, scale):
    steps = 6
    response = post(every_task_server, "/generate/interpolate",
                    {"from_seed": 11, "to_seed": 12, "class": "Sneaker", "steps": steps, "scale": scale})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    strip = decode_png(response.content)
    assert strip.shape == (28 * scale + 2 * GAP * scale, steps * 28 * scale + (steps + 1) * GAP * scale)
    for seed, column in ((11, 0), (12, steps - 1)):
        sample = post(every_task_server, "/generate",
                      {"n": 1, "seed": seed, "class": 7, "scale": scale, "format": "images"}).json()
        assert np.array_equal(cell(strip, 0, column, scale), decode_png(base64.b64decode(sample["images"][0]["png"])))
    middle = [cell(strip, 0, c, scale) for c in range(1, steps - 1)]
    assert not any(np.array_equal(middle[0], m) for m in (cell(strip, 0, 0, scale), cell(strip, 0, steps - 1, scale)))


def test_interpolation_is_reproducible(every_task_server):
    body = {"from_seed": 3, "to_seed": 4, "class": 1, "steps": 4}
    assert post(every_task_server, "/generate/interpolate", body).content == \
        post(every_task_server, "/generate/interpolate", body).content


@pytest.mark.parametrize("path, body, status, code, field", [
    ("/generate", {"n": 0}, 422, "invalid_parameter", "n"),
    ("/generate", {"n": 65}, 422, "invalid_parameter", "n"),
    ("/generate", {"n": True}, 422, "invalid_parameter", "n"),
    ("/generate", {"class": "cat"}, 422, "unknown_class", "class"),
    ("/generate", {"class": -1}, 422, "unknown_class", "class"),
    ("/generate", {"class": [1]}, 422, "invalid_parameter", "class"),
    ("/generate", {"seed": -1}, 422, "invalid_parameter", "seed"),
    ("/generate", {"seed": "abc"}, 422, "invalid_parameter", "seed"),
    ("/generate", {"format": "gif"}, 422, "invalid_parameter", "format"),
    ("/generate", {"scale": 0}, 422, "invalid_parameter", "scale"),
    ("/generate", {"scale": 9}, 422, "invalid_parameter", "scale"),
    ("/generate", {"model": "nope"}, 404, "unknown_model", "model"),
    ("/generate/interpolate", {"to_seed": 1, "class": 0}, 422, "invalid_parameter", "from_seed"),
    ("/generate/interpolate", {"from_seed": 1, "to_seed": 2}, 422, "invalid_parameter", "class"),
    ("/generate/interpolate", {"from_seed": 1, "to_seed": 2, "class": 0, "steps": 33}, 422, "invalid_parameter",
     "steps"),
    ("/generate/interpolate", {"from_seed": -5, "to_seed": 2, "class": 0}, 422, "invalid_parameter", "from_seed"),
])
def test_bad_requests_get_a_clear_4xx(every_task_server, path, body, status, code, field):
    assert_error(post(every_task_server, path, body), status, code, field)


def test_n_over_the_servers_limit(every_task_server):
    assert post(every_task_server, "/generate", {"n": SAMPLE_LIMIT}).status_code == 200
    assert_error(post(every_task_server, "/generate", {"n": SAMPLE_LIMIT + 1}), 422, "too_many_samples", "n")


def test_an_empty_body_is_not_json(every_task_server):
    assert_error(httpx.post(every_task_server.url + "/generate", content=b"", timeout=10), 415,
                 "unsupported_media_type")


def test_an_empty_json_object_gets_the_defaults(every_task_server):
    response = post(every_task_server, "/generate", {})
    grid = decode_png(response.content)
    assert response.status_code == 200 and grid.shape == (4 * 28 + 5 * GAP, 4 * 28 + 5 * GAP)  # 16 samples


def test_models_lists_the_generator(every_task_server):
    described = httpx.get(every_task_server.url + "/models", timeout=10).json()
    assert described["default"]["generation"] == "dcgan"
    (entry,) = [m for m in described["models"] if m["name"] == "dcgan"]
    assert entry["task"] == "generation" and entry["status"] == "available"
    assert entry["provider"] == "CPUExecutionProvider"
    assert httpx.post(every_task_server.url + "/generate/nothing", timeout=10).status_code == 404


def test_a_server_without_a_generator_answers_503(tampered_server):
    """A server over a folder of classifiers only: /generate says no generator is loaded."""
    response = httpx.post(tampered_server.url + "/generate", json={"n": 1}, timeout=10)
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"


def test_queued_samples_over_the_bound_get_503_with_retry_after(tmp_path, generator_models):
    """VISIONSERVE_GENERATE_MAX_QUEUED_SAMPLES: a burst beyond the bound is shed, not queued without end."""
    from concurrent.futures import ThreadPoolExecutor

    running = start_server(tmp_path / "server.log", {"VISIONSERVE_MODELS_DIR": str(generator_models),
                                                     "VISIONSERVE_GENERATE_MAX_QUEUED_SAMPLES": "64"})
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda seed: post(running, "/generate", {"n": 64, "seed": seed}), range(32)))
        statuses = {a.status_code for a in answers}
        assert statuses <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        for answer in answers:
            if answer.status_code == 503:
                assert answer.json()["error"]["code"] == "overloaded" and answer.headers["retry-after"] == "1"
        assert post(running, "/generate", {"n": 4, "seed": 1}).status_code == 200  # serving again at once
    finally:
        stop_server(running)
