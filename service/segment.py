"""Segmentation route: POST /segment, one image (multipart field `image`, or base64 in a JSON body).

The image keeps its own size: it is padded right and bottom to a multiple of the network's stride,
segmented, and the mask cropped back, so the answer's mask has the input's height and width.
`format=json` (default) answers statistics, connected components and the mask as a base64 PNG;
`format=mask` a PNG of class indices (mode L); `format=overlay` an RGB PNG with a legend.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import numpy as np
from bentoml import get_current_service
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import ApiError
from .images import InputSpec, decode_image, to_chw, to_model_mode
from .json_response import JSONResponse
from .masks import PALETTE, class_statistics, connected_components, mask_png, overlay_png, pad_to_multiple
from .parsing import INLINE_DECODE_BYTES, ModelParams, read_image_files


class SegmentParams(ModelParams):
    format: Literal["json", "mask", "overlay"] = Field(
        "json", description="json: statistics, components and the mask as base64 PNG; mask: PNG of class "
                            "indices; overlay: RGB PNG of the input with the classes blended in and a legend")


class SegmentJsonRequest(SegmentParams):
    image: str = Field(..., min_length=1, description="one base64 image file (a data: URL is accepted)")


def prepare(data: bytes, spec: InputSpec, invert: str, max_pixels: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Bytes -> (padded uint8 [1, C, H', W'] for the model, the unpadded grey image [H, W], inverted?)."""
    image = decode_image(data, max_pixels, "image")
    try:
        image, inverted = to_model_mode(image, spec.channels, spec.light_on_dark, invert)
    except (ValueError, OSError) as exc:
        raise ApiError(415, "unsupported_image", f"image mode {image.mode} cannot be converted: {exc}", "image") from None
    pixels = to_chw(image)
    gray = pixels[0] if spec.channels == 1 else np.asarray(image.convert("L"))
    return pad_to_multiple(pixels, spec.stride, spec.padding_value)[None], gray, inverted


def render(params: SegmentParams, card: dict, mask: np.ndarray, gray: np.ndarray, inverted: bool) -> Response:
    labels = card["labels"]
    if params.format == "mask":
        return Response(mask_png(mask), media_type="image/png")
    if params.format == "overlay":
        palette = np.array(card["palette"], np.uint8) if card.get("palette") else PALETTE
        return Response(overlay_png(gray, mask, labels, palette), media_type="image/png")
    height, width = mask.shape
    return JSONResponse({
        "model": card["name"], "version": card.get("version"), "height": height, "width": width, "inverted": inverted,
        "classes": class_statistics(mask, labels),
        "components": connected_components(mask, labels),
        "mask_png": base64.b64encode(mask_png(mask)).decode("ascii"),
    })


async def segment_image(data: bytes, params: SegmentParams) -> Response:
    service = get_current_service()
    limits = service.config.limits
    entry = service.segmentation.resolve_model(params.model)
    spec = entry.input_spec
    max_pixels = min(limits.max_pixels_per_image, limits.max_segment_pixels)
    if len(data) <= INLINE_DECODE_BYTES:
        pixels, gray, inverted = prepare(data, spec, params.invert, max_pixels)
    else:  # a large photo is decoded off the event loop
        pixels, gray, inverted = await asyncio.to_thread(prepare, data, spec, params.invert, max_pixels)
    mask = (await entry.runner.infer(pixels))[0, :gray.shape[0], :gray.shape[1]]
    answer = (params, entry.card, mask, gray, inverted)
    if len(data) <= INLINE_DECODE_BYTES:
        return render(*answer)
    return await asyncio.to_thread(render, *answer)  # PNG encoding of a large mask, off the event loop too


async def segment(request: Request) -> Response:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("application/json", "multipart/form-data")):
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with a file in 'image', or JSON with a base64 'image' "
                       f"(got {content_type or 'no content type'})")
    form = "json" if content_type.startswith("application/json") else "multipart"
    params, files = await read_image_files(request, form, SegmentParams, SegmentJsonRequest, file_field="image")
    if len(files) != 1:
        raise ApiError(422, "one_image_only", f"send exactly one file in 'image' (got {len(files)})", "image")
    return await segment_image(files[0][1], params)


ROUTES = [Route("/segment", segment, methods=["POST"])]
