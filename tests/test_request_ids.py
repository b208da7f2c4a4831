"""X-Request-ID on every answer of the session server: the client's when well formed, else a new one; in every
error body, whichever layer answered (a route, the body-limit middleware, BentoML's own 404)."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from helpers import png
from service.request_context import RequestIdInAccessLog, current_request_id, request_id_from

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("sent, kept", [("abc-123_X.9", True), ("a" * 128, True), ("a" * 129, False),
                                        ("has space", False), ("semi;colon", False), ("", False), ("é", False)])
def test_only_a_well_formed_client_id_is_kept(sent, kept):
    chosen = request_id_from([(b"x-request-id", sent.encode())])
    assert (chosen == sent) is kept
    if not kept:
        assert GENERATED.fullmatch(chosen)
    # Two ids in one request: neither is trusted.
    assert GENERATED.fullmatch(request_id_from([(b"x-request-id", b"one"), (b"X-Request-ID", b"two")]))


def test_a_client_id_is_echoed_and_a_missing_one_generated(server_url):
    sent = httpx.post(server_url + "/classify", files={"images": ("a.png", png(), "image/png")},
                      headers={"X-Request-ID": "client-7.a_b"}, timeout=30)
    assert sent.status_code == 200 and sent.headers["x-request-id"] == "client-7.a_b"
    first, second = (httpx.get(server_url + "/models", timeout=10) for _ in range(2))
    assert GENERATED.fullmatch(first.headers["x-request-id"]) and GENERATED.fullmatch(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    bad = httpx.get(server_url + "/models", headers={"X-Request-ID": "no spaces allowed"}, timeout=10)
    assert GENERATED.fullmatch(bad.headers["x-request-id"])
    # BentoML's own routes get one too.
    assert GENERATED.fullmatch(httpx.get(server_url + "/metrics", timeout=10).headers["x-request-id"])


@pytest.mark.parametrize("request_args, status", [
    (dict(method="POST", url="/classify", content=b"x", headers={"content-type": "text/plain"}), 415),  # a route
    (dict(method="GET", url="/models/nonesuch"), 404),
    # The body-limit middleware (4 MiB on the session server), by Content-Length, before any route runs.
    (dict(method="POST", url="/classify", content=b"\0" * (4 * 1024 * 1024 + 1),
          headers={"content-type": "application/octet-stream"}), 413),
    (dict(method="GET", url="/no-such-path"), 404),  # BentoML's plain-text 404, put in our shape
    (dict(method="GET", url="/classify%0A"), 404),  # the control-character middleware
], ids=["route-415", "unknown-model-404", "body-limit-413", "bentoml-404", "control-character-404"])
def test_every_error_body_carries_the_id(server_url, request_args, status):
    request_args = {**request_args, "url": server_url + request_args["url"]}
    headers = {**request_args.pop("headers", {}), "X-Request-ID": f"err-{status}"}
    response = httpx.request(**request_args, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"]["request_id"] == response.headers["x-request-id"] == f"err-{status}", body
    assert body["error"]["code"] and body["error"]["message"]
    assert int(response.headers["content-length"]) == len(response.content)


def test_protocol_errors_keep_their_shape_and_carry_the_id(server_url):
    response = httpx.post(server_url + "/v2/models/nonesuch/infer", json={"inputs": []},
                          headers={"X-Request-ID": "v2-err"}, timeout=10)
    assert response.status_code == 404
    body = response.json()
    assert isinstance(body["error"], str) and body["request_id"] == "v2-err"


def test_the_access_log_filter_appends_the_id_of_the_request_being_answered():
    record = logging.LogRecord("bentoml.access", logging.INFO, __file__, 1, "%s (%s) %.3fms",
                               ("127.0.0.1:1", "path=/classify", 1.5), None)
    token = current_request_id.set("abc")
    try:
        assert RequestIdInAccessLog().filter(record)
    finally:
        current_request_id.reset(token)
    assert record.getMessage() == "127.0.0.1:1 (path=/classify) 1.500ms request_id=abc"
