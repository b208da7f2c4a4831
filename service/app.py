"""The one BentoML service: every task's models (classification, segmentation, generation, reconstruction), the
routes of service/<task>.py and v2.py mounted as one Starlette app, and GET /models and /models/{name}.

    bentoml serve service.app:VisionService        (or `make serve`)

Each task keeps its models in a `TaskModels` of the one service instance, so a request goes from the
ASGI route to onnxruntime inside one process: no second hop through BentoML's typed-API layer, which
costs more than these models on a small machine (docs/ARCHITECTURE.md, front-end cost). A request reads
top-down: the route (service/classify.py, ...), its inputs (service/parsing.py, service/images.py), the model's
batcher (service/batching.py), onnxruntime (service/onnx_models.py). Configuration is read from VISIONSERVE_*
environment variables (service/config.py, docs/SERVING.md).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
from typing import AsyncIterator

import bentoml
from bentoml import get_current_service
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route

from . import classify, explain, features, generate, metrics, reconstruct, segment, v2, web
from .config import ServingConfig, access_log_from_environment, tracing_from_environment, workers_from_environment
from .errors import EXCEPTION_HANDLERS, ApiError
from .images import configure_pillow_limits
from .json_response import JSONResponse
from .middleware import AdmissionLimit, ControlCharactersInPath, RequestBodyLimit
from .model_store import models_to_serve
from .onnx_models import (GPU_INSTALL_HINT, cuda_missing, preload_cuda_libraries, requested_providers,
                          sessions_not_on_cuda)
from .openapi import build_openapi
from .request_context import RequestId
from .security import ApiKeyAuth
from .ood import load_ood_scorers
from .similarity import check_feature_files, load_similarity_indexes
from .task_models import TaskModels

logger = logging.getLogger("bentoml.visionserve")
READY_LOG_LINE = "visionserve ready"


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse(get_current_service().describe_models())


async def show_model(request: Request) -> JSONResponse:
    service = get_current_service()
    name = request.path_params["name"]
    for task in service.tasks:
        if name in task.models:
            return JSONResponse({**task.models[name].describe(), "default": name == task.default_model_name()})
    raise ApiError(404, "unknown_model", f"no model named {name!r}; known: {service.model_names()}", None)


def methods_at(app: Starlette, path: str) -> set[str]:
    """The methods our routes (not the catch-alls) answer at `path`."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, Route) and route.endpoint is not unknown_path and route.path_regex.match(path):
            methods |= route.methods or set()
    return methods


async def unknown_path(request: Request) -> JSONResponse:
    # The catch-alls below also match known paths (/classify/json under /classify/{rest}): a wrong method
    # there is a 405 with Allow, as on every other route, not a 404.
    allowed = methods_at(request.app, request.url.path)
    if allowed:
        methods = ", ".join(sorted(allowed))
        raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed here; use {methods}", None,
                       headers={"Allow": methods})
    raise ApiError(404, "not_found", f"no endpoint at {request.url.path}; see GET /openapi.json")


async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(get_current_service().openapi_document())


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
    if get_current_service().config.inference.tune_gc:
        Image.init()  # Pillow imports its format plugins lazily, on the first image of an unusual format
        importlib.import_module("python_multipart")  # Starlette imports its form parser lazily too
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
    yield


