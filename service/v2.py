"""Open Inference Protocol (KServe V2 / Triton HTTP) REST routes under /v2, with the binary tensor extension.

The same models and batchers as the native routes (service/app.py): a V2 request of N images is one batch
entry. Errors raised here are ApiError like everywhere else; service/errors.py answers them under /v2 in the
protocol's shape, {"error": "<message>"}, with 400 for every bad tensor (docs/SERVING.md, "Open Inference
Protocol").
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import orjson
from bentoml import get_current_service
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import ApiError
from .json_response import JSONResponse
from .masks import pad_to_multiple
from .onnx_models import ModelEntry
from .parsing import INLINE_DECODE_BYTES, decode_base64_image, fit_images
from .segment import prepare
from .task_models import TaskModels

EXTENSIONS = ["binary_tensor_data", "statistics"]
HEADER_LENGTH = "Inference-Header-Content-Length"
# Little-endian numpy dtypes of the protocol's fixed-size datatypes. BYTES (variable-size) is taken too, as encoded
# image files for a classifier's or segmenter's `pixels` (decoded_images below).
DTYPES = {"BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
ORT_TO_V2 = {"tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
             "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
             "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64"}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_tensor", message)


# --- models, versions, metadata ---------------------------------------------------------------------------

def find_model(name: str, version: str | None) -> tuple[TaskModels, ModelEntry]:
    """The task and entry of a served model; 404 for an unknown name or a version that is not the served one."""
    service = get_current_service()
    for task in service.tasks:
        entry = task.models.get(name)
        if entry is not None:
            if version is not None and version != model_version(entry):
                raise ApiError(404, "unknown_version", f"model {name!r} has no version {version!r}; "
                               f"this server serves {model_version(entry)!r}")
            return task, entry
    raise ApiError(404, "unknown_model", f"no model named {name!r}; known: {service.model_names()}")


def model_version(entry: ModelEntry) -> str:
    # The store version (the sha256 prefix of its tag); a model served from a plain folder has only its card's.
    if entry.tag:
        return entry.tag.partition(":")[2]
    return str(entry.card.get("version"))


def tensor_spec(node) -> dict:
    """An onnxruntime input/output -> the protocol's {name, datatype, shape}, -1 for every dynamic dim."""
    return {"name": node.name, "datatype": ORT_TO_V2.get(node.type, node.type),
            "shape": [dim if isinstance(dim, int) else -1 for dim in node.shape]}


def served_outputs(entry: ModelEntry) -> list:
    # Every output of the graph: a classifier's probabilities and embedding, a segmenter's mask and probabilities,
    # a generator's pixels. The batcher runs the union of what a batch's requests ask for.
    return list(entry.session.get_outputs())


def model_metadata(entry: ModelEntry) -> dict:
    answer = {"name": entry.name, "versions": [model_version(entry)], "platform": "onnxruntime_onnx"}
    if entry.available:
        answer["inputs"] = [tensor_spec(node) for node in entry.session.get_inputs()]
        answer["outputs"] = [tensor_spec(node) for node in served_outputs(entry)]
    return answer


def server_version() -> str:
    try:
        return metadata.version("visionserve")
    except metadata.PackageNotFoundError:
        return "unknown"


# --- decoding a request ---------------------------------------------------------------------------------

