"""The Open Inference Protocol V2 routes (service/v2.py) driven by the real tritonclient against the session server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

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


def reference(name: str, output: str, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(str(MODELS_DIR / name / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run([output], feeds)[0]


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


@pytest.mark.parametrize("binary", [True, False])
def test_classifier_top1_equals_onnxruntime(client, fashion_test_images, binary):
    pixels = np.ascontiguousarray(fashion_test_images[0][:256])
    for name in of_task("classification"):
        tensor = tritonclient_http.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer(name, [tensor], outputs=[
            tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary)], request_id="r1")
        probabilities = result.as_numpy("probabilities")
        expected = reference(name, "probabilities", {"pixels": pixels})
        assert probabilities.shape == (256, 10) and result.get_response()["id"] == "r1"
        assert (probabilities.argmax(1) == expected.argmax(1)).all()


def test_segmenter_and_generator_equal_onnxruntime(client, fashion_test_images):
    for name in of_task("segmentation"):
        scene = np.zeros((1, 1, 64, 64), np.uint8)
        scene[0, 0, 4:32, 4:32] = fashion_test_images[0][0, 0]
        tensor = tritonclient_http.InferInput("pixels", [1, 1, 64, 64], "UINT8")
        tensor.set_data_from_numpy(scene)
        mask = client.infer(name, [tensor]).as_numpy("mask")
        np.testing.assert_array_equal(mask, reference(name, "mask", {"pixels": scene}))
    for name in of_task("generation"):
        z = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
        label = np.arange(4, dtype=np.int64)
        inputs = [tritonclient_http.InferInput("z", [4, 100], "FP32"), tritonclient_http.InferInput("label", [4], "INT64")]
        inputs[0].set_data_from_numpy(z)
        inputs[1].set_data_from_numpy(label, binary_data=False)
        pixels = client.infer(name, inputs).as_numpy("pixels")
        np.testing.assert_array_equal(pixels, reference(name, "pixels", {"z": z, "label": label}))


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


def infer_body(header: dict, binary: bytes = b"") -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + binary, ({"Inference-Header-Content-Length": str(len(text))} if binary else {})


PIXELS = {"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8"}
MALFORMED = {
    "not json": (b"{", {}),
    "no inputs": infer_body({"inputs": []}),
    "shape vs data": infer_body({"inputs": [{**PIXELS, "data": [0] * 10}]}),
    "datatype not taken": infer_body({"inputs": [{**PIXELS, "datatype": "FP32", "data": [0.0] * 784}]}),
    "unknown datatype": infer_body({"inputs": [{**PIXELS, "datatype": "COMPLEX", "data": [0] * 784}]}),
    "missing input": infer_body({"inputs": [{"name": "other", "shape": [1], "datatype": "UINT8", "data": [0]}]}),
    "unknown output": infer_body({"inputs": [{**PIXELS, "data": [0] * 784}], "outputs": [{"name": "nope"}]}),
    "negative binary size": infer_body({"inputs": [{**PIXELS, "parameters": {"binary_data_size": -1}}]}, b"\0"),
    "binary past the body": infer_body({"inputs": [{**PIXELS, "parameters": {"binary_data_size": 784}}]}, b"\0" * 10),
    "header length past the body": (b"{}", {"Inference-Header-Content-Length": "99"}),
    "huge shape": infer_body({"inputs": [{**PIXELS, "shape": [10**12, 1, 28, 28], "data": [0]}]}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bodies_are_clean_400s(server_url, case):
    body, headers = MALFORMED[case]
    name = of_task("classification")[0]
    answer = httpx.post(f"{server_url}/v2/models/{name}/infer", content=body, headers=headers, timeout=30)
    assert answer.status_code in (400, 413), (case, answer.text)
    assert isinstance(answer.json()["error"], str)
    assert httpx.get(server_url + "/v2/health/live", timeout=10).status_code == 200


def test_unknown_version_and_path_are_protocol_404s(server_url):
    name = of_task("classification")[0]
    for path in (f"/v2/models/{name}/versions/nope", "/v2/nothing/here"):
        answer = httpx.get(server_url + path, timeout=10)
        assert answer.status_code == 404 and isinstance(answer.json()["error"], str), path
