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
from typing import Literal

import numpy as np
from bentoml import get_current_service
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from .errors import ApiError
from .images import from_chw, png_bytes
from .json_response import JSONResponse
from .onnx_models import ModelEntry
from .parsing import Form, ModelParams, inputs_of, routes_in_every_form

ERROR_HEADER = "X-Reconstruction-Error"


class ReconstructParams(ModelParams):
    format: Literal["auto", "json", "png"] = Field(
        "auto", description="auto: a PNG for one image, JSON for several; json: always JSON (base64 PNGs and "
                            "errors); png: the reconstruction as a PNG, one image only, its error in the "
                            f"{ERROR_HEADER} header")


class Base64ReconstructRequest(ReconstructParams):
    images: list[str] = Field(..., min_length=1, description="base64 image files (data: URLs accepted)")


def check_png_count(params: BaseModel, count: int, field: str) -> None:
    if params.format == "png" and count != 1:
        raise ApiError(422, "one_image_only", f"format=png answers one image; {count} were sent (use format=json)",
                       "format")


def answer(entry: ModelEntry, params: ReconstructParams, reconstructions: np.ndarray, errors: np.ndarray,
           inverted: list[bool] | None) -> Response:
    if params.format == "png" or (params.format == "auto" and len(reconstructions) == 1):
        headers = {ERROR_HEADER: f"{float(errors[0]):.6g}", "X-Model": entry.name}
        if inverted is not None:
            headers["X-Inverted"] = "true" if inverted[0] else "false"
        return Response(png_bytes(from_chw(reconstructions[0])), media_type="image/png", headers=headers)
    items = []
    for position, (pixels, error) in enumerate(zip(reconstructions, errors)):
        item = {"image": position, "error": float(error),
                "reconstruction_png": base64.b64encode(png_bytes(from_chw(pixels))).decode("ascii")}
        if inverted is not None:
            item["inverted"] = inverted[position]
        items.append(item)
    return JSONResponse({"model": entry.name, "version": entry.card.get("version"),
                         "error_definition": "mean squared difference per pixel, pixels in [0, 1]",
                         "reconstructions": items})


async def reconstruct(request: Request, form: Form) -> Response:
    inputs = await inputs_of(request, form, get_current_service().reconstruction, ReconstructParams,
                             Base64ReconstructRequest, check_count=check_png_count)
    outputs = await inputs.entry.runner.infer(inputs.pixels, outputs=["reconstruction", "error"])
    return answer(inputs.entry, inputs.params, outputs["reconstruction"], outputs["error"], inputs.inverted)


ROUTES = routes_in_every_form("/reconstruct", reconstruct)
