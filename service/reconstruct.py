"""Reconstruction routes: POST /reconstruct (multipart), /reconstruct/json (base64), /reconstruct/tensor (.npy).

Each image is fitted to the autoencoder's input as for /classify (grey, aspect-preserving resize, padding,
polarity) and goes through the model's batcher; the graph answers the uint8 reconstruction and the per-image
reconstruction error (mean squared difference per pixel, pixels in [0, 1]; large for images unlike the
training set). `format=auto` (default) answers a PNG for one image (error in the X-Reconstruction-Error header)
and JSON for several; `format=json` always JSON (each reconstruction a base64 PNG beside its error);
`format=png` a PNG, one image only.
"""

from __future__ import annotations

import base64
import io
from typing import Literal

import numpy as np
from bentoml import get_current_service
from PIL import Image
from pydantic import Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError
from .http_front import (
    ModelParams,
    check_image_count,
    decode_base64_images,
    fit_all_off_loop_if_large,
    load_npy_tensor,
    parse_params,
    read_multipart_upload,
    validation_error,
)
from .images import InputSpec
from .onnx_models import ModelEntry
from .task_models import TaskModels

ERROR_HEADER = "X-Reconstruction-Error"


class ReconstructParams(ModelParams):
    format: Literal["auto", "json", "png"] = Field(
        "auto", description="auto: a PNG for one image, JSON for several; json: always JSON (base64 PNGs and "
                            "errors); png: the reconstruction as a PNG, one image only, its error in the "
                            f"{ERROR_HEADER} header")


class Base64ReconstructRequest(ReconstructParams):
    images: list[str] = Field(..., min_length=1, description="base64 image files (data: URLs accepted)")


def reconstructors() -> TaskModels:
    # The service instance BentoML created in this worker holds the models (service/app.py).
    return get_current_service().reconstruction


def image_png(pixels: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) -> PNG bytes (mode L or RGB)."""
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def answer(entry: ModelEntry, params: ReconstructParams, reconstructions: np.ndarray, errors: np.ndarray,
           inverted: list[bool] | None) -> Response:
    if params.format == "png" and len(reconstructions) != 1:
        raise ApiError(422, "one_image_only", f"format=png answers one image; {len(reconstructions)} were sent "
                       "(use format=json)", "format")
    if params.format == "png" or (params.format == "auto" and len(reconstructions) == 1):
        headers = {ERROR_HEADER: f"{float(errors[0]):.6g}", "X-Model": entry.name}
        if inverted is not None:
            headers["X-Inverted"] = "true" if inverted[0] else "false"
        return Response(image_png(reconstructions[0]), media_type="image/png", headers=headers)
    items = []
    for position, (pixels, error) in enumerate(zip(reconstructions, errors)):
        item = {"image": position, "error": float(error),
                "reconstruction_png": base64.b64encode(image_png(pixels)).decode("ascii")}
        if inverted is not None:
            item["inverted"] = inverted[position]
        items.append(item)
    return JSONResponse({"model": entry.name, "version": entry.card.get("version"),
                         "error_definition": "mean squared difference per pixel, pixels in [0, 1]",
                         "reconstructions": items})


async def reconstruct_pixels(entry: ModelEntry, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outputs = await reconstructors().infer(entry, pixels, outputs=["reconstruction", "error"])
    return outputs["reconstruction"], outputs["error"]


async def reconstruct_files(files: list[tuple[str, bytes]], params: ReconstructParams) -> Response:
    entry = reconstructors().resolve_model(params.model)
    if params.format == "png" and len(files) != 1:
        raise ApiError(422, "one_image_only", f"format=png answers one image; {len(files)} were sent "
                       "(use format=json)", "format")
    pixels, inverted = await fit_all_off_loop_if_large(
        files, InputSpec.from_card(entry.card), params.invert, get_current_service().config.limits.max_pixels_per_image)
    reconstructions, errors = await reconstruct_pixels(entry, pixels)
    return answer(entry, params, reconstructions, errors, inverted)


async def reconstruct_multipart(request: Request) -> Response:
    files, fields = await read_multipart_upload(request, get_current_service().config.limits)
    params = parse_params(ReconstructParams, request.query_params.multi_items(), fields)
    return await reconstruct_files(files, params)


async def reconstruct_base64(request: Request) -> Response:
    try:
        parsed = Base64ReconstructRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise validation_error(exc) from None
    check_image_count(len(parsed.images), get_current_service().config.limits)
    return await reconstruct_files(decode_base64_images(parsed.images), parsed)


async def reconstruct_tensor(request: Request) -> Response:
    params = parse_params(ReconstructParams, request.query_params.multi_items())
    entry = reconstructors().resolve_model(params.model)
    limits = get_current_service().config.limits
    pixels = load_npy_tensor(await request.body(), InputSpec.from_card(entry.card), limits)
    if params.invert == "true":  # tensors are model-ready; "auto" leaves them as sent
        pixels = 255 - pixels
    if params.format == "png" and len(pixels) != 1:
        raise ApiError(422, "one_image_only", f"format=png answers one image; {len(pixels)} were sent "
                       "(use format=json)", "format")
    reconstructions, errors = await reconstruct_pixels(entry, pixels)
    return answer(entry, params, reconstructions, errors, None)


ROUTES = [
    Route("/reconstruct", reconstruct_multipart, methods=["POST"]),
    Route("/reconstruct/json", reconstruct_base64, methods=["POST"]),
    Route("/reconstruct/tensor", reconstruct_tensor, methods=["POST"]),
]
