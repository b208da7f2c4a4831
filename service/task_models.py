"""The models of one task (classification, segmentation, ...): loading, the default choice, batching runners.

Every task service holds one `TaskModels`; the HTTP routes ask it for a model by name and run inputs
through that model's runner (the adaptive batcher, or direct calls when batching is off).
"""

from __future__ import annotations

import logging
from typing import Sequence

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
            load_verified_model(entry, inference.intra_op_threads, providers, warmup_sizes, inference.allow_spinning)
        self.models: dict[str, ModelEntry] = {entry.name: entry for entry in entries}
        if self.configured_default and self.configured_default not in self.models:
            logger.warning("VISIONSERVE_DEFAULT_MODELS names %s for %s, which this server does not have; the default "
                           "is the best available by its card", self.configured_default, task)
        if task == "generation":
            # Never merged across requests: a request's n samples are already one batch, and a sample's
            # bytes must not depend on which other requests shared its model call (on CUDA the kernels
            # chosen vary with the batch size). Bounded by queued samples like the batchers.
            self.runners = {
                entry.name: DirectRunner(entry.run, max(2, inference.intra_op_threads), entry.name, entry.output_name,
                                         inference.generate_max_queued_samples, inference.retry_after_seconds,
                                         size=lambda feeds: len(feeds["z"]), observer=ModelMetrics(entry.name))
                for entry in entries if entry.available
            }
            return
        max_batch, max_queued = ((inference.max_batch_size, inference.max_queued_images)
                                 if task in ("classification", "reconstruction")
                                 else (inference.segment_max_batch_size, inference.segment_max_queued_images))
        self.runners = {
            entry.name: (
                AdaptiveBatcher(entry.run, max_batch, max_queued, inference.retry_after_seconds, entry.name,
                                entry.output_name, ModelMetrics(entry.name))
                if inference.batching else DirectRunner(entry.run, max(2, inference.intra_op_threads), entry.name,
                                                        entry.output_name, observer=ModelMetrics(entry.name))
            )
            for entry in entries if entry.available
        }

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

    async def infer(self, entry: ModelEntry, inputs, outputs: Sequence[str] | None = None):
        """The served output for `inputs` (pixels, or a generator's named inputs), or with `outputs` a dict of
        those graph outputs (e.g. ["probabilities", "embedding"]), through the model's batcher."""
        if outputs is not None:
            unknown = [name for name in outputs if name not in entry.output_names]
            if unknown:
                raise ApiError(400, "unknown_output", f"model {entry.name!r} has no output {unknown[0]!r}; "
                               f"it has {entry.output_names}", "outputs")
        note_model(entry.name)
        return await self.runners[entry.name].infer(inputs, outputs)

    def batch_sizes_seen(self) -> dict[str, dict[int, int]]:
        return {name: dict(sorted(runner.batch_sizes_seen.items())) for name, runner in self.runners.items()}
