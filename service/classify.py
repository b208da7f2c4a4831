"""Classification routes: POST /classify (multipart), /classify/json (base64), /classify/tensor (.npy).

Served by the one HTTP front (service/app.py), which holds the models of every task.
"""

from __future__ import annotations

import numpy as np
from bentoml import get_current_service
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import metrics
from .http_front import (
    Base64ImagesRequest,
    ImageParams,
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


def top_k_predictions(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """probabilities float32 [K] -> the k most likely classes, most likely first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": labels[i], "index": int(i), "probability": float(probabilities[i])} for i in order]


def classification_answer(entry: ModelEntry, probabilities: np.ndarray, top_k: int,
                          inverted: list[bool] | None, ood: list[dict | None] | None = None) -> dict:
    labels = entry.card["labels"]
    predictions = []
    for position, row in enumerate(probabilities):
        prediction = {"image": position, "top_k": top_k_predictions(row, labels, top_k)}
        if inverted is not None:
            prediction["inverted"] = inverted[position]
        if ood is not None:
            prediction["ood"] = ood[position]
        predictions.append(prediction)
    return {"model": entry.name, "version": entry.card.get("version"), "predictions": predictions}


async def classify_pixels(entry: ModelEntry, pixels: np.ndarray, want_ood: bool) -> tuple[np.ndarray, list | None]:
    """The probabilities, and with `want_ood` each image's OOD answer (null for a model without OOD statistics),
    from one batched model call that also returns the embedding (service/ood.py)."""
    task = classifiers()
    scorer = get_current_service().ood.get(entry.name) if want_ood else None
    if scorer is None:
        probabilities = await task.infer(entry, pixels)
        return probabilities, ([None] * len(probabilities) if want_ood else None)
    outputs = await task.infer(entry, pixels, outputs=["probabilities", "embedding"])
    answers = await scorer.answers_off_loop_if_large(outputs["embedding"])
    metrics.count_ood(entry.name, answers)  # visionserve_ood_scored_images_total / _flagged_images_total
    return outputs["probabilities"], answers


def classifiers() -> TaskModels:
    # The service instance BentoML created in this worker holds the models (service/app.py).
    return get_current_service().classification


async def classify_image_files(files: list[tuple[str, bytes]], params: ImageParams) -> dict:
    task = classifiers()
    entry = task.resolve_model(params.model)
    pixels, inverted = await fit_all_off_loop_if_large(
        files, InputSpec.from_card(entry.card), params.invert, get_current_service().config.limits.max_pixels_per_image)
    probabilities, ood = await classify_pixels(entry, pixels, params.ood)
    return classification_answer(entry, probabilities, params.top_k, inverted, ood)


async def classify_multipart(request: Request) -> JSONResponse:
    files, fields = await read_multipart_upload(request, get_current_service().config.limits)
    # Parameters may come as form fields or in the query string; form fields win.
    params = parse_params(ImageParams, request.query_params.multi_items(), fields)
    return JSONResponse(await classify_image_files(files, params))


async def classify_base64(request: Request) -> JSONResponse:
    body = await request.body()
    try:
        parsed = Base64ImagesRequest.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    check_image_count(len(parsed.images), get_current_service().config.limits)
    return JSONResponse(await classify_image_files(decode_base64_images(parsed.images), parsed))


async def classify_tensor(request: Request) -> JSONResponse:
    task = classifiers()
    params = parse_params(ImageParams, request.query_params.multi_items())
    entry = task.resolve_model(params.model)
    pixels = load_npy_tensor(await request.body(), InputSpec.from_card(entry.card), get_current_service().config.limits)
    if params.invert == "true":  # tensors are model-ready; "auto" leaves them as sent
        pixels = 255 - pixels
    probabilities, ood = await classify_pixels(entry, pixels, params.ood)
    return JSONResponse(classification_answer(entry, probabilities, params.top_k, None, ood))


ROUTES = [
    Route("/classify", classify_multipart, methods=["POST"]),
    Route("/classify/json", classify_base64, methods=["POST"]),
    Route("/classify/tensor", classify_tensor, methods=["POST"]),
]
