"""Explanation routes: POST /explain (multipart), /explain/json (base64), /explain/tensor (.npy), one image each.

The answer is a saliency map for one class (`target`, default the top-1): how much each pixel speaks for that
class. The server has no autograd, so two gradient-free methods:

- **occlusion** (every classifier): copies of the fitted image with a `patch` x `patch` square set to the
  background value at every `stride`; the map at a pixel is the mean drop of the target's probability over the
  copies that cover it. The original and all its copies go through the model's batcher as one request, so they
  run as one onnxruntime call (and queue with other requests on the model's one thread, under its overload
  bound and in its metrics) rather than as a second stream of work competing for the same cores.
- **cam** (class activation maps, Zhou et al. 2016) where the graph has a `cam` output (the single-graph ResNet,
  export/classifier.py): the last 7x7 feature maps weighted by the classifier's weights for the target, from the
  same one forward pass as the probabilities, bilinearly upsampled.

The map comes at the model's input size and at the input's own size (the inverse of the aspect-preserving fit:
the padding cut off, then resized), as JSON lists, base64 float32 .npy, or a heat-map PNG over the input.
Faithfulness and cost are measured by benchmarks/explain.py (benchmarks/results/explain.md).
"""

from __future__ import annotations

import base64
import io
from typing import Literal

import numpy as np
from bentoml import get_current_service
from PIL import Image
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from .classify import top_k_predictions
from .errors import ApiError
from .images import InputSpec, from_chw, png_bytes
from .json_response import JSONResponse
from .onnx_models import ModelEntry
from .parsing import Form, ModelParams, inputs_of, routes_in_every_form

CAM_OUTPUT = "cam"


class ExplainParams(ModelParams):
    target: str | None = Field(None, description="the class to explain, by label or index; default: the top-1")
    method: Literal["auto", "occlusion", "cam"] = Field(
        "auto", description="auto: cam where the model's graph has class activation maps, else occlusion")
    patch: int = Field(4, ge=2, le=14, description="occlusion: side of the square occluded, in model pixels")
    stride: int = Field(2, ge=1, le=14, description="occlusion: step between squares (at most `patch`)")
    format: Literal["json", "npy", "overlay"] = Field(
        "json", description="json: maps as lists; npy: maps as base64 float32 .npy; overlay: PNG heat map over "
                            "the input at its own size")


class ExplainJsonRequest(ExplainParams):
    # At most one, said in the schema; the route refuses more itself (one_image_only, as for the other forms).
    images: list[str] = Field(..., min_length=1, json_schema_extra={"maxItems": 1}, description="one base64 image file")


# --- the methods (pure numpy: tested in-process and used by benchmarks/explain.py) ----------------------------

def occlusion_positions(side: int, patch: int, stride: int) -> list[int]:
    """Top (or left) edges of the squares along one side: every `stride`, plus one flush with the far edge."""
    positions = list(range(0, side - patch + 1, stride))
    if positions[-1] != side - patch:
        positions.append(side - patch)
    return positions


def occluded_copies(pixels: np.ndarray, patch: int, stride: int, fill: int) -> tuple[np.ndarray, list]:
    """uint8 [C, H, W] -> uint8 [M, C, H, W] copies, each with one patch x patch square set to `fill`, and the
    squares' (top, left)."""
    _, height, width = pixels.shape
    squares = [(y, x) for y in occlusion_positions(height, patch, stride)
               for x in occlusion_positions(width, patch, stride)]
    copies = np.repeat(pixels[None], len(squares), axis=0)
    for k, (y, x) in enumerate(squares):
        copies[k, :, y:y + patch, x:x + patch] = fill
    return copies, squares


def occlusion_map(base: float, occluded: np.ndarray, squares: list, patch: int, shape: tuple[int, int]) -> np.ndarray:
    """The mean drop of the target's probability (base - occluded) over the squares covering each pixel."""
    total = np.zeros(shape, np.float64)
    cover = np.zeros(shape, np.float64)
    for drop, (y, x) in zip(base - occluded, squares):
        total[y:y + patch, x:x + patch] += drop
        cover[y:y + patch, x:x + patch] += 1
    return (total / np.maximum(cover, 1)).astype(np.float32)