def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensors after it (binary tensor extension)."""
    if header_length is None:
        return body, b""
    if not (header_length.strip().isascii() and header_length.strip().isdigit()) or not 0 < int(header_length) <= len(body):
        raise bad_request(f"{HEADER_LENGTH}: {header_length!r} is not a length between 1 and the body's "
                          f"{len(body)} bytes")
    length = int(header_length)
    return body[:length], body[length:]


def loads(data: bytes):
    """orjson's reading (4x json's on a 64-image JSON tensor: 0.42 against 1.68 ms in process); what orjson refuses
    and json may take (NaN, integers beyond 64 bits) or refuses with its own message goes to json."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def parse_header(data: bytes) -> dict:
    try:
        request = loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise bad_request("the inference request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, dict) for item in inputs):
        raise bad_request("'inputs' must be a non-empty list of tensors {name, shape, datatype, data}")
    for key in ("parameters",):
        if request.get(key) is not None and not isinstance(request[key], dict):
            raise bad_request(f"'{key}' must be an object")
    if request.get("outputs") is not None and (not isinstance(request["outputs"], list) or not all(
            isinstance(item, dict) and isinstance(item.get("name"), str) for item in request["outputs"])):
        raise bad_request("'outputs' must be a list of {name, parameters}")
    for tensor in [*inputs, *(request.get("outputs") or [])]:
        if tensor.get("parameters") is not None and not isinstance(tensor["parameters"], dict):
            raise bad_request(f"tensor {tensor.get('name')!r}: 'parameters' must be an object")
    return request


def checked_shape(tensor: dict, name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad_request(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return shape


def flatten(data: object, limit: int, name: str) -> list:
    """Nested JSON lists -> one flat list, refused as soon as it holds more than `limit` elements."""
    flat: list = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
            if len(flat) > limit:
                raise bad_request(f"input {name!r}: 'data' holds more elements than its shape")
    return flat


def json_tensor_fast(data: object, dtype: np.dtype, count: int) -> np.ndarray | None:
    """numpy's own parsing of nested lists of numbers (10x the checks below, measured on 64 images), or None when
    `data` is anything else: the checks below then find and name what is wrong. Only called when the request's
    JSON holds no true/false, as numpy would read a boolean as 1 or 0."""
    try:
        array = np.array(data)
    except (ValueError, OverflowError, TypeError):  # ragged, or an integer past 64 bits
        return None
    if array.size != count or array.dtype.kind not in ("iu" if dtype.kind in "iu" else "iuf"):
        return None
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            return None
    return array.ravel().astype(dtype)


def json_tensor(data: object, dtype: np.dtype, count: int, name: str, datatype: str,
                may_hold_booleans: bool = True) -> np.ndarray:
    if not may_hold_booleans and datatype != "BOOL":
        fast = json_tensor_fast(data, dtype, count)
        if fast is not None:
            return fast
    flat = flatten(data, count, name)
    if len(flat) != count:
        raise bad_request(f"input {name!r}: 'data' has {len(flat)} elements, its shape {count}")
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in flat)
    elif dtype.kind in "iu":
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in flat)
        info = np.iinfo(dtype)
        ok = ok and all(info.min <= v <= info.max for v in flat)
    else:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat)
    if not ok:
        raise bad_request(f"input {name!r}: 'data' holds values that are not {datatype}")
    return np.array(flat, dtype=dtype)


