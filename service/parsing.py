"""Reading a request to an image route: its parameters and its images, in the forms every image route takes.

- multipart/form-data: image files in a file field (`images`; /segment's `image`), parameters as form fields;
- JSON: base64 image files in the same field, parameters as the body's other fields;
- an .npy body (the /tensor routes): uint8 pixels, model-ready, parameters in the query string.

The rule for parameters, the same on every route and in every form (docs/SERVING.md, "Parameters"): any of them
may come in the query string; where the body gives one too (a form field, a JSON field) the body's wins, and each
source must be valid on its own. Images are decoded and fitted as the model's card says (service/images.py).
Nothing here knows a task: a route passes its parameter models and its task's models.

The body is read by Starlette, not by BentoML's typed-API layer (which costs more than our models, sets no body
limit, and downloads URLs sent in file fields; docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import numpy as np
from bentoml import get_current_service
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.routing import Route

from .config import RequestLimits
from .errors import ApiError
from .images import InputSpec, InvertMode, decode_image, fit_to_input_spec
from .onnx_models import ModelEntry
from .task_models import TaskModels

# Decoding a few small images costs less than a thread hop; big ones go to a thread so that one
# large photo does not stall every other request on the event loop.
INLINE_DECODE_BYTES = 256 * 1024
NPY_MAGIC = b"\x93NUMPY"
Form = Literal["multipart", "json", "tensor"]


class ModelParams(BaseModel):
    """Parameters every image endpoint accepts, from a form, a query string or a JSON body."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: str | None = Field(None, description="model name; default: the task's best model by its card")
    invert: Literal["auto", "true", "false"] = Field(
        "auto", description="auto: invert when the background (the image's outermost frame) is mostly light")


# --- parameters ---------------------------------------------------------------------------------------

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


def parse_json_body(json_model: type[BaseModel], params_model: type[BaseModel], body: bytes,
                    query: Iterable[tuple[str, object]]) -> BaseModel:
    """A JSON body of `json_model`, with the query string's parameters where the body does not give them."""
    try:
        parsed = json_model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if not query:
        return parsed
    from_query = parse_params(params_model, query)  # valid on its own, like a form's query string
    missing = from_query.model_fields_set - parsed.model_fields_set
    return parsed.model_copy(update={name: getattr(from_query, name) for name in missing}) if missing else parsed


# --- images ---------------------------------------------------------------------------------------------

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


async def read_image_files(request: Request, form: Form, params_model: type[BaseModel],
                           json_model: type[BaseModel], file_field: str = "images"
                           ) -> tuple[BaseModel, list[tuple[str, bytes]]]:
    """The parameters and the encoded image files of a multipart or base64 JSON request, each file named by its
    field (images[0], ...). In JSON, `file_field` holds a list of base64 strings, or (/segment's `image`) one."""
    limits = get_current_service().config.limits
    query = request.query_params.multi_items()
    if form == "multipart":
        files, fields = await read_multipart_upload(request, limits, file_field)
        return parse_params(params_model, query, fields), files
    params = parse_json_body(json_model, params_model, await request.body(), query)
    encoded = getattr(params, file_field)
    if isinstance(encoded, str):
        return params, [(file_field, decode_base64_image(encoded, file_field))]
    check_image_count(len(encoded), limits, file_field)
    return params, [(f"{file_field}[{index}]", decode_base64_image(text, f"{file_field}[{index}]"))
                    for index, text in enumerate(encoded)]


def fit_all(files: list[tuple[str, bytes]], spec: InputSpec, invert: InvertMode, max_pixels: int,
            keep_images: bool = False) -> tuple[np.ndarray, list[bool], list[Image.Image] | None]:
    """Decode and fit every image: uint8 [N, C, H, W], which ones were inverted, and with `keep_images` the decoded
    images (EXIF orientation applied) for a route that draws over them."""
    fitted, inverted, kept = [], [], []
    for field, data in files:
        image = decode_image(data, max_pixels, field)
        if keep_images:
            image = ImageOps.exif_transpose(image)
            kept.append(image)
        try:
            pixels, was_inverted = fit_to_input_spec(image, spec, invert)
        except (ValueError, OSError) as exc:  # e.g. a LAB TIFF: Pillow decodes it but cannot convert it
            raise ApiError(415, "unsupported_image", f"image mode {image.mode} cannot be fitted: {exc}", field) from None
        fitted.append(pixels)
        inverted.append(was_inverted)
    return np.stack(fitted), inverted, (kept if keep_images else None)


async def fit_images(files: list[tuple[str, bytes]], spec: InputSpec, invert: InvertMode, max_pixels: int,
                     keep_images: bool = False) -> tuple[np.ndarray, list[bool], list[Image.Image] | None]:
    """fit_all, on the event loop for a few small files, else on a thread (INLINE_DECODE_BYTES)."""
    if sum(len(data) for _, data in files) <= INLINE_DECODE_BYTES:
        return fit_all(files, spec, invert, max_pixels, keep_images)
    return await asyncio.to_thread(fit_all, files, spec, invert, max_pixels, keep_images)


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


# --- a request's inputs -----------------------------------------------------------------------------------

@dataclass
class Inputs:
    """What an image route gets from its request: parameters, the model they chose, and the model-ready pixels."""

    params: BaseModel
    entry: ModelEntry
    pixels: np.ndarray  # uint8 [N, C, H, W]
    inverted: list[bool] | None  # None for a tensor, which is used as sent
    images: list[Image.Image] | None = None  # with keep_images: the decoded images, EXIF orientation applied


# check_count(params, count, field): a route's own rule on the number of images (explain: exactly one), run
# once the model is known and before any image is decoded.
CountCheck = Callable[[BaseModel, int, str], None]


async def inputs_of(request: Request, form: Form, task: TaskModels, params_model: type[BaseModel],
                    json_model: type[BaseModel], check_count: CountCheck | None = None,
                    keep_images: bool = False) -> Inputs:
    """The Inputs of a multipart, base64 JSON or .npy request to one of `task`'s models."""
    limits = get_current_service().config.limits
    if form == "tensor":
        params = parse_params(params_model, request.query_params.multi_items())
        entry = task.resolve_model(params.model)
        pixels = load_npy_tensor(await request.body(), entry.input_spec, limits)
        if check_count is not None:
            check_count(params, len(pixels), "body")
        if params.invert == "true":  # tensors are model-ready; "auto" leaves them as sent
            pixels = 255 - pixels
        return Inputs(params, entry, pixels, None, None)
    params, files = await read_image_files(request, form, params_model, json_model)
    entry = task.resolve_model(params.model)
    if check_count is not None:
        check_count(params, len(files), "images")
    pixels, inverted, images = await fit_images(files, entry.input_spec, params.invert,
                                                limits.max_pixels_per_image, keep_images)
    return Inputs(params, entry, pixels, inverted, images)


def routes_in_every_form(path: str, endpoint) -> list[Route]:
    """POST `path` (multipart), `path`/json (base64 JSON) and `path`/tensor (.npy), each calling
    endpoint(request, form)."""
    return [Route(path + suffix, functools.partial(endpoint, form=form), methods=["POST"])
            for suffix, form in (("", "multipart"), ("/json", "json"), ("/tensor", "tensor"))]
