"""Security of the served API: no outbound fetch of client URLs, the optional API key, CORS closed, loopback
by default, refused models and start-up without models.

Two real servers: the shared every-task server (no key) and one started here with VISIONSERVE_API_KEY, a
model whose graph does not load, and no --host (so it listens where the service's own default says).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODELS_DIR, REPO, classification_cards, start_server, stop_server
from helpers import LEAK_MARKERS, assert_error, png
from service.config import ServingConfig, api_key_from_environment

pytestmark = pytest.mark.server
API_KEY = "test-key-5f2c9a71e4b8"


# --- no outbound request for a URL sent by a client ---------------------------------------------------

class ConnectionWatcher:
    """A local TCP port that records whether anything connected to it."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/secret.png"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> int:
        self.stopped.set()
        self.thread.join()
        self.listener.close()
        return self.connections


def test_urls_sent_as_images_get_a_4xx_and_are_never_fetched(every_task_server):
    watcher = ConnectionWatcher()
    url = every_task_server.url
    as_text_field = [("other", ("x.bin", b"x", "application/octet-stream"))]  # keeps the body multipart
    answers = {
        "classify images field": httpx.post(url + "/classify", data={"images": watcher.url}, files=as_text_field),
        "segment image field": httpx.post(url + "/segment", data={"image": watcher.url}, files=as_text_field),
        "classify file holding a URL": httpx.post(url + "/classify", files=[
            ("images", ("link.png", watcher.url.encode(), "text/uri-list"))]),
        "classify model field": httpx.post(url + "/classify", data={"model": watcher.url},
                                           files=[("images", ("a.png", png(), "image/png"))]),
        "classify/json": httpx.post(url + "/classify/json", json={"images": [watcher.url]}),
        "segment json": httpx.post(url + "/segment", json={"image": watcher.url}),
        "data URL pointing elsewhere": httpx.post(url + "/classify/json", json={"images": [f"data:,{watcher.url}"]}),
    }
    time.sleep(1.0)  # a fetch started by any of them would have connected by now
    connections = watcher.close()
    expected = {"classify images field": (422, "not_a_file", "images"),
                "segment image field": (422, "not_a_file", "image"),
                "classify file holding a URL": (415, "unsupported_image", "images[0]"),
                "classify model field": (404, "unknown_model", "model"),
                "classify/json": (400, "invalid_base64", "images[0]"),
                "segment json": (400, "invalid_base64", "image"),
                "data URL pointing elsewhere": (400, "invalid_base64", "images[0]")}
    for name, response in answers.items():
        assert_error(response, *expected[name])
    assert connections == 0, "the server connected to a URL sent by a client"


# --- CORS ----------------------------------------------------------------------------------------------

def test_cors_is_closed_by_default(every_task_server):
    origin = {"Origin": "http://evil.example"}
    for path in ("/models", "/openapi.json", "/docs.json", "/readyz"):
        response = httpx.get(every_task_server.url + path, headers=origin, timeout=10)
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers, path
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for path in ("/classify", "/classify/json", "/segment", "/generate", "/models", "/docs.json"):
        response = httpx.options(every_task_server.url + path, headers=preflight, timeout=10)
        assert response.status_code == 405, (path, response.status_code)  # not granted
        assert not any(name.startswith("access-control-") for name in response.headers), (path, response.headers)


# --- where it listens ------------------------------------------------------------------------------------

