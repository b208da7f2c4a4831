"""Per-model Prometheus metrics on /metrics (docs/SERVING.md, "Metrics").

Made with `bentoml.metrics` (prometheus_client, imported only once BentoML has set PROMETHEUS_MULTIPROC_DIR in the
worker): counters and histograms are written to the worker's multiprocess files and summed over every live worker
by BentoML's /metrics, so the figures are the server's, whichever worker answers the scrape. Gauges say how
they combine (`multiprocess_mode`). Every metric is made on first use, in the worker, never at import.
"""

from __future__ import annotations

import functools
import time

import bentoml

# Seconds: from half a millisecond (one small batch of the MLP) to the 60 s request timeout.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Images per model call: powers of two up to the largest batch the configuration allows (VISIONSERVE_MAX_BATCH_SIZE
# is 256 by default; a request's own images, up to VISIONSERVE_MAX_IMAGES, may make a bigger one).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@functools.cache
def metric(kind: str, name: str, documentation: str, labelnames: tuple[str, ...] = ("model",), **options):
    """The bentoml.metrics object of that name: made on its first use, in the worker (never at import), then the
    same object on every call."""
    return getattr(bentoml.metrics, kind)(name=name, labelnames=list(labelnames), documentation=documentation,
                                          **options)


@functools.lru_cache(maxsize=4096)
def child(metric_of, *label_values: str):
    """metric_of()'s child for these label values (in its labelnames' order), looked up once: prometheus_client's
    labels() validates and locks on every call, and a request made three such calls. Label values are bounded
    (route templates, served model names, status codes, error codes), and the cache is too."""
    return metric_of().labels(*label_values)


def requests_total():
    return metric("Counter", "visionserve_requests", "HTTP requests answered, by route template, model and status code",
                  ("route", "model", "status"))


def request_errors_total():
    return metric("Counter", "visionserve_request_errors", "Requests answered with a 4xx/5xx status, by the error "
                  "body's code", ("route", "model", "status", "code"))


def request_seconds():
    return metric("Histogram", "visionserve_request_duration_seconds", "Wall time from the request's arrival to the "
                  "end of its answer", ("route", "model"), buckets=SECONDS_BUCKETS)


def inference_seconds():
    return metric("Histogram", "visionserve_inference_seconds", "Seconds of one onnxruntime call (one batch) of a "
                  "model", buckets=SECONDS_BUCKETS)


def batch_size():
    return metric("Histogram", "visionserve_batch_size", "Images (or samples) per onnxruntime call of a model",
                  buckets=BATCH_BUCKETS)


def queue_wait_seconds():
    return metric("Histogram", "visionserve_queue_wait_seconds", "Seconds a request waited from joining a model's "
                  "queue to the start of the batch that ran it", buckets=SECONDS_BUCKETS)


def queued_images():
    return metric("Gauge", "visionserve_queued_images", "Images waiting for a model's next batch, summed over live "
                  "workers", multiprocess_mode="livesum")


def images_total():
    return metric("Counter", "visionserve_images", "Images (or samples) a model has processed")


def model_info():
    return metric("Gauge", "visionserve_model_info", "1 per served model: its card's version and sha256, and the "
                  "execution provider its session really runs on", ("model", "version", "sha256", "provider"),
                  multiprocess_mode="livemax")


def ood_scored_total():
    return metric("Counter", "visionserve_ood_scored_images", "/classify images given an out-of-distribution answer")


def ood_flagged_total():
    return metric("Counter", "visionserve_ood_flagged_images", "/classify images flagged out of distribution (score > "
                  "the card's threshold)")


def model_provider():
    return metric("Gauge", "visionserve_model_provider", "1 for the execution provider each served model's session "
                  "runs on", ("model", "provider"), multiprocess_mode="livemax")


def count_ood(model: str, answers: list[dict | None]) -> None:
    scored = [answer for answer in answers if answer is not None]
    if scored:
        child(ood_scored_total, model).inc(len(scored))
        flagged = sum(bool(answer.get("flag")) for answer in scored)
        if flagged:
            child(ood_flagged_total, model).inc(flagged)


class ModelMetrics:
    """What a model's batcher reports, bound to the model's label once (labels() costs a dict lookup per call)."""

    def __init__(self, model: str) -> None:
        self._inference = inference_seconds().labels(model=model)
        self._batch = batch_size().labels(model=model)
        self._wait = queue_wait_seconds().labels(model=model)
        self._queued = queued_images().labels(model=model)
        self._images = images_total().labels(model=model)
        self._queued.set(0)

    def queued(self, images: int) -> None:
        self._queued.set(images)

    def batch_started(self, images: int, enqueued_at: list[float]) -> float:
        """A batch of `images` starts now; `enqueued_at` holds each of its requests' time.perf_counter() on arrival."""
        now = time.perf_counter()
        for arrived in enqueued_at:
            self._wait.observe(now - arrived)
        self._batch.observe(images)
        self._images.inc(images)
        return now

    def batch_finished(self, started: float) -> None:
        self._inference.observe(time.perf_counter() - started)