def build_front() -> Starlette:
    """The ASGI app mounted into the service; holds routing only, no state."""
    def max_body_bytes() -> int:  # one reading of the limit for both middlewares
        return get_current_service().config.limits.max_body_bytes

    any_method = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(
        routes=[
            *classify.ROUTES,
            *explain.ROUTES,  # /explain: saliency maps (service/explain.py)
            *features.ROUTES,  # /embed and /similar (service/features.py)
            *segment.ROUTES,
            *generate.ROUTES,
            *reconstruct.ROUTES,  # /reconstruct: the autoencoder (service/reconstruct.py)
            *v2.ROUTES,
            *web.ROUTES,  # the web page at /, Swagger UI at /docs (service/web.py)
            Route("/models", list_models, methods=["GET"]),
            Route("/models/{name}", show_model, methods=["GET"]),
            Route("/openapi.json", openapi_document, methods=["GET"]),
            # Unknown paths under our prefixes get our error shape (elsewhere BentoML answers its own 404).
            Route("/classify/{rest:path}", unknown_path, methods=any_method),
            Route("/explain/{rest:path}", unknown_path, methods=any_method),
            Route("/embed/{rest:path}", unknown_path, methods=any_method),
            Route("/similar/{rest:path}", unknown_path, methods=any_method),
            Route("/segment/{rest:path}", unknown_path, methods=any_method),
            Route("/generate/{rest:path}", unknown_path, methods=any_method),
            Route("/reconstruct/{rest:path}", unknown_path, methods=any_method),
            Route("/models/{name}/{rest:path}", unknown_path, methods=any_method),
            Route("/v2/{rest:path}", unknown_path, methods=any_method),
        ],
        middleware=[Middleware(AdmissionLimit,
                               max_in_flight=lambda: get_current_service().config.inference.max_in_flight_requests,
                               retry_after=lambda: get_current_service().config.inference.retry_after_seconds,
                               max_body_bytes=max_body_bytes),
                    Middleware(RequestBodyLimit, max_body_bytes=max_body_bytes)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=tune_gc_after_startup,
    )


def check_configuration_before_serving() -> None:
    """The configuration is read, and the models to serve resolved in the store, in the `bentoml serve` process
    itself, before any worker starts.

    BentoML's arbiter respawns a worker whose __init__ raises, forever and never ready (measured: with a
    missing VISIONSERVE_MODELS_DIR it logged the same traceback 270 lines a minute and did not exit), so a
    server that cannot serve anything must fail here and exit, like a bad VISIONSERVE_WORKERS does.
    """
    config = ServingConfig.from_environ()
    models = models_to_serve(config.models)
    # A similarity index or OOD statistics whose bytes are not their card's: refuse here, before any worker.
    check_feature_files(models)
    if config.inference.device == "cuda":
        # A GPU deployment that silently ran on CPU would be 10-100x slower and look healthy: refuse instead.
        probe = next((model.folder / "model.onnx" for model in models if (model.folder / "model.onnx").is_file()), None)
        reason = cuda_missing(probe)
        if reason:
            raise RuntimeError(f"VISIONSERVE_DEVICE=cuda, but CUDA cannot run: {reason}. "
                               "VISIONSERVE_DEVICE=auto serves on CPU instead.")


check_configuration_before_serving()


@bentoml.service(
    name="visionserve",
    # BentoML fixes workers when the class is declared; the env var is read there, once.
    workers=workers_from_environment(),
    # The hard limit per request; the batcher's queue bound answers overload long before it.
    traffic={"timeout": 60},
    # A bare `bentoml serve` binds every interface (0.0.0.0); this service listens on loopback unless told
    # otherwise (--host or BENTOML_HOST, as the container image does: docs/SERVING.md).
    http={"host": "127.0.0.1"},
    # One log line per request costs about as much CPU as a small model call: off unless asked for.
    logging={"access": {"enabled": access_log_from_environment()}},
    # BentoML's OpenTelemetry middleware, on every request: off unless VISIONSERVE_TRACING=on (service/config.py).
    tracing=tracing_from_environment(),
)
@bentoml.asgi_app(build_front(), path="/")
class VisionService:
    """The models the checkout's cards name (from BentoML's model store; service/model_store.py), grouped by task."""

    def __init__(self) -> None:
        self.config = ServingConfig.from_environ()
        inference = self.config.inference
        configure_pillow_limits(self.config.limits.max_pixels_per_image)
        models = models_to_serve(self.config.models)
        providers = requested_providers(inference.device)
        if providers[0] == "CUDAExecutionProvider":
            preload_cuda_libraries()
        self.classification = TaskModels("classification", models, inference, providers)
        self.segmentation = TaskModels("segmentation", models, inference, providers)
        self.generation = TaskModels("generation", models, inference, providers)
        self.reconstruction = TaskModels("reconstruction", models, inference, providers)
        self.tasks = [self.classification, self.segmentation, self.generation, self.reconstruction]
        # /similar's indexes, loaded once here and never built at request time (service/similarity.py).
        self.similarity = load_similarity_indexes(self.classification.models.values(),
                                                  threads=inference.intra_op_threads)
        # Each /classify answer's `ood` (service/ood.py): the export step's statistics, checked like the index.
        self.ood = load_ood_scorers(self.classification.models.values())
        self.check_device(inference.device)
        if not any(task.models for task in self.tasks):
            raise RuntimeError(f"none of the {len(models)} models named is of a served task "
                               f"({', '.join(task.task for task in self.tasks)})")
        logger.info("%s: %s; batching %s, %d worker(s) x %d intra-op thread(s)", READY_LOG_LINE,
                    "; ".join(f"{task.task} models {task.available} available, default {task.default_model_name()}, "
                              f"{sorted(set(task.models) - set(task.available))} unavailable" for task in self.tasks),
                    "on" if inference.batching else "off", inference.workers, inference.intra_op_threads)
        logger.info("API key authentication %s", "on (VISIONSERVE_API_KEY)" if self.config.api_key_required
                    else "off: set VISIONSERVE_API_KEY to require a key")
        self._openapi: dict | None = None

    def check_device(self, device: str) -> None:
        """Say which provider each model really runs on; with VISIONSERVE_DEVICE=cuda, refuse any on CPU."""
        entries = [entry for task in self.tasks for entry in task.models.values() if entry.available]
        logger.info("VISIONSERVE_DEVICE=%s: %s", device,
                    ", ".join(f"{entry.name} on {entry.provider} ({entry.precision})" for entry in entries)
                    or "no model loaded")
        for entry in entries:
            metrics.model_provider().labels(model=entry.name, provider=entry.provider).set(1)
            metrics.model_info().labels(model=entry.name, version=str(entry.card.get("version")),
                                        sha256=str(entry.card.get("sha256")), provider=entry.provider).set(1)
        not_on_cuda = sessions_not_on_cuda(entries)
        if device == "cuda" and not_on_cuda:
            raise RuntimeError(f"VISIONSERVE_DEVICE=cuda, but these sessions run on CPU: {', '.join(not_on_cuda)}; "
                               + GPU_INSTALL_HINT)

    def openapi_document(self) -> dict:
        if self._openapi is None:
            defaults = {task.task: task.default_model_name() for task in self.tasks}
            self._openapi = build_openapi(self.config.limits, defaults, self.config.api_key_required)
        return self._openapi

    def model_names(self) -> list[str]:
        return sorted(name for task in self.tasks for name in task.models)

    def describe_models(self) -> dict:
        inference = self.config.inference
        return {
            "default": {task.task: task.default_model_name() for task in self.tasks},
            "models": [entry.describe() for task in self.tasks for entry in task.models.values()],
            "serving": {
                "device": inference.device,  # what was asked; each model's `provider` is what really runs
                "precision": inference.precision,  # likewise: each model's `precision` is the graph it runs
                "workers": inference.workers,
                "intra_op_threads": inference.intra_op_threads,
                "batching": inference.batching,
                "max_batch_size": inference.max_batch_size,
                # This worker's batch sizes so far: shows batching at work under load (/metrics sums every worker's
                # in visionserve_batch_size; worker_pid says which worker answered this).
                "worker_pid": os.getpid(),
                "batch_sizes_seen": {name: sizes for task in self.tasks
                                     for name, sizes in task.batch_sizes_seen().items()},
            },
        }


# On the service, not the mounted app: the key guards BentoML's own routes (/, /docs.json, /metrics) too,
# and paths our mounted app never sees still get our error shape. The first added is the outermost.
# RequestId first: X-Request-ID on every answer, the 401/404/413/503 of the middlewares inside it included.
VisionService.add_asgi_middleware(RequestId)
VisionService.add_asgi_middleware(ApiKeyAuth)
VisionService.add_asgi_middleware(ControlCharactersInPath)
