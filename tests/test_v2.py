"""The Open Inference Protocol V2 routes (service/v2.py) driven by the real tritonclient against the session server."""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.server
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def cards() -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(MODELS_DIR.glob("*/card.json"))}


def of_task(task: str) -> list[str]:
    return [name for name, card in cards().items() if card["task"] == task]


@pytest.fixture(scope="module")
def client(server):
    with tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"), concurrency=16) as triton:
        yield triton


@functools.cache
def reference_session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS_DIR / name / "model.onnx"), providers=["CPUExecutionProvider"])


def reference(name: str, output: str, feeds: dict) -> np.ndarray:
    return reference_session(name).run([output], feeds)[0]


@functools.cache
def classifier_reference(name: str, images: int) -> dict[str, np.ndarray]:
    """probabilities and embedding of the first `images` test images, computed once per model for the module."""
    from training.data import load_dataset  # the same first images as the fashion_test_images fixture

    pixels = np.ascontiguousarray(load_dataset("fashion-mnist", "test").images[:images].numpy())
    probabilities, embedding = reference_session(name).run(["probabilities", "embedding"], {"pixels": pixels})
    return {"probabilities": probabilities, "embedding": embedding}


def test_server_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "visionserve" and "binary_tensor_data" in metadata["extensions"]


@pytest.mark.parametrize("name", sorted(cards()))
def test_model_metadata_and_ready(client, name):
    metadata = client.get_model_metadata(name)
    assert metadata["name"] == name and metadata["platform"] == "onnxruntime_onnx"
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, metadata["versions"][0])
    assert all(spec["shape"][0] == -1 for spec in metadata["inputs"] + metadata["outputs"])
    # Every output of the graph is served (a classifier's probabilities and embedding, a segmenter's mask and
    # probabilities), with the graph's datatypes.
    graph = {node.name: node.type for node in reference_session(name).get_outputs()}
    assert {spec["name"] for spec in metadata["outputs"]} == set(graph)
    ort_types = {"FP32": "tensor(float)", "UINT8": "tensor(uint8)", "INT64": "tensor(int64)"}
    assert all(ort_types[spec["datatype"]] == graph[spec["name"]] for spec in metadata["outputs"])


@pytest.mark.parametrize("binary", [True, False])
def test_classifier_top1_equals_onnxruntime(client, fashion_test_images, binary):
    # Binary asks for both outputs; JSON for the probabilities (a 256 x 512 embedding in JSON is slow to no end).
    names = ["probabilities", "embedding"] if binary else ["probabilities"]
    for name in of_task("classification"):
        # The ResNet ensemble (40 ResNet-20 passes per image) is checked on 256 images in binary, 64 in JSON: the
        # JSON path is the same for every model, and 192 more ensemble images cost ~13 s of CI on 2 cores.
        count = 64 if name == "resnet" and not binary else 256
        pixels = np.ascontiguousarray(fashion_test_images[0][:count])
        tensor = tritonclient_http.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer(name, [tensor], outputs=[
            tritonclient_http.InferRequestedOutput(output, binary_data=binary) for output in names], request_id="r1")
        expected = {key: value[:count] for key, value in classifier_reference(name, 256).items()}
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (count, 10) and result.get_response()["id"] == "r1"
        assert [output["name"] for output in result.get_response()["outputs"]] == names
        assert (probabilities.argmax(1) == expected["probabilities"].argmax(1)).all()
        # The server's batch may be cut differently from this one call: equal up to float rounding.
        for output in names:
            np.testing.assert_allclose(result.as_numpy(output), expected[output], rtol=1e-4, atol=1e-5)


