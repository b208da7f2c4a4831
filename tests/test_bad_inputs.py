"""A corpus of bad and unusual inputs against every endpoint of one real server, and the server after it.

Every case names its exact answer: a success (checked against onnxruntime in this process, or against an
equivalent ordinary image) or a specific 4xx with its code and field in the one error shape. Never a 5xx.
After the whole corpus the server must still be ready and answer a known image as before, and no answer
may have leaked an internal path, a traceback or a CORS grant.

The server (conftest's every_task_server) holds the released classifiers, a tiny SegNet and a tiny DCGAN,
with small limits (conftest.EVERY_TASK_LIMITS) so that each can be crossed cheaply. The limits of /classify
(body, field, images, pixels) and /generate's sample limit have their own tests (tests/test_service_limits.py,
tests/test_generate_service.py), and URLs sent as images, with a listener that sees any fetch, tests/test_security.py's.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import EVERY_TASK_LIMITS
from helpers import LEAK_MARKERS, assert_error, encode, npy
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.errors import ApiError
from service.generate import GenerateParams
from service.classify import ImageParams
from service.images import ACCEPTED_FORMATS, InputSpec, decode_image, fit_to_input_spec, to_eight_bits
from service.parsing import parse_params

pytestmark = pytest.mark.server

BODY_LIMIT = int(EVERY_TASK_LIMITS["VISIONSERVE_MAX_BODY_BYTES"])
SEGMENT_PIXEL_LIMIT = int(EVERY_TASK_LIMITS["VISIONSERVE_MAX_SEGMENT_PIXELS"])
JUNK = "\u202e\x00\ud7ff\ufffd\U0001f600 ../../etc/passwd %s %n"  # RTL override, NUL, emoji, path, formats


# --- payload builders --------------------------------------------------------------------------------

def shirt(size: int = 28) -> Image.Image:
    """A light blob on black: what the classifiers were trained on, at any size."""
    pixels = np.zeros((size, size), np.uint8)
    pixels[size // 5: size - size // 5, size // 4: size - size // 4] = 200
    return Image.fromarray(pixels)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header that claims width x height, with almost no pixel data: a bomb by its header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def gif_claiming(width: int, height: int) -> bytes:
    screen = struct.pack("<HH", width, height) + b"\x00\x00\x00"
    frame = b"," + struct.pack("<HHHH", 0, 0, width, height) + b"\x00\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def animated(fmt: str) -> bytes:
    frames = [shirt(), Image.new("L", (28, 28), 255), Image.new("L", (28, 28), 90)]
    if fmt == "WEBP":
        frames = [frame.convert("RGB") for frame in frames]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=80, loop=0)


def sixteen_bit(image: Image.Image) -> bytes:
    """The same picture as a 16-bit grey PNG (each 8-bit value v becomes v * 257)."""
    return encode(Image.fromarray(np.asarray(image, np.uint16) * 257))


def palette_with_transparency() -> bytes:
    image = shirt().convert("P")
    return encode(image, transparency=0)  # index 0 (black) transparent: composited over white


def camera_jpeg() -> bytes:
    """An MPO file, as many cameras write JPEGs: a main picture and a preview."""
    return encode(shirt().convert("RGB"), "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])


PNG = encode(shirt())
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 0 0 moveto 28 28 lineto stroke showpage\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><rect width="28" height="28"/></svg>'


# --- the cases -----------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    method: str
    path: str
    status: int
    code: str | None = None  # the error code; None for a success
    error_field: object = ...  # the error's field, a string or None (... : not checked)
    request: dict = field(default_factory=dict)  # httpx.request keyword arguments
    check: Callable | None = None  # for successes: check(response, context)


def files(data: bytes, name: str = "image.png", content_type: str = "image/png", field: str = "images") -> dict:
    return {"files": [(field, (name, data, content_type))]}


def multipart(body: bytes, boundary: str = "xx") -> dict:
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


def raw_json(body: bytes) -> dict:
    return {"content": body, "headers": {"content-type": "application/json"}}


def error(id, method, path, status, code, field=..., **request) -> Case:
    return Case(id, method, path, status, code, field, request)


def ok(id, method, path, check, **request) -> Case:
    return Case(id, method, path, 200, None, ..., request, check)


# Successes: checked against onnxruntime on the same image fitted in this process, or against a twin.

def same_as_reference(image_bytes: bytes) -> Callable:
    def check(response, context):
        served = probabilities(response.json())
        np.testing.assert_allclose(served[0], context.classify_reference(image_bytes), atol=1e-5)
    return check


def same_as_twin(twin: bytes) -> Callable:
    """The answer for an unusual encoding equals the answer for the ordinary image it shows."""
    def check(response, context):
        twin_answer = context.post("/classify", **files(twin), params={"top_k": 10, "invert": "false"})
        np.testing.assert_allclose(probabilities(response.json()), probabilities(twin_answer.json()), atol=1e-6)
    return check


def segment_same_as_twin(twin: bytes) -> Callable:
    def check(response, context):
        twin_answer = context.post("/segment", **files(twin, field="image"), params={"format": "mask"})
        assert response.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(response.content))),
                                      np.asarray(Image.open(io.BytesIO(twin_answer.content))))
    return check


def segment_size(height: int, width: int) -> Callable:
    def check(response, context):
        body = response.json()
        assert (body["height"], body["width"]) == (height, width)
        assert sum(c["pixels"] for c in body["classes"]) == height * width
    return check


def one_prediction(response, context):
    assert len(response.json()["predictions"]) == 1


def png_answer(response, context):
    assert response.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(response.content)).load()


TOP10 = {"params": {"top_k": 10, "invert": "false"}}
EIGHT_BIT = shirt()

CASES = [
    # /classify (multipart) ---------------------------------------------------------------------------
    error("truncated-png", "POST", "/classify", 400, "corrupt_image", "images[0]", **files(encode(shirt(64))[:80])),
    error("truncated-jpeg", "POST", "/classify", 400, "corrupt_image", "images[0]",
          **files(encode(shirt(64), "JPEG")[:300], "a.jpg", "image/jpeg")),
    error("empty-file", "POST", "/classify", 415, "unsupported_image", "images[0]", **files(b"")),
    error("text-as-image", "POST", "/classify", 415, "unsupported_image", "images[0]",
          **files(b"just some text, no pixels", "notes.png")),
    error("eps-never-ghostscript", "POST", "/classify", 415, "unsupported_image", "images[0]",
          **files(EPS, "a.eps", "application/postscript")),
    error("svg", "POST", "/classify", 415, "unsupported_image", "images[0]", **files(SVG, "a.svg", "image/svg+xml")),
    error("lab-tiff-unconvertible", "POST", "/classify", 415, "unsupported_image", "images[0]",
          **files(encode(Image.new("LAB", (8, 8), (50, 0, 0)), "TIFF"), "a.tif", "image/tiff")),
    error("png-bomb-20000x20000", "POST", "/classify", 413, "too_many_pixels", "images[0]",
          **files(png_claiming(20_000, 20_000))),
    error("png-header-2^31-wide", "POST", "/classify", 413, "too_many_pixels", "images[0]",
          **files(png_claiming(2**31 - 1, 1))),
    error("gif-bomb-65535x65535", "POST", "/classify", 413, "too_many_pixels", "images[0]",
          **files(gif_claiming(65535, 65535), "a.gif", "image/gif")),
    error("png-header-then-nothing", "POST", "/classify", 400, "corrupt_image", "images[0]",
          **files(png_claiming(1000, 1000))),
    error("empty-body", "POST", "/classify", 415, "unsupported_media_type", None, content=b""),
    error("empty-multipart", "POST", "/classify", 422, "missing_images", "images", **multipart(b"")),
    error("json-content-type", "POST", "/classify", 415, "unsupported_media_type", None, json={"images": []}),
    error("multipart-without-boundary", "POST", "/classify", 400, "invalid_multipart", None,
          content=b"abc", headers={"content-type": "multipart/form-data"}),
    error("multipart-garbage", "POST", "/classify", 400, "invalid_multipart", None, **multipart(b"garbage" * 50)),
    error("multipart-mixed", "POST", "/classify", 415, "unsupported_media_type", None,
          content=b"x", headers={"content-type": "multipart/mixed; boundary=x"}),
    error("images-in-wrong-field", "POST", "/classify", 422, "missing_images", "images", **files(PNG, field="image")),
    error("file-part-without-filename", "POST", "/classify", 422, "not_a_file", "images", **multipart(
        b'--xx\r\nContent-Disposition: form-data; name="images"\r\nContent-Type: image/png\r\n\r\n' + PNG +
        b"\r\n--xx--\r\n")),
    error("top_k-junk-unicode", "POST", "/classify", 422, "invalid_parameter", "top_k",
          data={"top_k": "\u0663"}, **files(PNG)),
    error("top_k-zero", "POST", "/classify", 422, "invalid_parameter", "top_k", data={"top_k": "0"}, **files(PNG)),
    error("top_k-repeated", "POST", "/classify", 422, "invalid_parameter", "top_k",
          data={"top_k": ["1", "2"]}, **files(PNG)),
    error("top_k-bad-in-query-good-in-form", "POST", "/classify", 422, "invalid_parameter", "top_k",
          params={"top_k": "many"}, data={"top_k": "2"}, **files(PNG)),
    error("invert-junk", "POST", "/classify", 422, "invalid_parameter", "invert", data={"invert": JUNK}, **files(PNG)),
    error("model-unknown", "POST", "/classify", 404, "unknown_model", "model", data={"model": "no-such-model"},
          **files(PNG)),
    error("model-junk-unicode", "POST", "/classify", 404, "unknown_model", "model", data={"model": JUNK}, **files(PNG)),
    error("model-of-another-task", "POST", "/classify", 404, "unknown_model", "model", data={"model": "segnet"},
          **files(PNG)),
    error("model-sent-as-a-file", "POST", "/classify", 422, "invalid_parameter", "model",
          files=[("images", ("a.png", PNG, "image/png")), ("model", ("m.txt", b"cnn", "text/plain"))]),
    error("too-many-fields", "POST", "/classify", 413, "too_many_fields", None,
          data={f"extra{i}": "x" for i in range(40)}, **files(PNG)),
    ok("1x1-image", "POST", "/classify", same_as_reference(encode(Image.new("L", (1, 1), 200))),
       **files(encode(Image.new("L", (1, 1), 200))), **TOP10),
    ok("1x3000-sliver", "POST", "/classify", one_prediction, **files(encode(Image.new("L", (1, 3000), 255)))),
    ok("16-bit-png-as-its-8-bit-twin", "POST", "/classify", same_as_twin(encode(EIGHT_BIT)),
       **files(sixteen_bit(EIGHT_BIT)), **TOP10),
    ok("cmyk-jpeg", "POST", "/classify", same_as_reference(encode(shirt().convert("CMYK"), "JPEG")),
       **files(encode(shirt().convert("CMYK"), "JPEG"), "a.jpg", "image/jpeg"), **TOP10),
    ok("palette-with-transparency", "POST", "/classify", same_as_reference(palette_with_transparency()),
       **files(palette_with_transparency()), **TOP10),
    ok("transparent-rgba", "POST", "/classify",
       same_as_twin(encode(Image.new("L", (28, 28), 255))),  # transparent pixels are white
       **files(encode(Image.new("RGBA", (28, 28), (0, 0, 0, 0)))), **TOP10),
    ok("animated-gif-first-frame", "POST", "/classify", same_as_twin(encode(shirt())),
       **files(animated("GIF"), "a.gif", "image/gif"), **TOP10),
    ok("animated-webp-first-frame", "POST", "/classify", same_as_reference(animated("WEBP")),
       **files(animated("WEBP"), "a.webp", "image/webp"), **TOP10),
    ok("camera-mpo-jpeg", "POST", "/classify", same_as_reference(camera_jpeg()),
       **files(camera_jpeg(), "a.jpg", "image/jpeg"), **TOP10),
    ok("unknown-form-fields-ignored", "POST", "/classify", one_prediction, data={"colour": "blue"}, **files(PNG)),
    # /classify/json ----------------------------------------------------------------------------------
    error("base64-invalid", "POST", "/classify/json", 400, "invalid_base64", "images[0]",
          json={"images": ["%%% not base64"]}),
    error("base64-of-text", "POST", "/classify/json", 415, "unsupported_image", "images[0]",
          json={"images": [base64.b64encode(b"hello").decode()]}),
    error("base64-over-the-body-limit", "POST", "/classify/json", 413, "body_too_large", None,
          json={"images": ["A" * (BODY_LIMIT + 4)]}),
    error("images-empty", "POST", "/classify/json", 422, "invalid_parameter", "images", json={"images": []}),
    error("images-not-a-list", "POST", "/classify/json", 422, "invalid_parameter", "images",
          json={"images": {"a": 1}}),
    error("images-missing", "POST", "/classify/json", 422, "invalid_parameter", "images", json={"top_k": 1}),
    error("json-empty-body", "POST", "/classify/json", 400, "invalid_json", None, **raw_json(b"")),
    error("json-null", "POST", "/classify/json", 422, "invalid_parameter", "body", **raw_json(b"null")),
    error("json-invalid-utf8", "POST", "/classify/json", 400, "invalid_json", None,
          **raw_json(b'{"images": ["\xff\xfe"]}')),
    error("json-nested-100000-deep", "POST", "/classify/json", 400, "invalid_json", None,
          **raw_json(b"[" * 100_000 + b"]" * 100_000)),
    error("json-top_k-float", "POST", "/classify/json", 422, "invalid_parameter", "top_k",
          json={"images": [base64.b64encode(PNG).decode()], "top_k": 2.5}),
    ok("json-data-url-and-extra-fields", "POST", "/classify/json", one_prediction,
       json={"images": ["data:image/png;base64," + base64.b64encode(PNG).decode()], "colour": "blue"}),
    # /classify/tensor --------------------------------------------------------------------------------
    error("tensor-nan-float32", "POST", "/classify/tensor", 422, "invalid_tensor", "body",
          content=npy(np.full((1, 28, 28), np.nan, np.float32))),
    error("tensor-inf-float64", "POST", "/classify/tensor", 422, "invalid_tensor", "body",
          content=npy(np.full((1, 28, 28), np.inf))),
    error("tensor-int64", "POST", "/classify/tensor", 422, "invalid_tensor", "body",
          content=npy(np.zeros((1, 28, 28), np.int64))),
    error("tensor-5d", "POST", "/classify/tensor", 422, "invalid_tensor", "body",
          content=npy(np.zeros((1, 1, 1, 28, 28), np.uint8))),
    error("tensor-no-images", "POST", "/classify/tensor", 422, "missing_images", "body",
          content=npy(np.zeros((0, 28, 28), np.uint8))),
    error("tensor-json-body", "POST", "/classify/tensor", 422, "invalid_tensor", "body", json={"pixels": [0]}),
    error("tensor-npz", "POST", "/classify/tensor", 422, "invalid_tensor", "body",
          content=(lambda buffer: (np.savez(buffer, a=np.zeros((1, 28, 28), np.uint8)), buffer.getvalue())[1])(
              io.BytesIO())),
    error("tensor-pickled-objects", "POST", "/classify/tensor", 422, "invalid_tensor", "body",
          content=npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)),
    error("tensor-raw-pickle", "POST", "/classify/tensor", 422, "invalid_tensor", "body",
          content=pickle.dumps({"a": 1})),
    error("tensor-truncated", "POST", "/classify/tensor", 422, "invalid_tensor", "body",
          content=npy(np.zeros((4, 28, 28), np.uint8))[:-100]),
    error("tensor-header-claims-10^11-images", "POST", "/classify/tensor", 422, "invalid_tensor", "body",
          content=npy(np.zeros((1, 28, 28), np.uint8)).replace(b"(1, 28, 28)", b"(100000000000, 28, 28)")),
    error("tensor-unknown-model", "POST", "/classify/tensor", 404, "unknown_model", "model",
          params={"model": "nope"}, content=npy(np.zeros((1, 28, 28), np.uint8))),
    error("tensor-top_k-repeated", "POST", "/classify/tensor", 422, "invalid_parameter", "top_k",
          params=[("top_k", "1"), ("top_k", "2")], content=npy(np.zeros((1, 28, 28), np.uint8))),
    ok("tensor-fortran-order", "POST", "/classify/tensor", one_prediction,
       content=npy(np.asfortranarray(np.zeros((1, 28, 28), np.uint8)))),
    # /segment ------------------------------------------------------------------------------------------
    error("segment-two-images", "POST", "/segment", 422, "one_image_only", "image",
          files=[("image", ("a.png", PNG, "image/png")), ("image", ("b.png", PNG, "image/png"))]),
    error("segment-text-plain", "POST", "/segment", 415, "unsupported_media_type", None,
          content=b"x", headers={"content-type": "text/plain"}),
    error("segment-empty-body", "POST", "/segment", 415, "unsupported_media_type", None, content=b""),
    error("segment-urlencoded-form", "POST", "/segment", 415, "unsupported_media_type", None,
          data={"image": "http://127.0.0.1:9/secret.png"}),
    error("segment-text-as-image", "POST", "/segment", 415, "unsupported_image", "image",
          **files(b"just some text, no pixels", "notes.txt", "text/plain", field="image")),
    error("segment-invalid-json", "POST", "/segment", 400, "invalid_json", None, **raw_json(b"{not json")),
    error("segment-json-invalid-base64", "POST", "/segment", 400, "invalid_base64", "image", json={"image": "%%%"}),
    error("segment-json-image-missing", "POST", "/segment", 422, "invalid_parameter", "image", json={}),
    error("segment-json-image-null", "POST", "/segment", 422, "invalid_parameter", "image", json={"image": None}),
    error("segment-json-list", "POST", "/segment", 422, "invalid_parameter", "body", json=[]),
    error("segment-over-its-pixel-limit", "POST", "/segment", 413, "too_many_pixels", "image",
          **files(encode(Image.new("L", (SEGMENT_PIXEL_LIMIT + 1, 1))), field="image")),
    error("segment-png-bomb", "POST", "/segment", 413, "too_many_pixels", "image",
          **files(png_claiming(20_000, 20_000), field="image")),
    error("segment-truncated-jpeg", "POST", "/segment", 400, "corrupt_image", "image",
          **files(encode(shirt(64), "JPEG")[:300], "a.jpg", "image/jpeg", field="image")),
    error("segment-format-junk", "POST", "/segment", 422, "invalid_parameter", "format",
          data={"format": JUNK}, **files(PNG, field="image")),
    error("segment-format-junk-in-query-of-json", "POST", "/segment", 422, "invalid_parameter", "format",
          params={"format": "gif"}, json={"image": base64.b64encode(PNG).decode()}),
    error("segment-model-of-another-task", "POST", "/segment", 404, "unknown_model", "model",
          data={"model": "cnn"}, **files(PNG, field="image")),
    ok("segment-1x1", "POST", "/segment", segment_size(1, 1),
       **files(encode(Image.new("L", (1, 1), 200)), field="image")),
    ok("segment-animated-gif", "POST", "/segment", segment_size(28, 28),
       **files(animated("GIF"), "a.gif", "image/gif", field="image")),
    ok("segment-16-bit-as-its-8-bit-twin", "POST", "/segment", segment_same_as_twin(encode(shirt(40))),
       params={"format": "mask"}, **files(sixteen_bit(shirt(40)), field="image")),
    ok("segment-overlay-of-a-sliver", "POST", "/segment", png_answer, params={"format": "overlay"},
       **files(encode(Image.new("L", (SEGMENT_PIXEL_LIMIT, 1), 255)), field="image")),
    # /generate -----------------------------------------------------------------------------------------
    error("generate-n-negative", "POST", "/generate", 422, "invalid_parameter", "n", json={"n": -1}),
    error("generate-n-huge", "POST", "/generate", 422, "invalid_parameter", "n", json={"n": 10**30}),
    error("generate-n-fractional", "POST", "/generate", 422, "invalid_parameter", "n", json={"n": 2.5}),
    error("generate-n-string", "POST", "/generate", 422, "invalid_parameter", "n", json={"n": "3"}),
    error("generate-n-infinite", "POST", "/generate", 422, "invalid_parameter", "n", **raw_json(b'{"n": 1e400}')),
    error("generate-n-nan", "POST", "/generate", 422, "invalid_parameter", "n", **raw_json(b'{"n": NaN}')),
    error("generate-class-junk-unicode", "POST", "/generate", 422, "unknown_class", "class", json={"class": JUNK}),
    error("generate-class-out-of-range", "POST", "/generate", 422, "unknown_class", "class", json={"class": 10}),
    error("generate-class-bool", "POST", "/generate", 422, "invalid_parameter", "class", json={"class": True}),
    error("generate-seed-over-2^63", "POST", "/generate", 422, "invalid_parameter", "seed", json={"seed": 2**64}),
    error("generate-unknown-field", "POST", "/generate", 422, "invalid_parameter", "clas", json={"clas": 1}),
    error("generate-text-plain", "POST", "/generate", 415, "unsupported_media_type", None,
          content=b'{"n": 1}', headers={"content-type": "text/plain"}),
    error("generate-invalid-json", "POST", "/generate", 400, "invalid_json", None, **raw_json(b"{not json")),
    error("generate-array-body", "POST", "/generate", 422, "invalid_parameter", "body", json=[1, 2]),
    error("generate-model-of-another-task", "POST", "/generate", 404, "unknown_model", "model", json={"model": "cnn"}),
    ok("generate-n-as-an-integral-float", "POST", "/generate", png_answer, json={"n": 2.0, "seed": 1}),
    # /generate/interpolate -----------------------------------------------------------------------------
    error("interpolate-missing-seed", "POST", "/generate/interpolate", 422, "invalid_parameter", "to_seed",
          json={"from_seed": 1, "class": 0}),
    error("interpolate-steps-1", "POST", "/generate/interpolate", 422, "invalid_parameter", "steps",
          json={"from_seed": 1, "to_seed": 2, "class": 0, "steps": 1}),
    error("interpolate-steps-huge", "POST", "/generate/interpolate", 422, "invalid_parameter", "steps",
          json={"from_seed": 1, "to_seed": 2, "class": 0, "steps": 10**9}),
    error("interpolate-class-unknown", "POST", "/generate/interpolate", 422, "unknown_class", "class",
          json={"from_seed": 1, "to_seed": 2, "class": "cat"}),
    error("interpolate-extra-field", "POST", "/generate/interpolate", 422, "invalid_parameter", "n",
          json={"from_seed": 1, "to_seed": 2, "class": 0, "n": 3}),
    ok("interpolate-same-seed-both-ends", "POST", "/generate/interpolate", png_answer,
       json={"from_seed": 5, "to_seed": 5, "class": " trouser "}),
    # /models, paths and methods ------------------------------------------------------------------------
    error("models-unknown-name", "GET", "/models/no-such-model", 404, "unknown_model", None),
    error("models-junk-unicode-name", "GET", "/models/%E2%80%AE%C3%A9%F0%9F%98%80", 404, "unknown_model", None),
    error("models-name-with-newline", "GET", "/models/a%0Ab", 404, "not_found", None),
    error("models-name-with-nul", "GET", "/models/a%00b", 404, "not_found", None),
    error("models-deeper-path", "GET", "/models/cnn/weights", 404, "not_found", None),
    error("unknown-path-under-classify", "POST", "/classify/nothing-here", 404, "not_found", None),
    error("put-on-classify-json", "PUT", "/classify/json", 405, "method_not_allowed", None),
    error("get-on-generate", "GET", "/generate", 405, "method_not_allowed", None),
    error("post-on-models", "POST", "/models", 405, "method_not_allowed", None),
    error("delete-on-a-model", "DELETE", "/models/cnn", 405, "method_not_allowed", None),
]


def probabilities(answer: dict) -> np.ndarray:
    """[N, K] rows rebuilt from a top_k=K answer."""
    rows = np.zeros((len(answer["predictions"]), 10), np.float32)
    for row, prediction in zip(rows, answer["predictions"]):
        for entry in prediction["top_k"]:
            row[entry["index"]] = entry["probability"]
    return rows


@dataclass
class Context:
    url: str
    classifier: ort.InferenceSession
    card: dict

    def post(self, path: str, **request) -> httpx.Response:
        response = httpx.post(self.url + path, timeout=60, **request)
        assert response.status_code == 200, response.text
        return response

    def classify_reference(self, image_bytes: bytes, invert: str = "false") -> np.ndarray:
        pixels, _ = fit_to_input_spec(decode_image(image_bytes, 10**8, "test"), InputSpec.from_card(self.card), invert)
        return self.classifier.run(["probabilities"], {"pixels": pixels[None]})[0][0]


@pytest.fixture(scope="module")
def context(every_task_server, every_task_models) -> Context:
    described = httpx.get(every_task_server.url + "/models", timeout=10).json()
    name = described["default"]["classification"]
    assert described["default"]["segmentation"] and described["default"]["generation"], described["default"]
    session = ort.InferenceSession(str(every_task_models / name / "model.onnx"), providers=["CPUExecutionProvider"])
    card = json.loads((every_task_models / name / "card.json").read_text())
    return Context(every_task_server.url, session, card)


# --- the fixes, in process (no server) -------------------------------------------------------------------

def test_sixteen_bit_and_float_images_are_scaled_not_clipped():
    ramp = np.arange(0, 256, 17, dtype=np.uint8).reshape(4, 4)
    for image in (Image.fromarray(ramp.astype(np.uint16) * 257),              # 16-bit
                  Image.fromarray(ramp.astype(np.int32) * 257),               # 32-bit integer holding 16-bit values
                  Image.fromarray(ramp.astype(np.float32) / 255)):            # float in 0..1
        np.testing.assert_array_equal(np.asarray(to_eight_bits(image)), ramp)
    assert to_eight_bits(Image.fromarray(ramp)).mode == "L"  # 8-bit images are left alone
    odd = Image.fromarray(np.array([[np.nan, np.inf], [-5, 300]], np.float32))
    np.testing.assert_array_equal(np.asarray(to_eight_bits(odd)), [[0, 255], [0, 255]])


@pytest.mark.parametrize("data", [EPS, SVG, b"BM not really a bitmap"], ids=["eps", "svg", "fake-bmp"])
def test_only_the_accepted_formats_are_parsed(data):
    with pytest.raises(ApiError) as refused:
        decode_image(data, 10**6, "images[0]")
    assert refused.value.status in (400, 415)
    assert "EPS" not in ACCEPTED_FORMATS
    assert decode_image(camera_jpeg(), 10**6, "x").format == "MPO"  # camera JPEGs still open


def test_parameters_given_twice_or_as_files_are_refused():
    assert parse_params(ImageParams, [("top_k", "2")], [("top_k", "4")]).top_k == 4  # the form wins
    for sources in ([[("top_k", "1"), ("top_k", "2")]],                     # twice in one place
                    [[("top_k", "many")], [("top_k", "2")]],                # bad in the query, good in the form
                    [[("model", UploadFile(io.BytesIO(b"cnn"), filename="m.txt"))]]):  # a file
        with pytest.raises(ApiError) as refused:
            parse_params(ImageParams, *sources)
        assert (refused.value.status, refused.value.code) == (422, "invalid_parameter")
    assert parse_params(ImageParams, [("cache_buster", "1"), ("cache_buster", "2")]).top_k == 3  # not ours: ignored


def test_integral_numbers_are_integers():
    assert GenerateParams.model_validate({"n": 2.0, "seed": 7.0}).n == 2
    for bad in ({"n": 2.5}, {"n": "2"}, {"n": True}, {"seed": float(2**60)}, {"n": float("inf")}):
        with pytest.raises(ValidationError):
            GenerateParams.model_validate(bad)


def test_the_corpus_is_large_and_covers_every_endpoint():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)
    paths = {case.path.split("?")[0] if not case.path.startswith("/models/") else "/models/{name}" for case in CASES}
    assert {"/classify", "/classify/json", "/classify/tensor", "/segment", "/generate", "/generate/interpolate",
            "/models/{name}"} <= paths


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(context, case):
    response = httpx.request(case.method, context.url + case.path, timeout=60, **case.request)
    # Whatever the answer, it leaks no internals and grants no other origin.
    text = response.text if not response.headers.get("content-type", "").startswith("image/") else ""
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{case.id} leaks {marker!r}: {text[:300]}"
    assert "access-control-allow-origin" not in response.headers, case.id
    assert response.status_code == case.status, f"{case.id}: {response.status_code} {response.text[:300]}"
    if case.code is None:
        case.check(response, context)
    else:
        assert_error(response, case.status, case.code, case.error_field)


def test_query_parameters_apply_in_every_form_and_the_body_wins(context):
    """One rule on every image route (docs/SERVING.md): the query string gives parameters in JSON bodies too, a body
    field overrides it, and each must be valid on its own; /generate refuses them rather than ignoring them."""
    image = base64.b64encode(PNG).decode()
    top_k = [len(context.post("/classify/json", params={"top_k": "1"}, json=body).json()["predictions"][0]["top_k"])
             for body in ({"images": [image]}, {"images": [image], "top_k": 2})]
    assert top_k == [1, 2]
    formats = [context.post("/segment", params={"format": "mask"}, json=body).headers["content-type"]
               for body in ({"image": image}, {"image": image, "format": "json"})]
    assert formats == ["image/png", "application/json"]
    for path, params, body, field in (("/classify/json", {"top_k": "99"}, {"images": [image], "top_k": 2}, "top_k"),
                                      ("/generate", {"n": "2"}, {}, "n")):
        refused = httpx.post(context.url + path, params=params, json=body, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field, refused.text


def test_server_is_healthy_and_still_right_after_the_corpus(context, every_task_server, fashion_test_images):
    assert httpx.get(context.url + "/readyz", timeout=10).status_code == 200
    images, labels = fashion_test_images
    known = encode(Image.fromarray(images[0, 0]))
    answer = context.post("/classify", **files(known), params={"top_k": 10})
    served = probabilities(answer.json())[0]
    expected = context.classify_reference(known, invert="auto")
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert int(served.argmax()) == int(expected.argmax()) == int(labels[0])
    log = every_task_server.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