def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets in LISTEN state on `port`, from /proc/net/tcp and tcp6."""
    addresses = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                if width == 8:
                    addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                else:
                    addresses.add(address)
    return addresses


def test_a_bare_bentoml_serve_listens_on_loopback_only(auth_server):
    port = int(auth_server.url.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}


def test_make_serve_and_the_docs_bind_loopback():
    assert re.search(r"^HOST\s*\?=\s*127\.0\.0\.1$", (REPO / "Makefile").read_text(), re.M)
    assert "--host 127.0.0.1" in (REPO / "docs" / "SERVING.md").read_text()


# --- the optional API key ---------------------------------------------------------------------------------

def test_api_key_configuration():
    assert api_key_from_environment({}) is None
    assert api_key_from_environment({"VISIONSERVE_API_KEY": "  "}) is None
    assert api_key_from_environment({"VISIONSERVE_API_KEY": " k3y "}) == "k3y"
    assert ServingConfig.from_environ({"VISIONSERVE_API_KEY": "k3y"}).api_key_required
    assert not ServingConfig.from_environ({}).api_key_required


@pytest.fixture(scope="module")
def auth_models(tmp_path_factory) -> Path:
    """A released classifier, and a model whose card matches its file but whose graph does not load."""
    models = tmp_path_factory.mktemp("auth-models")
    name = next(iter(classification_cards()))
    shutil.copytree(MODELS_DIR / name, models / name)
    shutil.copytree(MODELS_DIR / name, models / "broken")
    garbage = b"this is not an ONNX graph"
    (models / "broken" / "model.onnx").write_bytes(garbage)
    card = json.loads((models / "broken" / "card.json").read_text())
    card.update(name="broken", sha256=hashlib.sha256(garbage).hexdigest())
    (models / "broken" / "card.json").write_text(json.dumps(card))
    return models


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, auth_models):
    running = start_server(tmp_path_factory.mktemp("auth-server") / "server.log",
                           {"VISIONSERVE_MODELS_DIR": str(auth_models), "VISIONSERVE_API_KEY": API_KEY,
                            "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, host=None)
    yield running
    stop_server(running)


GUARDED = [("GET", "/models", {}), ("GET", "/models/broken", {}), ("GET", "/openapi.json", {}),
           ("GET", "/docs", {}), ("GET", "/docs.json", {}), ("GET", "/schema.json", {}), ("GET", "/metrics", {}),
           ("POST", "/classify", {"files": [("images", ("a.png", png(), "image/png"))]}),
           ("POST", "/classify/json", {"json": {"images": []}}), ("POST", "/classify/tensor", {"content": b""}),
           ("POST", "/segment", {"json": {}}), ("POST", "/generate", {"json": {}}),
           ("POST", "/generate/interpolate", {"json": {}}), ("GET", "/no-such-path", {})]


@pytest.mark.parametrize("method, path, request_args", GUARDED, ids=[f"{m} {p}" for m, p, _ in GUARDED])
def test_without_the_key_every_route_answers_401(auth_server, method, path, request_args):
    response = httpx.request(method, auth_server.url + path, timeout=10, **request_args)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="visionserve"'


@pytest.mark.parametrize("method, path", [("GET", "/v2"), ("GET", "/v2/models/broken"),
                                          ("POST", "/v2/models/broken/infer"), ("GET", "/v2/no-such-path")])
def test_without_the_key_v2_routes_answer_401_in_the_protocols_shape(auth_server, method, path):
    response = httpx.request(method, auth_server.url + path, timeout=10)
    assert response.status_code == 401 and response.headers["content-type"].startswith("application/json")
    assert set(response.json()) <= {"error", "request_id"} and "API key" in response.json()["error"], response.text
    assert response.headers["www-authenticate"] == 'Bearer realm="visionserve"'
    assert httpx.get(auth_server.url + "/v2", headers={"X-API-Key": API_KEY}, timeout=10).status_code == 200


@pytest.mark.parametrize("path", ["/livez", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"])
def test_probes_need_no_key(auth_server, path):
    assert httpx.get(auth_server.url + path, timeout=10).status_code == 200


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": f"Bearer {API_KEY[:-1]}"},          # a prefix
    {"Authorization": f"Bearer {API_KEY}x"},               # one character more
    {"Authorization": f"Bearer {API_KEY.upper()}"},
    {"X-API-Key": "wrong-key"},
    {"Authorization": "Bearer"},
], ids=["wrong", "prefix", "longer", "case", "x-api-key-wrong", "empty-bearer"])
def test_a_wrong_key_is_401_invalid_token(auth_server, headers):
    response = httpx.get(auth_server.url + "/models", headers=headers, timeout=10)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="visionserve", error="invalid_token"'


def test_the_key_in_another_scheme_is_not_accepted(auth_server):
    response = httpx.get(auth_server.url + "/models", headers={"Authorization": f"Basic {API_KEY}"}, timeout=10)
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"bearer {API_KEY}"},
                                     {"X-API-Key": API_KEY},
                                     {"Authorization": "Bearer wrong", "X-API-Key": API_KEY}],
                         ids=["bearer", "bearer-lowercase", "x-api-key", "either-header"])
def test_the_key_opens_every_route(auth_server, headers):
    for path in ("/models", "/openapi.json", "/docs.json", "/metrics"):
        assert httpx.get(auth_server.url + path, headers=headers, timeout=10).status_code == 200, path
    response = httpx.post(auth_server.url + "/classify", headers=headers, timeout=30,
                          files=[("images", ("a.png", png(), "image/png"))])
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1, response.text


def test_the_document_declares_the_key_and_the_log_never_shows_it(auth_server):
    document = httpx.get(auth_server.url + "/openapi.json", headers={"X-API-Key": API_KEY}, timeout=10).json()
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert document["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "401" in document["paths"]["/classify"]["post"]["responses"]
    assert "API key authentication on" in auth_server.log()
    assert API_KEY not in auth_server.log()


def test_a_cors_preflight_is_not_refused_for_lack_of_a_key(auth_server):
    # Browsers never send credentials on a preflight; without CORS configured it is simply not granted.
    response = httpx.options(auth_server.url + "/classify", timeout=10, headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
    assert response.status_code == 405 and "access-control-allow-origin" not in response.headers


# --- refused models, and start-up without models -------------------------------------------------------

def test_a_model_that_does_not_load_is_unavailable_and_says_why_without_paths(auth_server, auth_models):
    headers = {"X-API-Key": API_KEY}
    listed = httpx.get(auth_server.url + "/models", headers=headers, timeout=10).json()["models"]
    described = {model["name"]: model for model in listed}
    assert described["broken"]["status"] == "unavailable"
    reason = described["broken"]["unavailable_reason"]
    assert reason.startswith("could not load it:") and "INVALID_PROTOBUF" in reason
    for marker in LEAK_MARKERS:
        assert marker not in reason, reason
    assert str(auth_models) in auth_server.log()  # the log keeps the whole message
    assert "model broken refused" in auth_server.log()
    others = [name for name, model in described.items() if name != "broken"]
    assert others and all(described[name]["status"] == "available" for name in others)
    response = httpx.post(auth_server.url + "/classify", headers=headers, data={"model": "broken"}, timeout=30,
                          files=[("images", ("a.png", png(), "image/png"))])
    assert_error(response, 503, "model_unavailable")


@pytest.mark.parametrize("models_dir, says", [
    ("no-such-folder", "is not a folder"),
    ("empty-folder", "no models in"),
])
def test_start_up_without_models_stops_and_says_what_to_run(tmp_path, models_dir, says):
    (tmp_path / "empty-folder").mkdir()
    started = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "serve", "service.app:VisionService",
                             "--port", "1"], cwd=REPO, capture_output=True, text=True, timeout=90,
                            env={**os.environ, "VISIONSERVE_MODELS_DIR": str(tmp_path / models_dir),
                                 "BENTOML_DO_NOT_TRACK": "True"})
    output = result.stdout + result.stderr
    assert result.returncode != 0 and time.monotonic() - started < 60
    assert says in output and "python -m service.model_store import models" in output, output[-2000:]


def test_make_serve_without_exported_models_says_what_to_run(tmp_path):
    # `models-present` is make serve's check; it has no prerequisites, so this installs nothing.
    result = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "models-present"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "training.train" in result.stdout and "export.classifier" in result.stdout, result.stdout
