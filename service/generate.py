"""Generation routes: POST /generate (samples of a class, as a grid or as images) and POST /generate/interpolate.

Reproducibility is part of the contract: the same request with the same seed returns the same bytes.
The noise comes from NumPy's PCG64 generator seeded with the request's seed (z for all n samples first,
then the random classes, so the first sample of a seed is the same whatever n is), and a request's
samples are one model call of their own, never merged with other requests'. Without a seed the server
draws one and returns it (header `X-Seed`, field `seed`), so any answer can be reproduced.
"""

from __future__ import annotations

import asyncio
import base64
import math
import secrets
from typing import Annotated, Literal

import numpy as np
from bentoml import get_current_service
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import ApiError
from .images import png_bytes
from .json_response import JSONResponse
from .onnx_models import ModelEntry
from .parsing import validation_error

MAX_SEED = 2**63 - 1
GRID_GAP = 2          # pixels between the cells of a grid or strip, at scale 1
GRID_GAP_VALUE = 96   # mid-dark grey: the cells of light-on-dark samples stay apart without glaring lines


def class_reference(value: object) -> int | str:
    # One check instead of a StrictInt | StrictStr union, whose errors name the union's members as fields.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("a class is a label name (a string) or an index (an integer)")
    return value


ClassRef = Annotated[int | str, BeforeValidator(class_reference)]


def integral_number(value: object) -> object:
    """JSON Schema's integer, which the OpenAPI document promises: 3 and 3.0 alike (JSON libraries write
    either). Never a bool or a string; a float only where it is exact (|x| <= 2^53), so no seed is rounded."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


JsonInt = Annotated[StrictInt, BeforeValidator(integral_number)]


class GenerateParams(BaseModel):
    # Unknown fields are refused: a misspelt "clas" silently giving random classes would be worse.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)
    n: JsonInt = Field(16, ge=1, le=64, description="samples to generate (at most VISIONSERVE_MAX_SAMPLES)")
    class_: ClassRef | None = Field(None, alias="class",
                                    description="class name or index; omitted: a random class per sample")
    seed: JsonInt | None = Field(None, ge=0, le=MAX_SEED, description="omitted: the server draws one")
    format: Literal["grid", "images"] = Field("grid", description="grid: one PNG; images: JSON of base64 PNGs")
    scale: JsonInt = Field(1, ge=1, le=8, description="nearest-neighbour enlargement")
    model: StrictStr | None = Field(None, description="model name; default: the best generator by its card")


class InterpolateParams(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)
    from_seed: JsonInt = Field(..., ge=0, le=MAX_SEED)
    to_seed: JsonInt = Field(..., ge=0, le=MAX_SEED)
    class_: ClassRef = Field(..., alias="class", description="class name or index")
    steps: JsonInt = Field(8, ge=2, le=32, description="images in the strip, both ends included")
    scale: JsonInt = Field(1, ge=1, le=8, description="nearest-neighbour enlargement")
    model: StrictStr | None = Field(None, description="model name; default: the best generator by its card")


def z_dim_of(entry: ModelEntry) -> int:
    return int(next(spec for spec in entry.card["inputs"] if spec["name"] == "z")["shape"][1])


def resolve_class(ref: int | str, labels: list[str], field: str = "class") -> int:
    """A class index, or a label name matched without regard to case or surrounding spaces."""
    if isinstance(ref, int):
        if 0 <= ref < len(labels):
            return ref
    else:
        wanted = ref.strip().casefold()
        for index, name in enumerate(labels):
            if name.casefold() == wanted:
                return index
    raise ApiError(422, "unknown_class", f"unknown class {ref!r}: use an index 0-{len(labels) - 1} or one of "
                   f"{labels}", field)


def seeded_inputs(seed: int, n: int, z_dim: int, num_classes: int, class_index: int | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """z [n, z_dim] float32 and labels [n] int64 from the seed alone (z first: see the module docstring)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, z_dim)).astype(np.float32)
    if class_index is None:
        labels = rng.integers(0, num_classes, n).astype(np.int64)
    else:
        labels = np.full(n, class_index, np.int64)
    return z, labels


