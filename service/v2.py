"""Open Inference Protocol (KServe V2 / Triton HTTP) REST routes under /v2, with the binary tensor extension.

The same models and batchers as the native routes (service/app.py): a V2 request of N images is one batch
entry. Errors raised here are ApiError like everywhere else; service/errors.py answers them under /v2 in the
protocol's shape, {"error": "<message>"}, with 400 for every bad tensor (docs/SERVING.md, "Open Inference
Protocol").
"""

from __future__ import annotations

import json
import math
from importlib import metadata

import numpy as np
from bentoml import get_current_service
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError
from .masks import pad_to_multiple
from .onnx_models import ModelEntry
from .task_models import TaskModels

EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
# Little-endian numpy dtypes of the protocol's fixed-size datatypes (BYTES is variable-size: not taken here).
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
    # Only the output the batcher computes is served (probabilities, mask, pixels).
    return [node for node in entry.session.get_outputs() if node.name == entry.output_name]


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
    if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
        raise bad_request(f"{HEADER_LENGTH}: {header_length!r} is not a length between 1 and the body's "
                          f"{len(body)} bytes")
    length = int(header_length)
    return body[:length], body[length:]


def parse_header(data: bytes) -> dict:
    try:
        request = json.loads(data)
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


def json_tensor(data: object, dtype: np.dtype, count: int, name: str, datatype: str) -> np.ndarray:
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


def decode_inputs(request: dict, binary: bytes, max_bytes: int) -> dict[str, np.ndarray]:
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
        if datatype not in DTYPES:
            raise bad_request(f"input {name!r}: datatype {datatype!r} is not taken here "
                              f"(one of {', '.join(DTYPES)})")
        dtype = np.dtype(DTYPES[datatype])
        shape = checked_shape(tensor, name)
        count = math.prod(shape)
        if count * dtype.itemsize > max_bytes:
            raise ApiError(413, "body_too_large", f"input {name!r}: shape {shape} of {datatype} is over the "
                           f"limit of {max_bytes} bytes")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise bad_request(f"input {name!r}: 'parameters' must be an object")
        size = parameters.get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise bad_request(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            flat = json_tensor(tensor["data"], dtype, count, name, datatype)
        else:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
            if offset + size > len(binary):
                raise bad_request(f"input {name!r}: binary_data_size {size} runs past the body's binary data "
                                  f"({len(binary) - offset} bytes left)")
            if size != count * dtype.itemsize:
                raise bad_request(f"input {name!r}: binary_data_size {size} is not shape {shape} x {datatype} "
                                  f"({count * dtype.itemsize} bytes)")
            flat = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
            offset += size
        arrays[name] = flat.astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data belong to no input")
    return arrays


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
            if arrays[node.name].dtype != want:
                raise bad_request(f"input {node.name!r}: model {entry.name!r} takes {ORT_TO_V2[node.type]}, "
                                  f"not {arrays[node.name].dtype}")


async def run_classifier(task: TaskModels, entry: ModelEntry, arrays: dict[str, np.ndarray]) -> np.ndarray:
    pixels = take_input(arrays, entry, "pixels")
    limit = get_current_service().config.limits.max_images_per_request
    if len(pixels) > limit:
        raise ApiError(413, "too_many_images", f"{len(pixels)} images in one request; the limit is {limit}")
    return await task.infer(entry, pixels)


async def run_segmenter(task: TaskModels, entry: ModelEntry, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Padded to the stride and the mask cropped back, as /segment does, so any H x W is taken."""
    pixels = take_input(arrays, entry, "pixels")
    limits = get_current_service().config.limits
    height, width = pixels.shape[2:]
    max_pixels = min(limits.max_pixels_per_image, limits.max_segment_pixels)
    if height * width > max_pixels or height == 0 or width == 0:
        raise ApiError(413 if height * width else 400, "too_many_pixels",
                       f"images of {height}x{width}; the limit is 1 to {max_pixels} pixels")
    stride = int(entry.card["input"]["stride"])
    padding = int(entry.card["input"].get("fit", {}).get("padding_value", 0))
    padded = np.stack([pad_to_multiple(image, stride, padding) for image in pixels])
    return (await task.infer(entry, padded))[:, :height, :width]


async def run_generator(task: TaskModels, entry: ModelEntry, arrays: dict[str, np.ndarray]) -> np.ndarray:
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
    return await task.infer(entry, {"z": z, "label": label})


RUNNERS = {"classification": run_classifier, "segmentation": run_segmenter, "generation": run_generator}


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
    task.resolve_model(entry.name)  # 503 for a model refused at start
    body = await request.body()
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    parsed = parse_header(header)
    datatypes = {node.name: ORT_TO_V2[node.type] for node in served_outputs(entry)}
    wanted = requested_outputs(parsed, list(datatypes))
    arrays = decode_inputs(parsed, binary, get_current_service().config.limits.max_body_bytes)
    check_datatypes(arrays, entry)
    result = await RUNNERS[task.task](task, entry, arrays)
    return inference_answer(entry, parsed, [(name, datatypes[name], result, binary_out)
                                           for name, binary_out in wanted])


def routes_with_versions(path: str, endpoint, methods: list[str]) -> list[Route]:
    prefix, _, rest = path.partition("{name}")
    return [Route(path, endpoint, methods=methods),
            Route(f"{prefix}{{name}}/versions/{{version}}{rest}", endpoint, methods=methods)]


ROUTES = [
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", server_live, methods=["GET"]),
    Route("/v2/health/ready", server_ready, methods=["GET"]),
    *routes_with_versions("/v2/models/{name}", show_model_metadata, ["GET"]),
    *routes_with_versions("/v2/models/{name}/ready", model_ready, ["GET"]),
    *routes_with_versions("/v2/models/{name}/infer", infer, ["POST"]),
]
