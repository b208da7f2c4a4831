"""Classification routes: POST /classify (multipart), /classify/json (base64), /classify/tensor (.npy).

A request reads top-down: its inputs (service/parsing.py: parameters, the model, fitted pixels), one batched
model call for the probabilities (and the OOD score where the model has OOD statistics: service/ood.py), the
answer.
"""

from __future__ import annotations

import numpy as np
from bentoml import get_current_service
from pydantic import Field
from starlette.requests import Request

from . import metrics
from .json_response import JSONResponse
from .onnx_models import ModelEntry
from .ood import OOD_SCORE
from .parsing import Form, ModelParams, inputs_of, routes_in_every_form


class ImageParams(ModelParams):
    """Classification's parameters."""

    top_k: int = Field(3, ge=1, le=10, description="how many classes to return per image")
    ood: bool = Field(True, description="score each image's distance from the training images (ood: score, "
                                        "threshold, flag, method); false skips it")


class Base64ImagesRequest(ImageParams):
    images: list[str] = Field(..., min_length=1, description="base64 image files (data: URLs accepted)")


def top_k_rows(probabilities: np.ndarray, labels: list[str], k: int) -> list[list[dict]]:
    """probabilities float32 [N, K] -> per row the k most likely classes, most likely first. One argsort over the
    batch and plain Python lists: per-row numpy calls cost more than the answer itself for a 64-image request."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    chosen = np.take_along_axis(probabilities, order, axis=1)
    return [[{"label": labels[i], "index": i, "probability": p} for i, p in zip(indices, values)]
            for indices, values in zip(order.tolist(), chosen.tolist())]


def top_k_predictions(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """probabilities float32 [K] -> the k most likely classes, most likely first."""
    return top_k_rows(probabilities[None], labels, k)[0]


def classification_answer(entry: ModelEntry, probabilities: np.ndarray, top_k: int,
                          inverted: list[bool] | None, ood: list[dict | None] | None = None) -> dict:
    labels = entry.card["labels"]
    predictions = []
    for position, top in enumerate(top_k_rows(probabilities, labels, top_k)):
        prediction = {"image": position, "top_k": top}
        if inverted is not None:
            prediction["inverted"] = inverted[position]
        if ood is not None:
            prediction["ood"] = ood[position]
        predictions.append(prediction)
    return {"model": entry.name, "version": entry.card.get("version"), "predictions": predictions}


async def classify_pixels(entry: ModelEntry, pixels: np.ndarray, want_ood: bool) -> tuple[np.ndarray, list | None]:
    """The probabilities, and with `want_ood` each image's OOD answer (null for a model without OOD statistics),
    from one batched model call that also scores the embedding (service/ood.py)."""
    scorer = get_current_service().ood.get(entry.name) if want_ood else None
    if scorer is None:
        probabilities = await entry.runner.infer(pixels)
        return probabilities, ([None] * len(probabilities) if want_ood else None)
    outputs = await entry.runner.infer(pixels, outputs=["probabilities", OOD_SCORE])
    answers = scorer.answers(outputs[OOD_SCORE])
    metrics.count_ood(entry.name, answers)  # visionserve_ood_scored_images_total / _flagged_images_total
    return outputs["probabilities"], answers


async def classify(request: Request, form: Form) -> JSONResponse:
    inputs = await inputs_of(request, form, get_current_service().classification, ImageParams, Base64ImagesRequest)
    probabilities, ood = await classify_pixels(inputs.entry, inputs.pixels, inputs.params.ood)
    return JSONResponse(classification_answer(inputs.entry, probabilities, inputs.params.top_k, inputs.inverted, ood))


ROUTES = routes_in_every_form("/classify", classify)
