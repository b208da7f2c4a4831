"""The lean HTTP front shared by every task service: body limit, parameter parsing, image upload reading.

Each task service mounts a plain Starlette app with `@bentoml.asgi_app`; BentoML keeps /livez,
/readyz, /metrics and its docs, while parsing, limits and error mapping stay here, in our hands
(BentoML's typed-API layer costs more than our models, sets no body limit, and downloads URLs sent
in file fields; none of that is on this path).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from typing import Callable, Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import RequestLimits
from .errors import ApiError, error_body_for_path
from .images import InputSpec, InvertMode, decode_image, fit_to_input_spec

# Decoding a few small images costs less than a thread hop; big ones go to a thread so that one
# large photo does not stall every other request on the event loop.
INLINE_DECODE_BYTES = 256 * 1024
NPY_MAGIC = b"\x93NUMPY"


class RequestBodyLimit:
    """ASGI middleware: 413 for bodies over the limit, by Content-Length or while streaming (chunked).

    `max_body_bytes` is a callable because the limit lives in the service instance's configuration,
    which exists only once the worker has started.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._send_too_large(send, limit, scope["path"])
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)
            return message

        await self.app(scope, counting_receive, send)

    @staticmethod
    async def _send_too_large(send: Send, limit: int, path: str) -> None:
        body = json.dumps(error_body_for_path(path, "body_too_large",
                                              f"request body is over the limit of {limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class AdmissionLimit:
    """ASGI middleware: 503 + Retry-After at once, before the body is parsed, when this worker already has
    `max_in_flight` requests in progress (0: no limit).

    The batchers' queue bounds count images waiting for a model, but under overload the time goes earlier:
    every request's body is read and its images decoded before a batcher can refuse it. Measured with
    `make overload` (400 clients without pauses, 2 cores): with only the queue bound, accepted requests had a
    p99 of 1.5-2.5 s whatever the bound. Refusing at the door was meant to bound the work in progress; on 2
    cores shared with the load generator a limit of 128 did not (p99 1.9 s, fewer requests served), so it is
    off by default, for machines where the front end is not the bottleneck.
    """

    def __init__(self, app: ASGIApp, max_in_flight: Callable[[], int], retry_after: Callable[[], int],
                 max_body_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after = retry_after
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_in_flight()
        if limit and self.in_flight >= limit:
            drained = await self._drain(receive, self.max_body_bytes())
            await self._send_overloaded(send, scope["path"], close=not drained)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _drain(receive: Receive, max_bytes: int) -> bool:
        """Read the body and drop it: answering before the client has sent it all resets the connection
        under the client's feet (it sees no 503, only a broken pipe). Reading is a copy; the parsing and
        decoding that the limit exists to avoid never happen. No more than the body limit is read (a refused
        request is no reason to accept an endless chunked upload); False when reading stopped there."""
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return True
            received += len(message.get("body", b""))
            if received > max_bytes:
                return False

    async def _send_overloaded(self, send: Send, path: str, close: bool) -> None:
        retry_after = str(self.retry_after())
        body = json.dumps(error_body_for_path(path, "overloaded", f"the server has {self.in_flight} requests in "
                                              f"progress; retry after {retry_after} s")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"retry-after", retry_after.encode())]
        await send({"type": "http.response.start", "status": 503,
                    "headers": headers + ([(b"connection", b"close")] if close else [])})
        await send({"type": "http.response.body", "body": body})


class ControlCharactersInPath:
    """ASGI middleware: 404 in our error shape for a path holding a control character (%0A, %00, ...).

    No route of ours has one, and BentoML mounts our app with a pattern whose `.*` stops at a newline,
    so without this such a path got BentoML's plain-text 404 instead of the API's JSON error.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(ord(c) < 0x20 or ord(c) == 0x7F for c in scope["path"]):
            body = json.dumps(error_body_for_path(scope["path"], "not_found",
                                                  "no endpoint at a path with control characters")).encode()
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")


class ModelParams(BaseModel):
    """Parameters every image endpoint accepts, from a form, a query string or a JSON body."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: str | None = Field(None, description="model name; default: the task's best model by its card")
    invert: Literal["auto", "true", "false"] = Field(
        "auto", description="auto: invert when the background (the image's outermost frame) is mostly light")


class ImageParams(ModelParams):
    """Classification's parameters."""

    top_k: int = Field(3, ge=1, le=10, description="how many classes to return per image")
    ood: bool = Field(True, description="score each image's distance from the training images (ood: score, "
                                        "threshold, flag, method); false skips it")


class Base64ImagesRequest(ImageParams):
    images: list[str] = Field(..., min_length=1, description="base64 image files (data: URLs accepted)")


def field_path(location: tuple) -> str:
    """pydantic's ("images", 0) -> "images[0]", the way the other errors name fields."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    field = field_path(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return ApiError(400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}")
    return ApiError(422, "invalid_parameter", f"{field}: {first.get('msg')}", field)


def parse_params(model: type[BaseModel], *sources: Iterable[tuple[str, object]]) -> BaseModel:
    """Parameters from (key, value) pairs: a query string's, then a form's, the later source winning.

    Each source must be valid on its own (a bad query value is refused even where a form field overrides
    it). A parameter given twice in one source is refused rather than silently taking one of the two
    values (proxies and frameworks disagree on which one wins), and so is a file sent in a parameter's
    field. Keys that are no parameter are ignored (cache busters, a client's extras).
    """
    merged: dict[str, object] = {}
    given = 0
    for source in sources:
        values: dict[str, object] = {}
        for key, value in source:
            if key not in model.model_fields:
                continue
            if key in values:
                raise ApiError(422, "invalid_parameter", f"{key}: given more than once; send it once", key)
            if isinstance(value, UploadFile):
                raise ApiError(422, "invalid_parameter", f"{key}: a text field, not a file", key)
            values[key] = value
        if values:
            given += 1
            if given > 1:
                validated(model, merged)  # the earlier sources alone, before a later one overrides them
            merged.update(values)
    return validated(model, merged)


def validated(model: type[BaseModel], values: dict[str, object]) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_image_count(count: int, limits: RequestLimits, field: str = "images") -> None:
    if count == 0:
        raise ApiError(422, "missing_images", f"send at least one image in '{field}'", field)
    if count > limits.max_images_per_request:
        raise ApiError(413, "too_many_images",
                       f"{count} images in one request; the limit is {limits.max_images_per_request}", field)


def multipart_error(exc: Exception, limits: RequestLimits) -> ApiError:
    # Starlette reports its multipart limits only as messages; map the ones that are limits to 413.
    message = str(getattr(exc, "detail", None) or getattr(exc, "message", None) or exc)
    if message.startswith("Too many files"):
        return ApiError(413, "too_many_images", f"the limit is {limits.max_images_per_request} images", "images")
    if "exceeded maximum size" in message:
        return ApiError(413, "field_too_large",
                        f"a non-file form field is over {limits.max_form_field_bytes} bytes")
    if message.startswith("Too many fields"):
        return ApiError(413, "too_many_fields", message)
    return ApiError(400, "invalid_multipart", f"malformed multipart body: {message}")


async def read_multipart_upload(request: Request, limits: RequestLimits,
                                file_field: str = "images") -> tuple[list[tuple[str, bytes]], list[tuple[str, object]]]:
    """The uploaded files of `file_field` in request order, and the other form fields as (key, value) pairs."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with files in '{file_field}' (got {content_type or 'no content type'})")
    try:
        form = await request.form(max_files=limits.max_images_per_request, max_fields=32,
                                  max_part_size=limits.max_form_field_bytes)
    except ApiError:
        raise
    except (HTTPException, MultiPartException) as exc:
        raise multipart_error(exc, limits) from None
    try:
        files: list[tuple[str, bytes]] = []
        for index, item in enumerate(form.getlist(file_field)):
            # A plain string in a file field is refused, never fetched as a URL (BentoML's
            # ensure_file would download it: a server-side request forgery).
            if not isinstance(item, UploadFile):
                raise ApiError(422, "not_a_file",
                               f"'{file_field}' item {index} is a text field; upload the image file itself",
                               file_field)
            files.append((f"{file_field}[{index}]", await item.read()))
        fields = [(key, value) for key, value in form.multi_items() if key != file_field]
    finally:
        await form.close()
    check_image_count(len(files), limits, file_field)
    return files, fields


def decode_base64_image(text: str, field: str) -> bytes:
    """One base64 image file (a data: URL is accepted) -> its bytes; `field` names it in the error."""
    if text.startswith("data:"):
        text = text.partition(",")[2]  # data:image/png;base64,<payload>
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"{field} is not valid base64", field) from None


def decode_base64_images(encoded: list[str], field: str = "images") -> list[tuple[str, bytes]]:
    return [(f"{field}[{index}]", decode_base64_image(text, f"{field}[{index}]")) for index, text in enumerate(encoded)]


def fit_all(files: list[tuple[str, bytes]], spec: InputSpec, invert: InvertMode,
            max_pixels: int) -> tuple[np.ndarray, list[bool]]:
    """Decode and fit every image; uint8 [N, C, H, W] and which ones were inverted."""
    fitted, inverted = [], []
    for field, data in files:
        image = decode_image(data, max_pixels, field)
        try:
            pixels, was_inverted = fit_to_input_spec(image, spec, invert)
        except (ValueError, OSError) as exc:  # e.g. a LAB TIFF: Pillow decodes it but cannot convert it
            raise ApiError(415, "unsupported_image", f"image mode {image.mode} cannot be fitted: {exc}", field) from None
        fitted.append(pixels)
        inverted.append(was_inverted)
    return np.stack(fitted), inverted


async def fit_all_off_loop_if_large(files: list[tuple[str, bytes]], spec: InputSpec, invert: InvertMode,
                                    max_pixels: int) -> tuple[np.ndarray, list[bool]]:
    if sum(len(data) for _, data in files) <= INLINE_DECODE_BYTES:
        return fit_all(files, spec, invert, max_pixels)
    return await asyncio.to_thread(fit_all, files, spec, invert, max_pixels)


def load_npy_tensor(body: bytes, spec: InputSpec, limits: RequestLimits) -> np.ndarray:
    """An .npy body of uint8 [N, H, W] or [N, C, H, W] -> uint8 [N, C, H, W]; never unpickles."""
    if body.startswith(b"PK"):  # np.load would open a zip as an .npz archive
        raise ApiError(422, "invalid_tensor", "body must be a single .npy array, not an .npz archive", "body")
    if not body.startswith(NPY_MAGIC):  # else numpy's message talks of pickles for any non-.npy bytes
        raise ApiError(422, "invalid_tensor", "body is not a .npy file (it must start with the bytes \\x93NUMPY; "
                       "write it with numpy.save)", "body")
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError... for non-.npy bytes
        raise ApiError(422, "invalid_tensor", f"body is not a .npy array: {exc}", "body") from None
    if array.dtype != np.uint8:
        raise ApiError(422, "invalid_tensor", f"dtype must be uint8, got {array.dtype}", "body")
    expected = (spec.channels, spec.height, spec.width)
    if array.ndim == 3 and spec.channels == 1 and array.shape[1:] == expected[1:]:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != expected:
        raise ApiError(422, "invalid_tensor",
                       f"shape must be [N,{spec.height},{spec.width}] or [N,{','.join(map(str, expected))}], "
                       f"got {list(array.shape)}", "body")
    check_image_count(len(array), limits, "body")
    return np.ascontiguousarray(array)
