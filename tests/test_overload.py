"""Overload in small: a server with a tiny queue bound under a burst of concurrent requests sheds cleanly.

`make overload` (loadtests/overload.py) measures the same at 3x capacity for a minute; this is its CI check:
every answer is a 200 or a 503 with Retry-After in our error shape, the server stays ready, and it answers
normally right after the burst.
"""

from __future__ import annotations

import asyncio
import io
import select
import socket
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import MODELS_DIR, start_server, stop_server

pytestmark = pytest.mark.server

IMAGES_PER_REQUEST = 8
BURST = 64  # concurrent requests: far more images than the queue bound below admits


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    # One request's images fit the bound, a second one queued behind it does not.
    running = start_server(tmp_path_factory.mktemp("overload") / "server.log",
                           {"VISIONSERVE_MODELS_DIR": str(MODELS_DIR),
                            "VISIONSERVE_MAX_QUEUED_IMAGES": str(IMAGES_PER_REQUEST)})
    yield running
    stop_server(running)


async def burst(url: str, files: list) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post("/classify", files=files) for _ in range(BURST)))


def test_burst_gives_only_200_or_503_with_retry_after_and_the_server_recovers(small_queue_server):
    url = small_queue_server.url
    files = [("images", (f"{i}.png", png(i), "image/png")) for i in range(IMAGES_PER_REQUEST)]
    responses = asyncio.run(burst(url, files))

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, f"expected some requests served and some shed: {statuses}"
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["code"] == "overloaded"
        else:
            assert len(response.json()["predictions"]) == IMAGES_PER_REQUEST

    assert small_queue_server.process.poll() is None
    assert httpx.get(url + "/readyz", timeout=5).status_code == 200
    after = [httpx.post(url + "/classify", files=files, timeout=10) for _ in range(3)]
    assert [r.status_code for r in after] == [200, 200, 200]


ADMISSION_BODY_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def small_admission_server(tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("admission") / "server.log",
                           {"VISIONSERVE_MODELS_DIR": str(MODELS_DIR), "VISIONSERVE_MAX_IN_FLIGHT": "4",
                            "VISIONSERVE_MAX_BODY_BYTES": str(ADMISSION_BODY_LIMIT)})
    yield running
    stop_server(running)


def test_requests_over_the_in_flight_limit_are_refused_at_the_door(small_admission_server):
    """VISIONSERVE_MAX_IN_FLIGHT: beyond it a request gets 503 + Retry-After at once, its body unread."""
    url = small_admission_server.url
    files = [("images", (f"{i}.png", png(i), "image/png")) for i in range(IMAGES_PER_REQUEST)]
    responses = asyncio.run(burst(url, files))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            assert "requests in progress" in response.json()["error"]["message"]
        else:
            assert len(response.json()["predictions"]) == IMAGES_PER_REQUEST
    assert httpx.get(url + "/readyz", timeout=10).status_code == 200
    assert httpx.post(url + "/classify", files=files, timeout=30).status_code == 200


def test_a_refused_request_is_not_read_past_the_body_limit(small_admission_server):
    """A request refused at the door has its body read (so that the client sees the 503, not a reset), but
    never more than the body limit: an endless chunked upload to a full server is cut off there."""
    address = urlsplit(small_admission_server.url)
    head = (f"POST /classify HTTP/1.1\r\nHost: {address.hostname}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n").encode()
    holders = []
    for _ in range(4):  # four requests in progress, each waiting for the rest of its body
        holder = socket.create_connection((address.hostname, address.port), timeout=10)
        holder.sendall(head + b"Content-Length: 100000\r\n\r\n--x\r\n")
        holders.append(holder)
    time.sleep(1.0)
    refused = socket.create_connection((address.hostname, address.port), timeout=10)
    refused.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % (256 * 1024) + b"\0" * (256 * 1024) + b"\r\n"
    sent, answer = 0, b""
    try:
        while sent < 96 * ADMISSION_BODY_LIMIT:
            if select.select([refused], [], [], 0)[0]:
                answer = refused.recv(4096)
                break
            refused.sendall(chunk)
            sent += len(chunk)
        else:
            answer = refused.recv(4096)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed the connection after its 503, as its Connection: close said
    finally:
        refused.close()
        for holder in holders:
            holder.close()
    assert sent < 24 * ADMISSION_BODY_LIMIT, f"the server read {sent} bytes of a refused upload"
    if answer:
        assert answer.startswith(b"HTTP/1.1 503") and b"connection: close" in answer.lower(), answer[:300]
    time.sleep(1.0)
    assert httpx.get(small_admission_server.url + "/readyz", timeout=10).status_code == 200
