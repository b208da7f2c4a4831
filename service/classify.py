"""The classification service: POST /classify (multipart), /classify/json (base64), /classify/tensor (.npy),
GET /models and /models/{name}.

Run it with `bentoml serve service.classify:Classifier` (or `make serve`). Configuration is read from
VISIONSERVE_* environment variables (service/config.py, docs/SERVING.md).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
from typing import AsyncIterator

import bentoml
from bentoml import get_current_service
import numpy as np
from PIL import Image
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .batching import AdaptiveBatcher, DirectRunner
from .config import ServingConfig, access_log_from_environment, workers_from_environment
from .errors import EXCEPTION_HANDLERS, ApiError
from .http_front import (
    Base64ImagesRequest,
    ImageParams,
    RequestBodyLimit,
    check_image_count,
    decode_base64_images,
    fit_all_off_loop_if_large,
    load_npy_tensor,
    parse_params,
    read_multipart_upload,
    validation_error,
)
from .images import InputSpec, configure_pillow_limits
from .model_store import model_folders
from .onnx_models import (
    ModelEntry,
    discover_model_folders,
    load_verified_model,
    preload_cuda_libraries,
    requested_providers,
)

logger = logging.getLogger("bentoml.visionserve")


def top_k_predictions(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """probabilities float32 [K] -> the k most likely classes, most likely first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": labels[i], "index": int(i), "probability": float(probabilities[i])} for i in order]


def classification_answer(entry: ModelEntry, probabilities: np.ndarray, top_k: int,
                          inverted: list[bool] | None) -> dict:
    labels = entry.card["labels"]
    predictions = []
    for position, row in enumerate(probabilities):
        prediction = {"image": position, "top_k": top_k_predictions(row, labels, top_k)}
        if inverted is not None:
            prediction["inverted"] = inverted[position]
        predictions.append(prediction)
    return {"model": entry.name, "version": entry.card.get("version"), "predictions": predictions}


# --- routes: plain Starlette handlers; the service instance holds models and configuration -----------

def current_classifier() -> "Classifier":
    # The instance BentoML created in this worker (routes are plain functions, the state lives there).
    return get_current_service()


async def classify_multipart(request: Request) -> JSONResponse:
    service = current_classifier()
    files, fields = await read_multipart_upload(request, service.config.limits)
    # Parameters may come as form fields or in the query string; form fields win.
    params = parse_params(ImageParams, {**request.query_params, **fields})
    return JSONResponse(await service.classify_image_files(files, params))


async def classify_base64(request: Request) -> JSONResponse:
    service = current_classifier()
    body = await request.body()
    try:
        parsed = Base64ImagesRequest.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    check_image_count(len(parsed.images), service.config.limits)
    files = decode_base64_images(parsed.images)
    return JSONResponse(await service.classify_image_files(files, parsed))


async def classify_tensor(request: Request) -> JSONResponse:
    service = current_classifier()
    params = parse_params(ImageParams, request.query_params)
    entry = service.resolve_model(params.model)
    pixels = load_npy_tensor(await request.body(), InputSpec.from_card(entry.card), service.config.limits)
    if params.invert == "true":  # tensors are model-ready; "auto" leaves them as sent
        pixels = 255 - pixels
    probabilities = await service.infer(entry, pixels)
    return JSONResponse(classification_answer(entry, probabilities, params.top_k, None))


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse(current_classifier().describe_models())


async def show_model(request: Request) -> JSONResponse:
    service = current_classifier()
    name = request.path_params["name"]
    entry = service.models.get(name)
    if entry is None:
        raise service.unknown_model(name, field=None)
    return JSONResponse({**entry.describe(), "default": name == service.default_model_name()})


async def unknown_path(request: Request) -> JSONResponse:
    raise ApiError(404, "not_found", f"no endpoint at {request.url.path}; see GET /docs.json")


@contextlib.asynccontextmanager
async def tune_gc_after_startup(app: Starlette) -> AsyncIterator[None]:
    """Runs once BentoML has created the service and started up, before the first request.

    Measured at 32 concurrent clients (2 cores): Python's full collections over BentoML's, onnxruntime's
    and the sessions' objects paused the event loop 50-130 ms each, ten times in 12 s, making the p99
    2-3x the p95; with all collections off the p99 fell from ~250 to ~75 ms. So: everything alive now
    lives as long as the worker and is frozen out of the collector's reach, and the young generation is
    collected every 10,000 allocations instead of 700, so that fewer in-flight request objects are
    promoted to the old generations (GC time 1.1 s -> 0.27 s per 12 s of load).
    """
    if current_classifier().config.inference.tune_gc:
        Image.init()  # Pillow imports its format plugins lazily, on the first image of an unusual format
        importlib.import_module("python_multipart")  # Starlette imports its form parser lazily too
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
    yield