def decode_inputs(request: dict, binary: bytes, json_bytes: int, may_hold_booleans: bool = True) -> dict[str, np.ndarray]:
    """Every input as an array of its declared shape and datatype; sizes are checked before anything is made."""
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in request["inputs"]:
        name = tensor.get("name")
        if not isinstance(name, str):
            raise bad_request("every input needs a 'name'")
        if name in arrays:
            raise bad_request(f"input {name!r} is given twice")
        datatype = tensor.get("datatype")
        if datatype not in DTYPES and datatype != "BYTES":
            raise bad_request(f"input {name!r}: datatype {datatype!r} is not taken here "
                              f"(one of {', '.join(DTYPES)}, BYTES)")
        shape = checked_shape(tensor, name)
        count = math.prod(shape)  # a Python int: a huge shape cannot overflow, and nothing is allocated from it
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise bad_request(f"input {name!r}: 'parameters' must be an object")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
            if offset + size > len(binary):
                raise bad_request(f"input {name!r}: binary_data_size {size} runs past the body's binary data "
                                  f"({len(binary) - offset} bytes left)")
        elif "data" not in tensor:
            raise bad_request(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        elif count > json_bytes:
            # Every JSON element takes at least one byte of the request's JSON: refused before anything is made.
            raise bad_request(f"input {name!r}: shape {shape} has {count} elements, more than the request's "
                              f"{json_bytes} bytes of JSON can hold")
        if datatype == "BYTES":
            if size is None:
                arrays[name] = object_tensor(json_bytes_elements(tensor["data"], count, name), shape)
            else:
                arrays[name] = object_tensor(binary_bytes_elements(binary, offset, size, count, name), shape)
                offset += size
            continue
        dtype = np.dtype(DTYPES[datatype])
        if size is None:
            flat = json_tensor(tensor["data"], dtype, count, name, datatype, may_hold_booleans)
        else:
            if size != count * dtype.itemsize:
                raise bad_request(f"input {name!r}: binary_data_size {size} is not shape {shape} x {datatype} "
                                  f"({count * dtype.itemsize} bytes)")
            flat = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
            offset += size
        arrays[name] = flat.astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data belong to no input")
    return arrays


def object_tensor(elements: list[bytes], shape: list[int]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


def json_bytes_elements(data: object, count: int, name: str) -> list[bytes]:
    """BYTES in JSON: one string per element. JSON cannot carry raw bytes (tritonclient's JSON mode sends them as
    UTF-8 text, which no PNG is), so an image file comes as base64 (a data: URL is accepted), as /classify/json."""
    flat = flatten(data, count, name)
    if len(flat) != count:
        raise bad_request(f"input {name!r}: 'data' has {len(flat)} elements, its shape {count}")
    if not all(isinstance(item, str) for item in flat):
        raise bad_request(f"input {name!r}: BYTES elements in JSON must be strings (base64 image files)")
    return [decode_base64_image(text, f"{name}[{index}]") for index, text in enumerate(flat)]


def binary_bytes_elements(binary: bytes, offset: int, size: int, count: int, name: str) -> list[bytes]:
    """BYTES in the binary extension: each element a 4-byte little-endian length, then that many bytes."""
    if count * 4 > size:
        raise bad_request(f"input {name!r}: {count} BYTES elements need at least {count * 4} bytes, "
                          f"binary_data_size is {size}")
    end, position, elements = offset + size, offset, []
    while position < end:
        if len(elements) == count:
            raise bad_request(f"input {name!r}: binary data holds more than the shape's {count} BYTES elements")
        if position + 4 > end:
            raise bad_request(f"input {name!r}: BYTES element {len(elements)} has a truncated length prefix")
        length = int.from_bytes(binary[position:position + 4], "little")
        position += 4
        if position + length > end:
            raise bad_request(f"input {name!r}: BYTES element {len(elements)} of {length} bytes runs past its "
                              f"binary_data_size")
        elements.append(binary[position:position + length])
        position += length
    if len(elements) != count:
        raise bad_request(f"input {name!r}: binary data holds {len(elements)} BYTES elements, its shape {count}")
    return elements


def requested_outputs(request: dict, available: list[str]) -> list[tuple[str, bool]]:
    """(output name, answer in binary?) for each output asked for; every served output when none is named."""
    binary_all = (request.get("parameters") or {}).get("binary_data_output") is True
    if request.get("outputs") is None:
        return [(name, binary_all) for name in available]
    wanted = []
    for output in request["outputs"]:
        if output["name"] not in available:
            raise bad_request(f"unknown output {output['name']!r}; this model gives {available}")
        parameters = output.get("parameters") or {}
        wanted.append((output["name"], parameters.get("binary_data", binary_all) is True))
    return wanted


# --- running the model through its batcher ---------------------------------------------------------------

def take_input(arrays: dict[str, np.ndarray], entry: ModelEntry, name: str) -> np.ndarray:
    expected = {node.name: node for node in entry.session.get_inputs()}
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise bad_request(f"unknown input(s) {unknown}; model {entry.name!r} takes {sorted(expected)}")
    if name not in arrays:
        raise bad_request(f"missing input {name!r}; model {entry.name!r} takes {sorted(expected)}")
    spec = tensor_spec(expected[name])
    array = arrays[name]
    if array.dtype == object:  # BYTES: encoded images, any shape; its element count is the batch
        if array.size == 0:
            raise bad_request(f"input {name!r}: the batch is empty")
        return array
    if len(array.shape) != len(spec["shape"]) or any(want not in (-1, got) for want, got in
                                                      zip(spec["shape"], array.shape)):
        raise bad_request(f"input {name!r}: shape {list(array.shape)} does not fit the model's {spec['shape']}")
    if array.shape[0] == 0:
        raise bad_request(f"input {name!r}: the batch is empty")
    return np.ascontiguousarray(array)


def check_datatypes(arrays: dict[str, np.ndarray], entry: ModelEntry) -> None:
    # A datatype the model does not take is named in the error before the shapes are looked at.
    for node in entry.session.get_inputs():
        if node.name in arrays:
            want = np.dtype(DTYPES[ORT_TO_V2[node.type]])
            if arrays[node.name].dtype == object and node.name == "pixels" and entry.card.get("task") in (
                    "classification", "segmentation"):
                continue  # BYTES: image files, decoded as /classify and /segment decode them
            if arrays[node.name].dtype != want:
                given = "BYTES" if arrays[node.name].dtype == object else arrays[node.name].dtype
                raise bad_request(f"input {node.name!r}: model {entry.name!r} takes {ORT_TO_V2[node.type]}, "
                                  f"not {given}")


def invert_parameter(request: dict) -> str:
    """parameters.invert of the request, for BYTES images: auto (default), true or false, as /classify takes it."""
    invert = (request.get("parameters") or {}).get("invert", "auto")
    if invert not in ("auto", "true", "false"):
        raise bad_request(f"parameters.invert must be 'auto', 'true' or 'false', got {invert!r}")
    return invert


def check_image_count(count: int) -> None:
    limit = get_current_service().config.limits.max_images_per_request
    if count > limit:
        raise ApiError(413, "too_many_images", f"{count} images in one request; the limit is {limit}")


async def run_classifier(entry: ModelEntry, arrays: dict[str, np.ndarray], request: dict,
                         outputs: list[str]) -> dict[str, np.ndarray]:
    pixels = take_input(arrays, entry, "pixels")
    check_image_count(pixels.size if pixels.dtype == object else len(pixels))
    if pixels.dtype == object:  # image files: decoded and fitted exactly as /classify does
        files = [(f"pixels[{index}]", data) for index, data in enumerate(pixels.ravel())]
        pixels, _, _ = await fit_images(files, entry.input_spec, invert_parameter(request),
                                        get_current_service().config.limits.max_pixels_per_image)
    return await entry.runner.infer(pixels, outputs=outputs)


def decoded_scenes(images: np.ndarray, entry: ModelEntry, invert: str, max_pixels: int) -> tuple[np.ndarray, tuple]:
    """BYTES image files -> padded uint8 [N, C, H', W'] as /segment prepares one, and their common H x W."""
    spec = entry.input_spec
    padded, sizes = [], []
    for index, data in enumerate(images.ravel()):
        try:
            pixels, gray, _ = prepare(data, spec, invert, max_pixels)
        except ApiError as exc:
            exc.message = f"pixels[{index}]: {exc.message}"
            raise
        padded.append(pixels[0])
        sizes.append(gray.shape)
    if len(set(sizes)) > 1:
        raise bad_request(f"the images of one request are one tensor and must share a size; got {sorted(set(sizes))}:"
                          " send images of other sizes in other requests")
    return np.stack(padded), sizes[0]


async def run_segmenter(entry: ModelEntry, arrays: dict[str, np.ndarray], request: dict,
                        outputs: list[str]) -> dict[str, np.ndarray]:
    """Padded to the stride and the outputs cropped back, as /segment does, so any H x W is taken."""
    pixels = take_input(arrays, entry, "pixels")
    limits = get_current_service().config.limits
    max_pixels = min(limits.max_pixels_per_image, limits.max_segment_pixels)
    if pixels.dtype == object:
        check_image_count(pixels.size)
        invert = invert_parameter(request)
        if sum(len(data) for data in pixels.ravel()) <= INLINE_DECODE_BYTES:
            padded, (height, width) = decoded_scenes(pixels, entry, invert, max_pixels)
        else:  # large photos are decoded off the event loop
            padded, (height, width) = await asyncio.to_thread(decoded_scenes, pixels, entry, invert, max_pixels)
    else:
        height, width = pixels.shape[2:]
        if height * width > max_pixels or height == 0 or width == 0:
            raise ApiError(413 if height * width else 400, "too_many_pixels",
                           f"images of {height}x{width}; the limit is 1 to {max_pixels} pixels")
        spec = entry.input_spec
        padded = np.stack([pad_to_multiple(image, spec.stride, spec.padding_value) for image in pixels])
    results = await entry.runner.infer(padded, outputs=outputs)
    # mask [N, H, W] and probabilities [N, K, H, W]: the last two axes are the image's.
    return {name: array[..., :height, :width] for name, array in results.items()}


async def run_generator(entry: ModelEntry, arrays: dict[str, np.ndarray], request: dict,
                        outputs: list[str]) -> dict[str, np.ndarray]:
    z, label = take_input(arrays, entry, "z"), take_input(arrays, entry, "label")
    if len(z) != len(label):
        raise bad_request(f"z has {len(z)} rows, label {len(label)}: one label per sample")
    limit = get_current_service().config.limits.max_samples_per_request
    if len(z) > limit:
        raise ApiError(413, "too_many_samples", f"{len(z)} samples; this server's limit is {limit}")
    classes = len(entry.card["labels"])
    if label.min() < 0 or label.max() >= classes:
        raise bad_request(f"label values must be 0..{classes - 1}")
    if not np.isfinite(z).all():
        raise bad_request("z must be finite")
    return await entry.runner.infer({"z": z, "label": label}, outputs=outputs)


# An autoencoder takes the classifiers' fixed-size uint8 pixels and answers its reconstruction.
RUNNERS = {"classification": run_classifier, "segmentation": run_segmenter, "generation": run_generator,
           "reconstruction": run_classifier}


# --- the answer -------------------------------------------------------------------------------------------

def inference_answer(entry: ModelEntry, request: dict, outputs: list[tuple[str, str, np.ndarray, bool]]) -> Response:
    """JSON, or with any binary output the JSON header, then the raw tensors, and its length in the header."""
    described, buffers = [], []
    for name, datatype, array, binary in outputs:
        output = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            output["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            output["data"] = array.ravel().tolist()
        described.append(output)
    answer = {"model_name": entry.name, "model_version": model_version(entry), "outputs": described}
    if "id" in request:
        answer["id"] = request["id"]
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not buffers:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(buffers), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


# --- statistics extension ---------------------------------------------------------------------------------

@dataclass
class ModelStatistics:
    """What this worker measured of one model's V2 infer requests: their count and wall time from the request's
    arrival at the route to its answer (decoding, queueing, the model call, encoding), split by success and
    failure. Per worker process, like the batchers; /metrics sums every route over the workers."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0  # images (or samples) answered
    last_inference_ms: int = 0

    def record(self, started_ns: int, items: int | None) -> None:
        elapsed = time.perf_counter_ns() - started_ns
        if items is None:
            self.fail_count += 1
            self.fail_ns += elapsed
            return
        self.success_count += 1
        self.success_ns += elapsed
        self.inference_count += items
        self.last_inference_ms = time.time_ns() // 1_000_000


STATISTICS: dict[str, ModelStatistics] = {}  # model name -> this worker's figures (the event loop's thread only)


def statistics_of(task: TaskModels, entry: ModelEntry) -> dict:
    """The protocol's model_stats entry, with only what is measured: no per-request queue or compute split (the
    batcher measures those per batch, on /metrics as queue_wait_seconds and inference_seconds)."""
    figures = STATISTICS.get(entry.name, ModelStatistics())
    runner = task.runners.get(entry.name)
    batches = dict(sorted(runner.batch_sizes_seen.items())) if runner is not None else {}
    return {"name": entry.name, "version": model_version(entry), "last_inference": figures.last_inference_ms,
            "inference_count": figures.inference_count,
            # Model calls of every route (native and V2), as the batcher counts them.
            "execution_count": sum(batches.values()),
            "inference_stats": {"success": {"count": figures.success_count, "ns": figures.success_ns},
                                "fail": {"count": figures.fail_count, "ns": figures.fail_ns}},
            "batch_stats": [{"batch_size": size, "compute_infer": {"count": count}} for size, count in batches.items()]}


async def model_statistics(request: Request) -> JSONResponse:
    name = request.path_params.get("name")
    if name is not None:
        task, entry = find_model(name, request.path_params.get("version"))
        return JSONResponse({"model_stats": [statistics_of(task, entry)]})
    return JSONResponse({"model_stats": [statistics_of(task, entry) for task in get_current_service().tasks
                                         for entry in task.models.values()]})


async def repository_index(request: Request) -> JSONResponse:
    """Every model of the server and its state (the repository extension's index only: models are not loaded or
    unloaded at run time, so that extension is not listed in GET /v2)."""
    index = []
    for task in get_current_service().tasks:
        for entry in task.models.values():
            item = {"name": entry.name, "version": model_version(entry),
                    "state": "READY" if entry.available else "UNAVAILABLE"}
            if not entry.available:
                item["reason"] = entry.unavailable_reason
            index.append(item)
    return JSONResponse(sorted(index, key=lambda item: item["name"]))


# --- routes -----------------------------------------------------------------------------------------------

async def server_metadata(request: Request) -> JSONResponse:
    return JSONResponse({"name": "visionserve", "version": server_version(), "extensions": EXTENSIONS})


async def server_live(request: Request) -> Response:
    return Response(status_code=200)


async def server_ready(request: Request) -> Response:
    # A worker answers only after every model was loaded and warmed up (service/app.py).
    ready = any(task.available for task in get_current_service().tasks)
    return Response(status_code=200 if ready else 503)


async def show_model_metadata(request: Request) -> JSONResponse:
    _, entry = find_model(request.path_params["name"], request.path_params.get("version"))
    return JSONResponse(model_metadata(entry))


async def model_ready(request: Request) -> Response:
    _, entry = find_model(request.path_params["name"], request.path_params.get("version"))
    if not entry.available:  # the protocol: a 4xx means not ready
        raise ApiError(400, "model_unavailable", f"model {entry.name!r} is not ready: {entry.unavailable_reason}")
    return Response(status_code=200)


async def infer(request: Request) -> Response:
    task, entry = find_model(request.path_params["name"], request.path_params.get("version"))
    started, items = time.perf_counter_ns(), None
    try:
        answer, items = await infer_with(request, task, entry)
        return answer
    finally:
        STATISTICS.setdefault(entry.name, ModelStatistics()).record(started, items)


async def infer_with(request: Request, task: TaskModels, entry: ModelEntry) -> tuple[Response, int]:
    task.resolve_model(entry.name)  # 503 for a model refused at start
    body = await request.body()
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    parsed = parse_header(header)
    datatypes = {node.name: ORT_TO_V2[node.type] for node in served_outputs(entry)}
    wanted = requested_outputs(parsed, list(datatypes))
    arrays = decode_inputs(parsed, binary, len(header), b"true" in header or b"false" in header)
    check_datatypes(arrays, entry)
    results = await RUNNERS[task.task](entry, arrays, parsed, list(dict.fromkeys(name for name, _ in wanted)))
    answer = inference_answer(entry, parsed, [(name, datatypes[name], results[name], binary_out)
                                             for name, binary_out in wanted])
    return answer, len(next(iter(results.values())))


def routes_with_versions(path: str, endpoint, methods: list[str]) -> list[Route]:
    prefix, _, rest = path.partition("{name}")
    return [Route(path, endpoint, methods=methods),
            Route(f"{prefix}{{name}}/versions/{{version}}{rest}", endpoint, methods=methods)]


ROUTES = [
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", server_live, methods=["GET"]),
    Route("/v2/health/ready", server_ready, methods=["GET"]),
    Route("/v2/models/stats", model_statistics, methods=["GET"]),  # before /v2/models/{name}, which it would match
    Route("/v2/repository/index", repository_index, methods=["POST"]),
    *routes_with_versions("/v2/models/{name}", show_model_metadata, ["GET"]),
    *routes_with_versions("/v2/models/{name}/ready", model_ready, ["GET"]),
    *routes_with_versions("/v2/models/{name}/infer", infer, ["POST"]),
    *routes_with_versions("/v2/models/{name}/stats", model_statistics, ["GET"]),
]


# --- the OpenAPI document's V2 paths (service/openapi.py adds them) ---------------------------------------------

ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string"}, "request_id": {"type": "string"}}}
TENSOR_SPEC_SCHEMA = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}}}}
INFER_REQUEST_SCHEMA = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"},
                           "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                           "datatype": {"enum": [*DTYPES, "BYTES"]},
                           "parameters": {"type": "object", "properties": {
                               "binary_data_size": {"type": "integer", "minimum": 0}}},
                           "data": {}}}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}},
    },
}
INFER_ANSWER_SCHEMA = {"type": "object", "required": ["model_name", "model_version", "outputs"], "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
    "outputs": {"type": "array", "items": {**TENSOR_SPEC_SCHEMA, "properties": {
        **TENSOR_SPEC_SCHEMA["properties"], "data": {"type": "array"}, "parameters": {"type": "object"}}}}}}
STATS_SCHEMA = {"type": "object", "required": ["model_stats"], "properties": {"model_stats": {"type": "array", "items": {
    "type": "object", "required": ["name", "version", "inference_count", "execution_count", "inference_stats"]}}}}
ERROR_MEANINGS = {"400": "a bad tensor, shape, datatype, parameter, image or body", "401": "missing or wrong API key",
                  "404": "unknown model or version", "413": "over a limit: body bytes, images per request, pixels",
                  "503": "overloaded (with Retry-After) or the model is unavailable"}


def openapi_paths(default_classifier: str | None, auth: bool) -> dict:
    """The V2 routes for GET /openapi.json, their errors in the protocol's shape."""
    def errors(*statuses: str) -> dict:
        answers = {}
        for status in statuses:
            if status == "401" and not auth:
                continue
            answers[status] = {"description": ERROR_MEANINGS[status],
                               "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            if status == "503":
                answers[status]["headers"] = {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}}
            if status == "401":
                answers[status]["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}
        return answers

    def json_answer(description: str, schema: dict) -> dict:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    def name_parameters(with_version: bool) -> list[dict]:
        name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                **({"example": default_classifier} if default_classifier else {})}
        return [name] + ([{"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}]
                         if with_version else [])

    status_only = {"description": "yes", "content": {}}
    paths = {
        "/v2": {"get": {"summary": "V2 server metadata", "operationId": "v2_server_metadata",
                        "responses": {"200": json_answer("name, version, extensions", {"type": "object"}),
                                      **errors("401")}}},
        "/v2/health/live": {"get": {"summary": "V2 liveness", "operationId": "v2_live",
                                    "responses": {"200": status_only}}},
        "/v2/health/ready": {"get": {"summary": "V2 readiness", "operationId": "v2_ready",
                                     "responses": {"200": status_only,
                                                   "503": {"description": "no model is available", "content": {}}}}},
        "/v2/models/stats": {"get": {"summary": "V2 statistics of every model", "operationId": "v2_all_stats",
                                     "responses": {"200": json_answer("model_stats", STATS_SCHEMA), **errors("401")}}},
        "/v2/repository/index": {"post": {"summary": "V2 repository index: every model and its state",
                                          "operationId": "v2_repository_index",
                                          "responses": {"200": json_answer("name, version, state", {"type": "array"}),
                                                        **errors("401")}}},
    }
    for with_version in (False, True):
        base, suffix = "/v2/models/{name}" + ("/versions/{version}" if with_version else ""), \
            "_version" if with_version else ""
        parameters = name_parameters(with_version)
        paths[base] = {"get": {"summary": "V2 model metadata", "operationId": f"v2_model_metadata{suffix}",
                               "parameters": parameters,
                               "responses": {"200": json_answer("inputs and outputs", {"type": "object", "properties": {
                                   "inputs": {"type": "array", "items": TENSOR_SPEC_SCHEMA},
                                   "outputs": {"type": "array", "items": TENSOR_SPEC_SCHEMA}}}),
                                   **errors("401", "404")}}}
        paths[f"{base}/ready"] = {"get": {"summary": "V2 model readiness", "operationId": f"v2_model_ready{suffix}",
                                          "parameters": parameters,
                                          "responses": {"200": status_only, **errors("400", "401", "404")}}}
        paths[f"{base}/stats"] = {"get": {"summary": "V2 statistics of one model", "operationId": f"v2_stats{suffix}",
                                          "parameters": parameters,
                                          "responses": {"200": json_answer("model_stats", STATS_SCHEMA),
                                                        **errors("401", "404")}}}
        example = {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}],
                   "outputs": [{"name": "probabilities"}]}
        paths[f"{base}/infer"] = {"post": {
            "summary": "V2 inference: JSON tensors, or the binary tensor extension (a JSON header of "
                       "Inference-Header-Content-Length bytes, then the tensors' bytes)",
            "operationId": f"v2_infer{suffix}", "parameters": parameters,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": INFER_REQUEST_SCHEMA, **({} if with_version else {"example": example})},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": {"description": "the outputs asked for (every output when none is named)",
                                  "content": {"application/json": {"schema": INFER_ANSWER_SCHEMA},
                                              "application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}},
                          **errors("400", "401", "404", "413", "503")}}}
    return paths