def slerp(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """Spherical interpolation from a to b in `steps` points, both ends exact (White 2016, "Sampling
    generative networks"): Gaussian noise lives near a sphere, and a straight line would cut inside it."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos_omega = np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64))
    omega = math.acos(float(np.clip(cos_omega, -1.0, 1.0)))
    ts = np.linspace(0.0, 1.0, steps)
    if omega < 1e-6:  # (nearly) the same direction: linear is the same path
        path = [(1 - t) * a64 + t * b64 for t in ts]
    else:
        path = [(math.sin((1 - t) * omega) * a64 + math.sin(t * omega) * b64) / math.sin(omega) for t in ts]
    out = np.stack(path).astype(np.float32)
    out[0], out[-1] = a, b  # exactly the seeds' own noise, whatever the rounding above
    return out


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    return image if scale == 1 else np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def tile(pixels: np.ndarray, columns: int, scale: int) -> np.ndarray:
    """uint8 [N, 1, H, W] -> one grey image of `columns` cells per row, each enlarged by `scale`."""
    n, _, h, w = pixels.shape
    rows = -(-n // columns)
    gap = GRID_GAP * scale
    ch, cw = h * scale, w * scale
    canvas = np.full((rows * ch + (rows + 1) * gap, columns * cw + (columns + 1) * gap), GRID_GAP_VALUE, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = gap + r * (ch + gap), gap + c * (cw + gap)
        canvas[y:y + ch, x:x + cw] = enlarge(pixels[i, 0], scale)
    return canvas


async def parse_body(model: type[BaseModel], request: Request) -> BaseModel:
    """The JSON body, which is the whole request here: strictly typed (`"class": 3` is an index, `"3"` a label), as
    a query string cannot be, so a parameter given in the query string is refused, never silently ignored."""
    body = await request.body()  # the whole body before any answer, a 415 too (answering mid-upload resets it)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("application/json"):
        raise ApiError(415, "unsupported_media_type",
                       f"send a JSON body with Content-Type application/json (got {content_type or 'no content type'})")
    names = {alias or name for name, alias in ((name, field.alias) for name, field in model.model_fields.items())}
    for key, _ in request.query_params.multi_items():
        if key in names:
            raise ApiError(422, "invalid_parameter", f"{key}: give it in the JSON body (this route's parameters "
                           "are its body's fields)", key)
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise validation_error(exc) from None


def render_images(entry: ModelEntry, params: GenerateParams, seed: int, pixels: np.ndarray,
                  labels: np.ndarray) -> Response:
    names = entry.card["labels"]
    if params.format == "grid":
        columns = math.ceil(math.sqrt(len(pixels)))
        headers = {"X-Seed": str(seed), "X-Model": entry.name,
                   "X-Classes": ",".join(str(int(k)) for k in labels)}  # grid order, row by row
        return Response(png_bytes(tile(pixels, columns, params.scale)), media_type="image/png", headers=headers)
    images = [{"index": i, "class": names[int(k)], "class_index": int(k),
               "png": base64.b64encode(png_bytes(enlarge(pixels[i, 0], params.scale))).decode("ascii")}
              for i, k in enumerate(labels)]
    return JSONResponse({"model": entry.name, "version": entry.card.get("version"), "seed": seed, "n": len(images),
                         "scale": params.scale, "images": images}, headers={"X-Seed": str(seed)})


async def generate(request: Request) -> Response:
    params = await parse_body(GenerateParams, request)
    service = get_current_service()
    limits = service.config.limits
    if params.n > limits.max_samples_per_request:
        raise ApiError(422, "too_many_samples",
                       f"n={params.n}; this server's limit is {limits.max_samples_per_request} samples", "n")
    entry = service.generation.resolve_model(params.model)
    class_index = None if params.class_ is None else resolve_class(params.class_, entry.card["labels"])
    seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
    z, labels = seeded_inputs(seed, params.n, z_dim_of(entry), len(entry.card["labels"]), class_index)
    pixels = await entry.runner.infer({"z": z, "label": labels})
    if params.n * params.scale * params.scale > 256:  # big PNGs are encoded off the event loop
        return await asyncio.to_thread(render_images, entry, params, seed, pixels, labels)
    return render_images(entry, params, seed, pixels, labels)


async def interpolate(request: Request) -> Response:
    params = await parse_body(InterpolateParams, request)
    entry = get_current_service().generation.resolve_model(params.model)
    class_index = resolve_class(params.class_, entry.card["labels"])
    z_dim = z_dim_of(entry)
    start, _ = seeded_inputs(params.from_seed, 1, z_dim, 1, 0)
    end, _ = seeded_inputs(params.to_seed, 1, z_dim, 1, 0)
    z = slerp(start[0], end[0], params.steps)
    pixels = await entry.runner.infer({"z": z, "label": np.full(params.steps, class_index, np.int64)})
    strip = await asyncio.to_thread(tile, pixels, params.steps, params.scale)
    headers = {"X-Model": entry.name, "X-Class": str(class_index), "X-Steps": str(params.steps)}
    return Response(png_bytes(strip), media_type="image/png", headers=headers)


ROUTES = [
    Route("/generate", generate, methods=["POST"]),
    Route("/generate/interpolate", interpolate, methods=["POST"]),
]