def build_classify_front() -> Starlette:
    """The ASGI app mounted into the Classifier service; holds routing only, no state."""
    return Starlette(
        routes=[
            Route("/classify", classify_multipart, methods=["POST"]),
            Route("/classify/json", classify_base64, methods=["POST"]),
            Route("/classify/tensor", classify_tensor, methods=["POST"]),
            Route("/models", list_models, methods=["GET"]),
            Route("/models/{name}", show_model, methods=["GET"]),
            # Unknown paths under our prefixes get our error shape (elsewhere BentoML answers its own 404).
            Route("/classify/{rest:path}", unknown_path, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            Route("/models/{name}/{rest:path}", unknown_path, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ],
        middleware=[Middleware(RequestBodyLimit,
                               max_body_bytes=lambda: current_classifier().config.limits.max_body_bytes)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=tune_gc_after_startup,
    )


@bentoml.service(
    name="classifier",
    # BentoML fixes workers when the class is declared; the env var is read there, once.
    workers=workers_from_environment(),
    # The hard limit per request; the batcher's queue bound answers overload long before it.
    traffic={"timeout": 60},
    # One log line per request costs about as much CPU as a small model call: off unless asked for.
    logging={"access": {"enabled": access_log_from_environment()}},
)
@bentoml.asgi_app(build_classify_front(), path="/")
class Classifier:
    """Fashion-MNIST-style image classifiers from models/<name>/{model.onnx, card.json}."""

    def __init__(self) -> None:
        self.config = ServingConfig.from_environ()
        inference = self.config.inference
        configure_pillow_limits(self.config.limits.max_pixels_per_image)
        entries = discover_model_folders(model_folders(self.config.models_dir), task="classification")
        if not entries:
            where = self.config.models_dir or "BentoML's model store"
            raise RuntimeError(f"no classification models in {where}: import them with "
                               "`python -m service.model_store import models` (make serve does), "
                               "or point VISIONSERVE_MODELS_DIR at a folder of exported models")
        providers = requested_providers(inference.provider)
        if providers[0] == "CUDAExecutionProvider":
            preload_cuda_libraries()
        warmup_sizes = (1, inference.max_batch_size) if inference.batching else (1, 64)
        for entry in entries:
            load_verified_model(entry, inference.intra_op_threads, providers, warmup_sizes, inference.allow_spinning)
        self.models: dict[str, ModelEntry] = {entry.name: entry for entry in entries}
        self.runners = {
            entry.name: (
                AdaptiveBatcher(entry.run, inference.max_batch_size, inference.max_queued_images,
                                inference.retry_after_seconds, entry.name)
                if inference.batching else DirectRunner(entry.run, max(2, inference.intra_op_threads), entry.name)
            )
            for entry in entries if entry.available
        }
        logger.info("classifier ready: models %s available, %s unavailable; default %s; batching %s, "
                    "%d worker(s) x %d intra-op thread(s)",
                    sorted(self.runners), sorted(set(self.models) - set(self.runners)), self.default_model_name(),
                    "on" if inference.batching else "off", inference.workers, inference.intra_op_threads)

    def default_model_name(self) -> str | None:
        available = [entry for entry in self.models.values() if entry.available]
        return max(available, key=lambda entry: entry.accuracy).name if available else None

    def unknown_model(self, name: str, field: str | None = "model") -> ApiError:
        return ApiError(404, "unknown_model", f"no model named {name!r}; known: {sorted(self.models)}", field)

    def resolve_model(self, name: str | None) -> ModelEntry:
        name = name or self.default_model_name()
        if name is None:
            raise ApiError(503, "model_unavailable", "no model is available; see GET /models", "model")
        entry = self.models.get(name)
        if entry is None:
            raise self.unknown_model(name)
        if not entry.available:
            raise ApiError(503, "model_unavailable", f"model {name!r} is unavailable: {entry.unavailable_reason}",
                           "model")
        return entry

    async def infer(self, entry: ModelEntry, pixels: np.ndarray) -> np.ndarray:
        return await self.runners[entry.name].infer(pixels)

    async def classify_image_files(self, files: list[tuple[str, bytes]], params: ImageParams) -> dict:
        entry = self.resolve_model(params.model)
        pixels, inverted = await fit_all_off_loop_if_large(
            files, InputSpec.from_card(entry.card), params.invert, self.config.limits.max_pixels_per_image)
        probabilities = await self.infer(entry, pixels)
        return classification_answer(entry, probabilities, params.top_k, inverted)

    def describe_models(self) -> dict:
        inference = self.config.inference
        return {
            "default": self.default_model_name(),
            "models": [entry.describe() for entry in self.models.values()],
            "serving": {
                "workers": inference.workers,
                "intra_op_threads": inference.intra_op_threads,
                "batching": inference.batching,
                "max_batch_size": inference.max_batch_size,
                # This worker's batch sizes so far: shows batching at work under load.
                "batch_sizes_seen": {name: dict(sorted(runner.batch_sizes_seen.items()))
                                     for name, runner in self.runners.items()},
            },
        }