def test_no_outputs_named_means_every_output(client, fashion_test_images):
    pixels = np.ascontiguousarray(fashion_test_images[0][:4])
    name = of_task("classification")[0]
    tensor = tritonclient_http.InferInput("pixels", [4, 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(name, [tensor])
    assert {output["name"] for output in result.get_response()["outputs"]} == {"probabilities", "embedding"}
    np.testing.assert_allclose(result.as_numpy("embedding"), classifier_reference(name, 4)["embedding"],
                               rtol=1e-4, atol=1e-5)


def test_segmenter_and_generator_equal_onnxruntime(client, fashion_test_images):
    for name in of_task("segmentation"):
        scene = np.zeros((1, 1, 64, 64), np.uint8)
        scene[0, 0, 4:32, 4:32] = fashion_test_images[0][0, 0]
        tensor = tritonclient_http.InferInput("pixels", [1, 1, 50, 60], "UINT8")  # padded to 64 x 64, cropped back
        tensor.set_data_from_numpy(np.ascontiguousarray(scene[:, :, :50, :60]))
        result = client.infer(name, [tensor], outputs=[tritonclient_http.InferRequestedOutput(output)
                                                       for output in ("mask", "probabilities")])
        np.testing.assert_array_equal(result.as_numpy("mask"), reference(name, "mask", {"pixels": scene})[:, :50, :60])
        np.testing.assert_allclose(result.as_numpy("probabilities"),
                                   reference(name, "probabilities", {"pixels": scene})[:, :, :50, :60], atol=1e-5)
    for name in of_task("generation"):
        z = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
        label = np.arange(4, dtype=np.int64)
        inputs = [tritonclient_http.InferInput("z", [4, 100], "FP32"), tritonclient_http.InferInput("label", [4], "INT64")]
        inputs[0].set_data_from_numpy(z)
        inputs[1].set_data_from_numpy(label, binary_data=False)
        pixels = client.infer(name, inputs).as_numpy("pixels")
        np.testing.assert_array_equal(pixels, reference(name, "pixels", {"z": z, "label": label}))


def png_files(images: np.ndarray) -> list[bytes]:
    """PNG files of a few shapes and polarities /classify fits: 28x28 as is, enlarged, dark on a light background."""
    files = []
    for index, image in enumerate(images[:, 0]):
        picture = Image.fromarray(image)
        if index % 3 == 1:
            picture = picture.resize((41, 35))
        elif index % 3 == 2:
            picture = Image.fromarray(255 - image)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def test_bytes_input_of_png_files_answers_as_classify(client, server_url, fashion_test_images):
    files = png_files(fashion_test_images[0][:12])
    for name in of_task("classification"):
        native = httpx.post(f"{server_url}/classify", data={"model": name, "top_k": 10},
                            files=[("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(files)],
                            timeout=60).json()["predictions"]
        tensor = tritonclient_http.InferInput("pixels", [len(files)], "BYTES")
        tensor.set_data_from_numpy(np.array(files, dtype=object))  # binary: 4-byte length + bytes per element
        probabilities = client.infer(name, [tensor], outputs=[
            tritonclient_http.InferRequestedOutput("probabilities")]).as_numpy("probabilities")
        for row, prediction in zip(probabilities, native):
            top = prediction["top_k"]
            assert [p["index"] for p in top] == list(np.argsort(-row, kind="stable"))
            np.testing.assert_allclose([p["probability"] for p in top], np.sort(row)[::-1], rtol=1e-4, atol=1e-6)
    # In JSON a BYTES element is a string: the image file in base64 (JSON cannot carry a PNG's bytes).
    name = of_task("classification")[0]
    body = {"inputs": [{"name": "pixels", "shape": [len(files), 1], "datatype": "BYTES",
                        "data": [base64.b64encode(data).decode() for data in files]}],
            "outputs": [{"name": "probabilities"}], "parameters": {"invert": "auto"}}
    answer = httpx.post(f"{server_url}/v2/models/{name}/infer", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    served = np.array(output["data"], np.float32).reshape(output["shape"])
    tensor = tritonclient_http.InferInput("pixels", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))
    np.testing.assert_allclose(served, client.infer(name, [tensor]).as_numpy("probabilities"), rtol=1e-4, atol=1e-6)


def test_bytes_input_of_a_png_scene_segments_as_segment(client, server_url, fashion_test_images):
    scene = np.full((50, 60), 255, np.uint8)  # dark items on white paper: /segment inverts it
    scene[4:32, 4:32] = 255 - fashion_test_images[0][0, 0]
    scene[20:48, 30:58] = 255 - fashion_test_images[0][1, 0]
    buffer = io.BytesIO()
    Image.fromarray(scene).save(buffer, format="PNG")
    for name in of_task("segmentation"):
        native = httpx.post(f"{server_url}/segment", data={"model": name, "format": "mask"},
                            files={"image": ("scene.png", buffer.getvalue(), "image/png")}, timeout=60)
        expected = np.asarray(Image.open(io.BytesIO(native.content)))
        tensor = tritonclient_http.InferInput("pixels", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([buffer.getvalue()] * 2, dtype=object))
        mask = client.infer(name, [tensor], outputs=[tritonclient_http.InferRequestedOutput("mask")]).as_numpy("mask")
        assert mask.shape == (2, 50, 60) and expected.any()
        np.testing.assert_array_equal(mask[0], expected)
        np.testing.assert_array_equal(mask[1], expected)


def test_async_infer_sixteen_in_flight(client, fashion_test_images):
    pixels = np.ascontiguousarray(fashion_test_images[0][:16])
    name = of_task("classification")[0]
    pending = []
    for i in range(16):
        tensor = tritonclient_http.InferInput("pixels", [1, 1, 28, 28], "UINT8")
        tensor.set_data_from_numpy(pixels[i:i + 1])
        pending.append(client.async_infer(name, [tensor]))
    served = np.concatenate([request.get_result().as_numpy("probabilities") for request in pending])
    assert (served.argmax(1) == reference(name, "probabilities", {"pixels": pixels}).argmax(1)).all()


def test_unknown_model_raises_with_the_servers_message(client):
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        client.get_model_metadata("nope")


def test_statistics_count_this_tests_requests(client, server_url, fashion_test_images):
    name = of_task("classification")[0]
    assert "statistics" in client.get_server_metadata()["extensions"]

    def figures() -> dict:
        (stats,) = client.get_inference_statistics(name)["model_stats"]
        return stats

    before = figures()
    for count in (1, 3):
        tensor = tritonclient_http.InferInput("pixels", [count, 1, 28, 28], "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(fashion_test_images[0][:count]))
        client.infer(name, [tensor])
    body, _ = infer_body({"inputs": [{**PIXELS, "data": [0] * 10}]})
    assert httpx.post(f"{server_url}/v2/models/{name}/infer", content=body, timeout=10).status_code == 400
    after = figures()
    success, fail = (after["inference_stats"][kind] for kind in ("success", "fail"))
    assert success["count"] - before["inference_stats"]["success"]["count"] == 2
    assert fail["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert after["inference_count"] - before["inference_count"] == 4
    assert success["ns"] > before["inference_stats"]["success"]["ns"] and after["execution_count"] >= 2
    assert {"model_stats"} == set(client.get_inference_statistics())
    assert {stats["name"] for stats in client.get_inference_statistics()["model_stats"]} == set(cards())
    protocol_error(httpx.get(f"{server_url}/v2/models/nope/stats", timeout=10), 404)


def test_repository_index_lists_every_model_ready(client):
    index = client.get_model_repository_index()
    assert sorted(item["name"] for item in index) == sorted(cards())
    assert all(item["state"] == "READY" and item["version"] == client.get_model_metadata(item["name"])["versions"][0]
               for item in index)


def infer_body(header: dict, binary: bytes = b"") -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + binary, ({"Inference-Header-Content-Length": str(len(text))} if binary else {})


PIXELS = {"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8"}
BINARY_PIXELS = {**PIXELS, "parameters": {"binary_data_size": 784}}
BYTES = {"name": "pixels", "shape": [1], "datatype": "BYTES"}
MALFORMED = {
    "not json": (b"{", {}),
    "no inputs": infer_body({"inputs": []}),
    "shape vs data": infer_body({"inputs": [{**PIXELS, "data": [0] * 10}]}),
    "datatype not taken": infer_body({"inputs": [{**PIXELS, "datatype": "FP32", "data": [0.0] * 784}]}),
    "unknown datatype": infer_body({"inputs": [{**PIXELS, "datatype": "COMPLEX", "data": [0] * 784}]}),
    "value out of range": infer_body({"inputs": [{**PIXELS, "data": [256] * 784}]}),
    "a boolean in UINT8 data": infer_body({"inputs": [{**PIXELS, "data": [True] + [0] * 783}]}),
    "a float in UINT8 data": infer_body({"inputs": [{**PIXELS, "data": [[0.5] + [0] * 783]}]}),
    "missing input": infer_body({"inputs": [{"name": "other", "shape": [1], "datatype": "UINT8", "data": [0]}]}),
    "input twice": infer_body({"inputs": [{**PIXELS, "data": [0] * 784}] * 2}),
    "unknown output": infer_body({"inputs": [{**PIXELS, "data": [0] * 784}], "outputs": [{"name": "nope"}]}),
    "negative binary size": infer_body({"inputs": [{**PIXELS, "parameters": {"binary_data_size": -1}}]}, b"\0"),
    "binary past the body": infer_body({"inputs": [BINARY_PIXELS]}, b"\0" * 10),
    "binary size vs shape": infer_body({"inputs": [{**PIXELS, "parameters": {"binary_data_size": 10}}]}, b"\0" * 10),
    "binary left over": infer_body({"inputs": [BINARY_PIXELS]}, b"\0" * 790),
    "header length past the body": (b"{}", {"Inference-Header-Content-Length": "99"}),
    "header length not an integer": (b"{}", {"Inference-Header-Content-Length": "two"}),
    "header length negative": (b"{}", {"Inference-Header-Content-Length": "-2"}),
    "header length not ascii digits": (b"{}", {"Inference-Header-Content-Length": "\u00b2".encode("latin-1")}),
    "output parameters not an object": infer_body({"inputs": [{**PIXELS, "data": [0] * 784}],
                                                   "outputs": [{"name": "probabilities", "parameters": "yes"}]}),
    # Nothing of the declared size may be allocated: 10**12 images of 784 bytes, in JSON and in binary.
    "huge shape": infer_body({"inputs": [{**PIXELS, "shape": [10**12, 1, 28, 28], "data": [0]}]}),
    "huge binary shape": infer_body({"inputs": [{**BINARY_PIXELS, "shape": [10**12, 1, 28, 28]}]}, b"\0" * 784),
    "huge bytes shape": infer_body({"inputs": [{**BYTES, "shape": [10**12], "parameters": {"binary_data_size": 8}}]},
                                   b"\0" * 8),
    "bytes length past its size": infer_body({"inputs": [{**BYTES, "parameters": {"binary_data_size": 8}}]},
                                             (1000).to_bytes(4, "little") + b"\0" * 4),
    "bytes count vs shape": infer_body({"inputs": [{**BYTES, "shape": [2], "parameters": {"binary_data_size": 8}}]},
                                       (4).to_bytes(4, "little") + b"\0" * 4),
    "bytes not base64": infer_body({"inputs": [{**BYTES, "data": ["not base64!"]}]}),
    "bytes not a string": infer_body({"inputs": [{**BYTES, "data": [7]}]}),
    "bytes not an image": infer_body({"inputs": [{**BYTES, "data": [base64.b64encode(b"hello").decode()]}]}),
    "bad invert": infer_body({"inputs": [{**BYTES, "data": [""]}], "parameters": {"invert": "maybe"}}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bodies_are_clean_400s(server_url, case):
    body, headers = MALFORMED[case]
    name = of_task("classification")[0]
    answer = httpx.post(f"{server_url}/v2/models/{name}/infer", content=body, headers=headers, timeout=30)
    assert answer.status_code == 400, (case, answer.text)
    assert set(answer.json()) <= {"error", "request_id"} and isinstance(answer.json()["error"], str)
    assert httpx.get(server_url + "/v2/health/live", timeout=10).status_code == 200


def test_bytes_are_refused_by_the_generator(server_url):
    for name in of_task("generation"):
        body, headers = infer_body({"inputs": [{"name": "z", "shape": [1], "datatype": "BYTES", "data": ["AA=="]},
                                               {"name": "label", "shape": [1], "datatype": "INT64", "data": [0]}]})
        answer = httpx.post(f"{server_url}/v2/models/{name}/infer", content=body, headers=headers, timeout=30)
        assert answer.status_code == 400 and "takes FP32, not BYTES" in answer.json()["error"], answer.text


def protocol_error(answer: httpx.Response, status: int) -> str:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert set(answer.json()) <= {"error", "request_id"} and isinstance(answer.json()["error"], str), answer.text
    return answer.json()["error"]


def test_unknown_version_and_path_are_protocol_404s(server_url):
    name = of_task("classification")[0]
    for path in (f"/v2/models/{name}/versions/nope", "/v2/nothing/here", "/v2/models/nope/ready"):
        protocol_error(httpx.get(server_url + path, timeout=10), 404)
    body, _ = infer_body({"inputs": [{**PIXELS, "data": [0] * 784}]})
    assert "no model named 'nope'" in protocol_error(httpx.post(f"{server_url}/v2/models/nope/infer", content=body,
                                                                timeout=10), 404)
    protocol_error(httpx.post(f"{server_url}/v2/models/{name}/versions/nope/infer", content=body, timeout=10), 404)


def test_wrong_method_is_a_protocol_405(server_url):
    name = of_task("classification")[0]
    for method, path in (("POST", f"/v2/models/{name}"), ("GET", f"/v2/models/{name}/infer"), ("POST", "/v2"),
                         ("DELETE", "/v2/health/live")):
        answer = httpx.request(method, server_url + path, timeout=10)
        protocol_error(answer, 405)
        assert answer.headers.get("allow"), (method, path)


def test_a_body_over_the_limit_is_a_protocol_413(server):
    limit = int(server.env["VISIONSERVE_MAX_BODY_BYTES"])
    name = of_task("classification")[0]
    protocol_error(httpx.post(f"{server.url}/v2/models/{name}/infer", content=b"\0" * (limit + 1), timeout=30), 413)

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    protocol_error(httpx.post(f"{server.url}/v2/models/{name}/infer", content=chunks(), timeout=60), 413)


def test_overload_is_a_protocol_503_with_retry_after(tampered_server):
    # The tampered server queues at most one image: a request of two is over the batcher's bound.
    tensor = {**PIXELS, "shape": [2, 1, 28, 28], "parameters": {"binary_data_size": 2 * 784}}
    body, headers = infer_body({"inputs": [tensor]}, b"\0" * (2 * 784))
    answer = httpx.post(f"{tampered_server.url}/v2/models/good/infer", content=body, headers=headers, timeout=30)
    protocol_error(answer, 503)
    assert int(answer.headers["retry-after"]) >= 1
    protocol_error(httpx.get(f"{tampered_server.url}/v2/models/tampered/ready", timeout=10), 400)


def test_admission_limit_answers_protocol_503_under_v2():
    """The middleware that refuses at the door (off on the session server), in-process over a real ASGI app."""
    import asyncio

    from starlette.applications import Starlette

    from service.middleware import AdmissionLimit

    limit = AdmissionLimit(Starlette(), max_in_flight=lambda: 1, retry_after=lambda: 7, max_body_bytes=lambda: 1024)
    limit.in_flight = 1  # one request already in progress

    async def call(path: str) -> tuple[dict, bytes]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        await limit({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
        return sent[0], sent[1]["body"]

    for path, shape in (("/v2/models/cnn/infer", "protocol"), ("/classify", "ours")):
        start, body = asyncio.run(call(path))
        assert start["status"] == 503 and (b"retry-after", b"7") in start["headers"]
        error = json.loads(body)["error"]
        assert isinstance(error, str) if shape == "protocol" else set(error) == {"code", "message", "field"}


def test_serving_docs_tritonclient_example_runs_as_written(server_url, tmp_path):
    import os
    import re
    import subprocess
    import sys

    repo = MODELS_DIR.parent
    section = (repo / "docs" / "SERVING.md").read_text().split("## Open Inference Protocol (V2)", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    result = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:3000", server_url.removeprefix("http://"))],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr
    names, top1, bytes_top1 = result.stdout.strip().splitlines()
    assert names == "['probabilities', 'embedding']"
    expected = classifier_reference("cnn", 64)["probabilities"].argmax(1)
    assert top1 == f"{expected[:8]} (64, 128)"  # the same top-1 as onnxruntime on the same images
    assert bytes_top1 == f"[{expected[0]}]"  # the first image, sent as a PNG file