def resize_map(values: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def contained_box(input_width: int, input_height: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Where ImageOps.pad (images.fit_to_input_spec) puts an input_width x input_height image inside
    width x height: (left, top, contained width, contained height), by Pillow's own arithmetic."""
    contained_w, contained_h = width, height
    if input_width / input_height != width / height:
        if input_width / input_height > width / height:
            contained_h = round(input_height / input_width * width)
        else:
            contained_w = round(input_width / input_height * height)
    left = round((width - contained_w) * 0.5) if contained_w != width else 0
    top = round((height - contained_h) * 0.5) if contained_w == width and contained_h != height else 0
    return left, top, max(contained_w, 1), max(contained_h, 1)


def map_at_input_size(values: np.ndarray, input_width: int, input_height: int) -> np.ndarray:
    """A map over the fitted image -> over the input: the padding cut off, the rest resized to the input's size."""
    height, width = values.shape
    left, top, contained_w, contained_h = contained_box(input_width, input_height, width, height)
    return resize_map(values[top:top + contained_h, left:left + contained_w], input_width, input_height)


# A dark-to-bright ramp (black, purple, red, orange, pale yellow, like matplotlib's "inferno"), written out
# because the service image has no matplotlib.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float64)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[H, W] in 0..1 -> uint8 [H, W, 3]."""
    positions = np.linspace(0, 1, len(_RAMP))
    return np.stack([np.interp(values, positions, _RAMP[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def overlay_png(image: Image.Image, values: np.ndarray) -> bytes:
    """The map's positive part (evidence for the target), scaled to its maximum, blended over the input."""
    evidence = np.clip(values, 0, None)
    evidence = evidence / evidence.max() if evidence.max() > 0 else evidence
    base = np.asarray(image.convert("RGB"), np.float64)
    alpha = (0.25 + 0.5 * evidence)[..., None]
    blended = (1 - alpha) * base + alpha * heat_colours(evidence)
    return png_bytes(np.clip(blended, 0, 255).astype(np.uint8))


def npy_base64(values: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, values.astype(np.float32), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- the route ---------------------------------------------------------------------------------------------

def target_index(target: str | None, labels: list[str], probabilities: np.ndarray) -> int:
    if target is None:
        return int(np.argmax(probabilities))
    if target in labels:
        return labels.index(target)
    if target.isdigit() and int(target) < len(labels):
        return int(target)
    raise ApiError(422, "unknown_class", f"target {target!r} is neither a label nor an index of the model: "
                   f"{labels}", "target")


def chosen_method(params: ExplainParams, entry: ModelEntry) -> str:
    has_cam = CAM_OUTPUT in entry.output_names
    if params.method == "cam" and not has_cam:
        raise ApiError(422, "method_unavailable", f"model {entry.name!r} has no class activation maps (its graph "
                       "has no `cam` output: only a single network ending in global average pooling has them); "
                       "use method=occlusion", "method")
    if params.method == "auto":
        return "cam" if has_cam else "occlusion"
    return params.method


def check_occlusion_params(params: ExplainParams, spec: InputSpec) -> None:
    if params.patch > min(spec.height, spec.width):
        raise ApiError(422, "invalid_parameter", f"patch: at most the model's input side, "
                       f"{min(spec.height, spec.width)}", "patch")
    if params.stride > params.patch:
        raise ApiError(422, "invalid_parameter", f"stride: at most patch ({params.patch}), or pixels between the "
                       "squares would never be occluded", "stride")


async def explain_pixels(entry: ModelEntry, pixels: np.ndarray, params: ExplainParams) -> dict:
    """uint8 [C, H, W] fitted pixels -> the explanation (maps at model size) and what was run."""
    spec = entry.input_spec
    labels = entry.card["labels"]
    method = chosen_method(params, entry)
    if method == "cam":
        outputs = await entry.runner.infer(pixels[None], outputs=["probabilities", CAM_OUTPUT])
        probabilities = outputs["probabilities"][0]
        target = target_index(params.target, labels, probabilities)
        values = resize_map(outputs[CAM_OUTPUT][0, target], spec.width, spec.height)
        details = {"passes": 1, "feature_map": list(outputs[CAM_OUTPUT].shape[2:])}
    else:
        check_occlusion_params(params, spec)
        copies, squares = occluded_copies(pixels, params.patch, params.stride, spec.padding_value)
        # One request of 1 + M images: one onnxruntime call (module docstring).
        probabilities_all = await entry.runner.infer(np.concatenate([pixels[None], copies]), outputs=["probabilities"])
        probabilities_all = probabilities_all["probabilities"]
        probabilities = probabilities_all[0]
        target = target_index(params.target, labels, probabilities)
        values = occlusion_map(float(probabilities[target]), probabilities_all[1:, target], squares, params.patch,
                               (spec.height, spec.width))
        details = {"passes": 1 + len(squares), "patch": params.patch, "stride": params.stride,
                   "fill": spec.padding_value}
    return {"method": method, "values": values, "probabilities": probabilities, "target": target,
            "details": details}


def explanation_answer(entry: ModelEntry, result: dict, input_map: np.ndarray, inverted: bool | None,
                       encoding: str) -> dict:
    labels = entry.card["labels"]
    target, values = result["target"], result["values"]
    encode = npy_base64 if encoding == "npy" else (lambda a: np.round(a, 6).tolist())
    meaning = ("drop of the target's probability when the pixel's neighbourhood is occluded (mean over the "
               "squares covering it); positive: evidence for the target" if result["method"] == "occlusion" else
               "the target's class activation (its logit's contribution per cell of the last feature maps, "
               "upsampled); higher: more evidence for the target")
    return {
        "model": entry.name, "version": entry.card.get("version"), "method": result["method"],
        "target": {"index": target, "label": labels[target], "probability": float(result["probabilities"][target])},
        "top_k": top_k_predictions(result["probabilities"], labels, 3),
        **({"inverted": inverted} if inverted is not None else {}),
        **result["details"], "meaning": meaning, "encoding": "list" if encoding != "npy" else "npy-base64",
        "map": {"height": int(values.shape[0]), "width": int(values.shape[1]), "values": encode(values)},
        "input_map": {"height": int(input_map.shape[0]), "width": int(input_map.shape[1]),
                      "values": encode(input_map)},
    }


def overlay_response(entry: ModelEntry, result: dict, image: Image.Image, input_map: np.ndarray) -> Response:
    target = result["target"]
    return Response(overlay_png(image, input_map), media_type="image/png", headers={
        "X-Model": entry.name, "X-Method": result["method"], "X-Target": entry.card["labels"][target],
        "X-Target-Index": str(target), "X-Target-Probability": f"{float(result['probabilities'][target]):.6f}"})


def check_one_image(params: BaseModel, count: int, field: str) -> None:
    if count != 1:
        raise ApiError(422, "one_image_only", f"send exactly one image in '{field}' (got {count}): an explanation "
                       "is of one image", field)


async def explain(request: Request, form: Form) -> Response:
    inputs = await inputs_of(request, form, get_current_service().classification, ExplainParams, ExplainJsonRequest,
                             check_count=check_one_image, keep_images=True)
    entry, params = inputs.entry, inputs.params
    result = await explain_pixels(entry, inputs.pixels[0], params)
    if inputs.images is None:  # a tensor: the model's input is the input
        image, input_map, inverted = Image.fromarray(from_chw(inputs.pixels[0])), result["values"], None
    else:
        image, inverted = inputs.images[0], inputs.inverted[0]
        input_map = map_at_input_size(result["values"], image.width, image.height)
    if params.format == "overlay":
        return overlay_response(entry, result, image, input_map)
    return JSONResponse(explanation_answer(entry, result, input_map, inverted, params.format))


ROUTES = routes_in_every_form("/explain", explain)
