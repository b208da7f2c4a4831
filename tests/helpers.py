"""Payload builders and answer checks the test files share (imported like conftest: `from helpers import png`)."""

from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image

# What an answer must never show a client: internal paths, a traceback, source file names.
LEAK_MARKERS = ("/work", "/tmp", "Traceback", ".py", "site-packages")


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """The bytes of `image` saved in `fmt` (Pillow's format name) with Pillow's save options."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray | None = None) -> bytes:
    """A grey PNG of `pixels` (uint8 [H, W]); without pixels, a black 28 x 28 image."""
    return encode(Image.fromarray(np.zeros((28, 28), np.uint8) if pixels is None else pixels))


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    """The .npy bytes of `array`, as /classify/tensor and the other tensor routes read them."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = ...) -> dict:
    """The one error shape of the native routes, with this status, code and (unless `...`) field; returns it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"], body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if field is not ...:
        assert body["error"]["field"] == field, body
    return body["error"]
