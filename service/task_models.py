"""The models of one task (classification, segmentation, generation, reconstruction): loading, the default
choice, and each model's runner.

The one service (service/app.py) holds a `TaskModels` per task; a route asks it for a model by name
(`resolve_model`) and runs inputs through that model's runner (`ModelEntry.infer`: the adaptive batcher, or
direct calls when batching is off).
"""

from __future__ import annotations

import logging
from .batching import AdaptiveBatcher, DirectRunner
from .config import InferenceConfig
from .errors import ApiError
from .metrics import ModelMetrics
from .onnx_models import ModelEntry, ModelToServe, entries_of_task, load_verified_model
from .request_context import note_model

logger = logging.getLogger("bentoml.visionserve")

# What each task's graph is asked for on the hot path (the other outputs stay in the graph for other uses).
SERVED_OUTPUT = {"classification": "probabilities", "segmentation": "mask", "generation": "pixels",
                 "reconstruction": "reconstruction"}


class TaskModels:
    def __init__(self, task: str, models: list[ModelToServe], inference: InferenceConfig,
                 providers: list[str]) -> None:
        self.task = task
        self.configured_default = inference.default_models.get(task)
        entries = entries_of_task(models, task)
        if task in ("classification", "reconstruction"):  # small fixed-size images, batched alike
            warmup_sizes = (1, inference.max_batch_size) if inference.batching else (1, 64)
        elif task == "generation":
            warmup_sizes = (1, 16, 64)  # a request's n is its batch
        else:
            warmup_sizes = (1, 4)  # whole-image tasks: batches are small, images large
        for entry in entries:
            entry.output_name = SERVED_OUTPUT[task]
            load_verified_model(entry, inference.intra_op_threads, providers, warmup_sizes, inference.allow_spinning,
                                inference.precision)
        self.models: dict[str, ModelEntry] = {entry.name: entry for entry in entries}
        if self.configured_default and self.configured_default not in self.models:
            logger.warning("VISIONSERVE_DEFAULT_MODELS names %s for %s, which this server does not have; the default "
                           "is the best available by its card", self.configured_default, task)
        for entry in entries:
            if entry.available:
                entry.runner = runner_for(task, entry, inference)
        self.runners = {entry.name: entry.runner for entry in entries if entry.runner is not None}

    @property
    def available(self) -> list[str]:
        return sorted(self.runners)

    def default_model_name(self) -> str | None:
        """The model VISIONSERVE_DEFAULT_MODELS names for this task when it is available, else the available
        model with the best headline metric on its card (accuracy, mIoU, class consistency)."""
        configured = self.models.get(self.configured_default or "")
        if configured is not None and configured.available:
            return configured.name
        available = [entry for entry in self.models.values() if entry.available]
        return max(available, key=lambda entry: entry.headline_metric).name if available else None

    def unknown_model(self, name: str, field: str | None = "model") -> ApiError:
        return ApiError(404, "unknown_model", f"no {self.task} model named {name!r}; known: {sorted(self.models)}",
                        field)

    def resolve_model(self, name: str | None) -> ModelEntry:
        name = name or self.default_model_name()
        if name is None:
            raise ApiError(503, "model_unavailable",
                           f"no {self.task} model is available on this server; see GET /models", "model")
        entry = self.models.get(name)
        if entry is None:
            raise self.unknown_model(name)
        note_model(entry.name)  # the `model` label of this request's metrics (never a name a client made up)
        if not entry.available:
            raise ApiError(503, "model_unavailable", f"model {name!r} is unavailable: {entry.unavailable_reason}",
                           "model")
        return entry

    def batch_sizes_seen(self) -> dict[str, dict[int, int]]:
        return {name: dict(sorted(runner.batch_sizes_seen.items())) for name, runner in self.runners.items()}


def runner_for(task: str, entry: ModelEntry, inference: InferenceConfig) -> AdaptiveBatcher | DirectRunner:
    if task == "generation":
        # Never merged across requests: a request's n samples are already one batch, and a sample's
        # bytes must not depend on which other requests shared its model call (on CUDA the kernels
        # chosen vary with the batch size). Bounded by queued samples like the batchers.
        return DirectRunner(entry.run, max(2, inference.intra_op_threads), entry.name, entry.output_name,
                            inference.generate_max_queued_samples, inference.retry_after_seconds,
                            size=lambda feeds: len(feeds["z"]), observer=ModelMetrics(entry.name))
    if not inference.batching:
        return DirectRunner(entry.run, max(2, inference.intra_op_threads), entry.name, entry.output_name,
                            observer=ModelMetrics(entry.name))
    max_batch, max_queued = ((inference.max_batch_size, inference.max_queued_images)
                             if task in ("classification", "reconstruction")
                             else (inference.segment_max_batch_size, inference.segment_max_queued_images))
    return AdaptiveBatcher(entry.run, max_batch, max_queued, inference.retry_after_seconds, entry.name,
                           entry.output_name, ModelMetrics(entry.name),
                           inline_below_seconds=inference.inline_batch_us / 1e6)
