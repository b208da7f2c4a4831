"""Serving configuration, read from environment variables so that `bentoml serve`, `make serve`,
a container and the tests can all change it without code edits.

Every variable is optional; the defaults are safe for a public endpoint on a small machine.
See docs/SERVING.md for the table of variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

ENV_PREFIX = "VISIONSERVE_"


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    value = int(raw)
    if value < minimum:
        raise ValueError(f"{ENV_PREFIX}{name}={raw}: must be >= {minimum}")
    return value


def cgroup_cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs a cgroup quota allows (a container's `--cpus`, a pod's CPU limit), or None when there is none:
    cgroup v2 `cpu.max` ("200000 100000" is 2 CPUs, "max 100000" no limit), else v1 `cpu.cfs_quota_us`."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may really use: its affinity (taskset, cpusets; os.cpu_count() ignores them), capped
    by a cgroup CPU quota rounded down (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root)
    return max(1, min(cores, int(limit))) if limit is not None else cores


def workers_from_environment(environ: Mapping[str, str] = os.environ) -> int:
    """BentoML fixes the worker count when the service class is declared, so this one value is read there.

    Default: one worker per usable core. Measured on 2 cores (32 closed-loop clients, single CNN PNGs): 1 worker
    664 req/s, p99 90 ms; 2 workers 1,155 req/s, p99 54 ms, when the front (HTTP, multipart, PNG decoding; single-
    threaded Python per worker) was the bottleneck. After issue 22's cuts 1,994 and 2,460 req/s in one run of make
    bench-serve, 2,030 and 2,031 in another an hour earlier (docs/SERVING.md): the second worker's gain is now
    within the run-to-run spread."""
    return _int(environ, "WORKERS", available_cores())


def access_log_from_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """BentoML's per-request access log, also fixed at class declaration. Off by default: at 32 clients
    on 2 cores it cost 10-15% of requests/s (benchmarks/results/serve.md)."""
    value = environ.get(ENV_PREFIX + "ACCESS_LOG", "off").lower()
    if value not in ("on", "off"):
        raise ValueError(f"{ENV_PREFIX}ACCESS_LOG={value}: choose on or off")
    return value == "on"


def tracing_from_environment(environ: Mapping[str, str] = os.environ) -> dict:
    """VISIONSERVE_TRACING (off or on), fixed at class declaration: BentoML's OpenTelemetry middleware runs on
    every request even with no exporter configured, and was the largest single cost of a one-image /classify in
    the profile (benchmarks/results/profile.md). Off: every URL is excluded from it, so it passes requests straight
    through (no spans, no trace ids in BentoML's log lines; X-Request-ID still names each request). On: BentoML's
    tracing as configured (exporter, sample rate: BentoML's documentation)."""
    value = environ.get(ENV_PREFIX + "TRACING", "off").lower()
    if value not in ("on", "off"):
        raise ValueError(f"{ENV_PREFIX}TRACING={value}: choose on or off")
    return {} if value == "on" else {"excluded_urls": [".*"]}


def api_key_from_environment(environ: Mapping[str, str] = os.environ) -> str | None:
    """VISIONSERVE_API_KEY: when set (and not empty), every route but the probes needs it (service/security.py)."""
    key = environ.get(ENV_PREFIX + "API_KEY", "").strip()
    return key or None


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16")


def device_from_environment(environ: Mapping[str, str] = os.environ) -> str:
    """VISIONSERVE_DEVICE (auto, cpu or cuda); VISIONSERVE_PROVIDER, its earlier name, is still read."""
    name, raw = next(((ENV_PREFIX + key, environ[ENV_PREFIX + key]) for key in ("DEVICE", "PROVIDER")
                      if environ.get(ENV_PREFIX + key)), (ENV_PREFIX + "DEVICE", "auto"))
    device = raw.strip().lower()
    if device not in DEVICES:
        raise ValueError(f"{name}={raw}: choose {', '.join(DEVICES)}")
    return device


def precision_from_environment(environ: Mapping[str, str] = os.environ) -> str:
    """VISIONSERVE_PRECISION: which graph of a model that has an FP16 variant (`make fp16`) is served. `auto`: the
    FP16 graph on CUDA, where it pays, and the FP32 graph on CPU; `fp16` or `fp32`: that graph on any device."""
    raw = environ.get(ENV_PREFIX + "PRECISION", "auto")
    if raw.strip().lower() not in PRECISIONS:
        raise ValueError(f"{ENV_PREFIX}PRECISION={raw}: choose {', '.join(PRECISIONS)}")
    return raw.strip().lower()


TASKS = ("classification", "segmentation", "generation")
DEFAULT_MODELS = "classification=cnn"


def parse_default_models(value: str) -> dict[str, str]:
    """VISIONSERVE_DEFAULT_MODELS: comma-separated task=model pairs, e.g. `classification=resnet`; empty: none."""
    chosen = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        task, sep, name = (text.strip() for text in item.partition("="))
        if not sep or not name or task not in TASKS:
            raise ValueError(f"{ENV_PREFIX}DEFAULT_MODELS={value!r}: expected task=model pairs with a task among "
                             f"{', '.join(TASKS)}")
        if task in chosen:
            raise ValueError(f"{ENV_PREFIX}DEFAULT_MODELS={value!r}: {task} is named twice")
        chosen[task] = name
    return chosen


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the server. Each one has a test in tests/test_service_limits.py."""

    max_body_bytes: int = 32 * 1024 * 1024  # 64 PNGs of a phone photo fit; a 1 GB upload does not
    max_images_per_request: int = 256  # the benchmark sends 64; beyond 256, split the request
    max_pixels_per_image: int = 40_000_000  # a 40 MP photo; also Pillow's decompression-bomb threshold
    max_form_field_bytes: int = 64 * 1024  # non-file multipart fields are short parameters
    # A segmenter runs on the whole image, not a 28x28 thumbnail: its cost grows with the pixels
    # (1024x1024 is 256 times the pixels of a 64x64 training scene), so its cap is lower.
    max_segment_pixels: int = 1024 * 1024
    # Samples one /generate call may ask for (n): 64 is an 8x8 grid, one model call of a few ms per sample.
    max_samples_per_request: int = 64

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "RequestLimits":
        defaults = cls()
        return cls(
            max_body_bytes=_int(environ, "MAX_BODY_BYTES", defaults.max_body_bytes),
            max_images_per_request=_int(environ, "MAX_IMAGES", defaults.max_images_per_request),
            max_pixels_per_image=_int(environ, "MAX_PIXELS", defaults.max_pixels_per_image),
            max_form_field_bytes=_int(environ, "MAX_FIELD_BYTES", defaults.max_form_field_bytes),
            max_segment_pixels=_int(environ, "MAX_SEGMENT_PIXELS", defaults.max_segment_pixels),
            max_samples_per_request=_int(environ, "MAX_SAMPLES", defaults.max_samples_per_request),
        )


@dataclass(frozen=True)
class InferenceConfig:
    """How model calls are run: threads, batching and back-pressure."""

    workers: int
    intra_op_threads: int
    # VISIONSERVE_DEVICE: "auto" (CUDA where it really runs, else CPU), "cpu", or "cuda" (CUDA on every session
    # or the server refuses to start: service/onnx_models.py, cuda_missing)
    device: str
    # VISIONSERVE_PRECISION: auto (FP16 variants on CUDA), fp32 or fp16 (precision_from_environment)
    precision: str
    batching: bool
    max_batch_size: int
    # Images waiting for a model before new requests get 503 + Retry-After. In a closed loop the
    # queue never exceeds the number of clients times their images, so only real overload sheds.
    max_queued_images: int
    retry_after_seconds: int
    # Requests in progress per worker before new ones get 503 at once, body unparsed (middleware.AdmissionLimit);
    # 0: no limit, the default. Measured with `make overload` on 2 shared cores: a limit of 128 served 225 req/s
    # with an accepted p99 of 1.9 s where no limit served 529 req/s at 1.5 s (the refusals cost CPU too).
    max_in_flight_requests: int
    # A segmenter's images are up to VISIONSERVE_MAX_SEGMENT_PIXELS each, not 28x28: a few per call and a
    # short queue keep its activations and the waiting pixels within memory (8 x 1 MP x 16 channels x 4 B
    # is 512 MiB for the first layer's output alone).
    segment_max_batch_size: int
    segment_max_queued_images: int
    # Generated samples in flight (queued or running) before new /generate requests get 503 + Retry-After.
    # 1024: 64 clients each waiting on a default request of 16 samples. At 512, 64 Locust users asking for
    # 16 samples had 36 of 1,251 requests shed (docs/PERFORMANCE.md) although p99 was within its objective.
    generate_max_queued_samples: int
    allow_spinning: bool  # onnxruntime's busy-waiting intra-op threads; off leaves CPU to the HTTP front
    # A batch predicted to take less than this many microseconds runs on the event loop, not the model's thread
    # (service/batching.py); 0: always on the thread.
    inline_batch_us: int
    tune_gc: bool  # gc.freeze() after start-up and a larger young generation: no long collection pauses
    # The model a request without `model` gets, per task; a task not named here (or whose named model is not
    # available) gets its available model with the best headline metric. Classification is pinned to the CNN:
    # the released ResNet is an ensemble whose per-image cost is 10-20x the CNN's, which would make the
    # default path of every client that much slower for 1.5 points of accuracy; ask for it by name.
    default_models: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "InferenceConfig":
        workers = workers_from_environment(environ)
        device = device_from_environment(environ)
        batching = environ.get(ENV_PREFIX + "BATCHING", "on").lower()
        if batching not in ("on", "off"):
            raise ValueError(f"{ENV_PREFIX}BATCHING={batching}: choose on or off")
        return cls(
            workers=workers,
            # One worker per core at most is useful; threads split the cores so workers do not
            # oversubscribe them (docs/ARCHITECTURE.md: each session uses every core by default).
            intra_op_threads=_int(environ, "THREADS", max(1, available_cores() // workers)),
            device=device,
            precision=precision_from_environment(environ),
            batching=batching == "on",
            max_batch_size=_int(environ, "MAX_BATCH_SIZE", 256),
            max_queued_images=_int(environ, "MAX_QUEUED_IMAGES", 2048),
            retry_after_seconds=_int(environ, "RETRY_AFTER", 1),
            max_in_flight_requests=_int(environ, "MAX_IN_FLIGHT", 0, minimum=0),
            segment_max_batch_size=_int(environ, "SEGMENT_MAX_BATCH_SIZE", 8),
            segment_max_queued_images=_int(environ, "SEGMENT_MAX_QUEUED_IMAGES", 64),
            generate_max_queued_samples=_int(environ, "GENERATE_MAX_QUEUED_SAMPLES", 1024),
            allow_spinning=environ.get(ENV_PREFIX + "ORT_SPINNING", "off").lower() == "on",
            inline_batch_us=_int(environ, "INLINE_BATCH_US", 1000, minimum=0),
            tune_gc=environ.get(ENV_PREFIX + "GC_TUNING", "on").lower() == "on",
            default_models=parse_default_models(environ.get(ENV_PREFIX + "DEFAULT_MODELS", DEFAULT_MODELS)),
        )


def parse_model_tags(value: str) -> tuple[str, ...]:
    """VISIONSERVE_MODELS: comma-separated store tags `<name>:<version>` (the version may be a prefix of the
    sha256 digits, as `bentoml models get` allows); never `latest`, which is whatever was imported last."""
    tags: list[str] = []
    for tag in filter(None, (part.strip() for part in value.split(","))):
        name, sep, version = tag.partition(":")
        if not sep or not name or not version or version == "latest":
            raise ValueError(f"{ENV_PREFIX}MODELS={value!r}: {tag!r} is not <name>:<version>; name each model by "
                             "its store tag (`python -m service.model_store list`), never by latest")
        if name in {other.partition(":")[0] for other in tags}:
            raise ValueError(f"{ENV_PREFIX}MODELS={value!r}: {name} is named twice")
        tags.append(tag)
    if not tags:
        raise ValueError(f"{ENV_PREFIX}MODELS is set but names no model: give store tags, e.g. cnn:95eb377a")
    return tuple(tags)


@dataclass(frozen=True)
class ModelSelection:
    """Which models a server serves: named by the deployment, never discovered in the store (docs/SERVING.md,
    "Which models are served"). At most one of the three is set; none: the checkout's models/*/card.json (or,
    inside a bento, the models the bento packed)."""

    models_dir: Path | None = None  # VISIONSERVE_MODELS_DIR: a folder's <name>/{model.onnx, card.json}, no store
    tags: tuple[str, ...] = ()  # VISIONSERVE_MODELS: BentoML store tags
    cards_dir: Path | None = None  # VISIONSERVE_CARDS_DIR: a folder of <name>/card.json whose tags the store holds

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "ModelSelection":
        given = {name: environ.get(ENV_PREFIX + name, "").strip() for name in ("MODELS_DIR", "MODELS", "CARDS_DIR")}
        named = [ENV_PREFIX + name for name, value in given.items() if value]
        if len(named) > 1:
            raise ValueError(f"{' and '.join(named)} are both set: name the models to serve one way only")
        return cls(
            models_dir=Path(given["MODELS_DIR"]) if given["MODELS_DIR"] else None,
            tags=parse_model_tags(given["MODELS"]) if given["MODELS"] else (),
            cards_dir=Path(given["CARDS_DIR"]) if given["CARDS_DIR"] else None,
        )


@dataclass(frozen=True)
class ServingConfig:
    models: ModelSelection
    limits: RequestLimits
    inference: InferenceConfig
    api_key_required: bool = False  # VISIONSERVE_API_KEY is set (the key itself stays in the middleware)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "ServingConfig":
        return cls(
            models=ModelSelection.from_environ(environ),
            limits=RequestLimits.from_environ(environ),
            inference=InferenceConfig.from_environ(environ),
            api_key_required=api_key_from_environment(environ) is not None,
        )
