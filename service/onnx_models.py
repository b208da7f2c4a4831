"""The models to serve: verified against their cards and run with onnxruntime.

The ONNX file plus its card.json is the whole contract with training/export (docs/ARCHITECTURE.md): nothing
here imports torch or training code.
"""

from __future__ import annotations

import hashlib
import logging
import time
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import onnxruntime as ort

from .images import InputSpec

if TYPE_CHECKING:
    from .batching import AdaptiveBatcher, DirectRunner

logger = logging.getLogger("bentoml.visionserve")


@dataclass(frozen=True)
class ModelToServe:
    """One model the deployment names (service/model_store.py resolves them): where its bytes are, the card it is
    served under (whose sha256 the bytes must have), and where that choice came from."""

    folder: Path  # holds model.onnx
    card: dict | None  # None: the folder's card.json could not be read
    tag: str | None  # its BentoML store tag, <name>:<sha256 prefix>; None for a plain folder
    source: str  # "checkout card", "tag list", "bento" or "folder": shown on GET /models
    named_by: Path | str  # the card file, bento.yaml or variable that named it: logged at start-up


@dataclass
class ModelEntry:
    """One model to serve: its card, and either a ready session or the reason it is unavailable."""

    name: str
    folder: Path
    card: dict
    tag: str | None = None
    source: str = "folder"
    named_by: Path | str = ""
    session: ort.InferenceSession | None = None
    provider: str | None = None
    precision: str = "fp32"  # which graph runs: model.onnx, or the card's FP16 variant (graph_to_serve)
    unavailable_reason: str | None = None
    output_names: list[str] = field(default_factory=list)
    output_name: str = "probabilities"  # what `run` returns: probabilities [N, K] or a mask [N, H, W]
    # Its runner once loaded (service/task_models.py): `await entry.runner.infer(inputs, outputs)` runs it through
    # the adaptive batcher (or direct calls when batching is off), which calls `run`.
    runner: AdaptiveBatcher | DirectRunner | None = None
    # Outputs computed from a graph output inside each model call (so once per batch, wherever the batch runs):
    # {name: (graph output, function)}. /classify's OOD score is one (service/ood.py).
    derived_outputs: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = field(default_factory=dict)

    @functools.cached_property
    def input_spec(self) -> InputSpec:
        """How an image is fitted to this model, from its card: derived once, read by every request."""
        return InputSpec.from_card(self.card)

    @property
    def available(self) -> bool:
        return self.session is not None

    @property
    def headline_metric(self) -> float:
        """What picks the default model of a task: test accuracy, mIoU for a segmenter, class consistency
        for a generator."""
        metrics = self.card.get("metrics", {})
        return float(metrics.get("accuracy") or metrics.get("miou") or metrics.get("class_consistency") or 0.0)

    def run(self, inputs: np.ndarray | dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        """uint8 pixels [N, C, H, W] (or named inputs: a generator's z and label) -> the named graph outputs (or
        derived outputs). Thread-safe: onnxruntime allows concurrent run()."""
        assert self.session is not None
        feeds = inputs if isinstance(inputs, dict) else {"pixels": inputs}
        names = list(output_names)
        if not any(name in self.derived_outputs for name in names):
            return dict(zip(names, self.session.run(names, feeds)))
        # A derived output's graph output is run once; its function then takes the whole batch at once.
        graph_names = list(dict.fromkeys(self.derived_outputs.get(name, (name,))[0] for name in names))
        outputs = dict(zip(graph_names, self.session.run(graph_names, feeds)))
        for name in names:
            if name in self.derived_outputs:
                source, compute = self.derived_outputs[name]
                outputs[name] = compute(outputs[source])
        return {name: outputs[name] for name in names}

    def describe(self) -> dict:
        """The card as GET /models shows it, plus what the server made of it."""
        return {
            **self.card,
            # Which bytes these are and who chose them (docs/SERVING.md, "Which models are served").
            "tag": self.tag,
            "sha256": self.card.get("sha256"),
            "source": self.source,
            "status": "available" if self.available else "unavailable",
            "unavailable_reason": self.unavailable_reason,
            "provider": self.provider,
            "precision": self.precision,
        }


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def entries_of_task(models: list[ModelToServe], task: str) -> list[ModelEntry]:
    """The named models whose card is of the given task; a card that could not be read is listed unavailable."""
    entries = []
    for model in models:
        if model.card is None:
            logger.error("model %s refused: card.json unreadable (%s)", model.folder.name, model.named_by)
            entries.append(ModelEntry(model.folder.name, model.folder, {"name": model.folder.name}, model.tag,
                                      model.source, model.named_by, unavailable_reason="card.json unreadable"))
            continue
        if model.card.get("task") != task:
            continue
        entries.append(ModelEntry(str(model.card.get("name") or model.folder.name), model.folder, model.card,
                                  model.tag, model.source, model.named_by))
    return entries


def cuda_driver_present() -> bool:
    # onnxruntime-gpu always lists the CUDA provider; only try it where an NVIDIA driver is loaded,
    # so CPU machines do not log a page of missing-library errors at every start.
    return Path("/proc/driver/nvidia/version").exists()


def preload_cuda_libraries() -> None:
    """Load pip-installed NVIDIA libraries (cuDNN, cuBLAS) before the first CUDA session."""
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # missing wheels only mean CUDA will not run; the check below says so
            logger.warning("onnxruntime.preload_dlls failed: %s", exc)


CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
FP16_SECTION = "fp16"  # the card's features section naming a model's FP16 graph (export/fp16.py)
GPU_INSTALL_HINT = ("install the CUDA 13 and cuDNN 9 wheels onnxruntime-gpu 1.31.1 declares in its [cuda,cudnn] "
                    "extras (`make serve GPU=1`, deploy/requirements-gpu.txt), or use the GPU image")


def requested_providers(device: str) -> list[str]:
    """The providers sessions are created with. `cuda` asks for CUDA whatever this machine has: whether it really
    runs is read back from each session (cuda_missing, sessions_not_on_cuda), never from this list."""
    wants_cuda = device == "cuda" or (device == "auto" and cuda_driver_present()
                                      and CUDA in ort.get_available_providers())
    return [CUDA, CPU] if wants_cuda else [CPU]


def cuda_missing(probe_model: Path | None) -> str | None:
    """Why the CUDA execution provider cannot run here, or None when a session on probe_model really runs on it.
    Cheap on a CPU machine (no session is made without a driver); on a GPU, one small session."""
    if not cuda_driver_present():
        return "no NVIDIA driver on this machine (/proc/driver/nvidia/version is missing): no GPU, or no driver loaded"
    available = ort.get_available_providers()
    if CUDA not in available:
        return (f"onnxruntime {ort.__version__} has no CUDA execution provider (it has {', '.join(available)}): "
                "install onnxruntime-gpu==1.31.1")
    preload_cuda_libraries()
    if probe_model is not None:
        # onnxruntime-gpu lists CUDA even when its libraries are missing and then runs on CPU: ask the session.
        session = create_session(probe_model, 1, [CUDA, CPU])
        if session.get_providers()[0] != CUDA:
            return f"the CUDA execution provider did not start on {probe_model} (CUDA or cuDNN libraries missing): " \
                   + GPU_INSTALL_HINT
    return None


def sessions_not_on_cuda(entries: list[ModelEntry]) -> list[str]:
    """`name (provider)` of each loaded model whose session does not run on CUDA."""
    return [f"{entry.name} ({entry.provider})" for entry in entries if entry.available and entry.provider != CUDA]


def create_session(model_path: Path, intra_op_threads: int, providers: list[str],
                   allow_spinning: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1  # the graphs are chains; parallel branches would only oversubscribe
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not allow_spinning:
        # Idle intra-op threads otherwise busy-wait after each call, taking the CPU the event loop
        # needs to parse the next requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), options, providers=providers)


def warmup_feeds(card: dict, batch_size: int) -> dict[str, np.ndarray]:
    """Inputs of the card's shapes. A generator gets the last class, so a card with more labels than
    the graph has classes fails here, at start-up, not on a client's request."""
    if card["task"] == "generation":
        z_spec = next(spec for spec in card["inputs"] if spec["name"] == "z")
        return {"z": np.zeros((batch_size, z_spec["shape"][1]), np.float32),
                "label": np.full(batch_size, len(card["labels"]) - 1, np.int64)}
    spec = card["input"]
    # A segmenter's height and width are dynamic: it warms up at the size it was tested at.
    height, width = ((spec["height"], spec["width"]) if isinstance(spec["height"], int)
                     else (spec["trained_height"], spec["trained_width"]))
    return {"pixels": np.zeros((batch_size, spec["channels"], height, width), np.uint8)}


def check_graph_against_card(session: ort.InferenceSession, card: dict) -> None:
    """The graph's class count (or a generator's image shape) must be what the card says."""
    if card["task"] == "generation":
        (pixels,) = session.run(["pixels"], warmup_feeds(card, 1))
        expected = list(card["outputs"][0]["shape"][1:])
        if list(pixels.shape[1:]) != expected or pixels.dtype != np.uint8:
            raise ValueError(f"card says uint8 images of {expected}, the graph gives {pixels.dtype} {list(pixels.shape[1:])}")
        return
    if card["task"] == "reconstruction":  # an autoencoder answers an image of its input's shape and one error each
        feeds = warmup_feeds(card, 2)
        reconstruction, error = session.run(["reconstruction", "error"], feeds)
        if reconstruction.shape != feeds["pixels"].shape or reconstruction.dtype != np.uint8 or error.shape != (2,):
            raise ValueError(f"card says uint8 reconstructions of {list(feeds['pixels'].shape[1:])} and one error per "
                             f"image, the graph gives {reconstruction.dtype} {list(reconstruction.shape[1:])}, "
                             f"errors {list(error.shape)}")
        return
    (probabilities,) = session.run(["probabilities"], warmup_feeds(card, 1))
    if len(card["labels"]) != probabilities.shape[1]:
        raise ValueError(f"card has {len(card['labels'])} labels, the graph {probabilities.shape[1]} classes")


# A warm-up takes the first call's allocations off the first request; a batch whose compute costs more than this
# would only delay start-up (the ResNet ensemble: ~17 s at 256 images on 2 cores), its allocations being noise.
WARMUP_BUDGET_S = 1.0


def warm_up(session: ort.InferenceSession, entry: ModelEntry, batch_sizes: tuple[int, ...]) -> None:
    """Run the served output at each batch size whose cost, estimated from the first (smallest) call, fits the
    budget; the smallest always runs."""
    seconds_per_item = None
    for batch_size in sorted(batch_sizes):
        if seconds_per_item is not None and seconds_per_item * batch_size > WARMUP_BUDGET_S:
            logger.info("model %s: warm-up at batch %d skipped (about %.1f s at %.0f ms per item)", entry.name,
                        batch_size, seconds_per_item * batch_size, seconds_per_item * 1e3)
            continue
        started = time.perf_counter()
        session.run([entry.output_name], warmup_feeds(entry.card, batch_size))
        if seconds_per_item is None:  # the first call also pays the allocations: an overestimate, on purpose
            seconds_per_item = (time.perf_counter() - started) / batch_size


def graph_to_serve(entry: ModelEntry, precision: str, providers: list[str]) -> tuple[Path, str, str | None]:
    """(file, "fp32" or "fp16", its sha256 by the card): the FP16 variant the card's features.fp16 section names
    (export/fp16.py) when VISIONSERVE_PRECISION asks for it (fp16), or leaves it to the device (auto: on CUDA,
    where half precision pays; onnxruntime's CPU provider runs it no faster). Else model.onnx."""
    variant = (entry.card.get("features") or {}).get(FP16_SECTION) or {}
    wanted = precision == "fp16" or (precision == "auto" and providers[0] == CUDA)
    if wanted and variant.get("file"):
        return entry.folder / variant["file"], "fp16", variant.get("sha256")
    return entry.folder / "model.onnx", "fp32", entry.card.get("sha256")


def load_verified_model(entry: ModelEntry, intra_op_threads: int, providers: list[str],
                        warmup_batch_sizes: tuple[int, ...], allow_spinning: bool = False,
                        precision: str = "auto") -> None:
    """Check the checksum against the card, create the session, warm it up; or mark the entry unavailable."""
    model_path, entry.precision, expected = graph_to_serve(entry, precision, providers)
    if not model_path.is_file():
        entry.unavailable_reason = f"{model_path.name} missing"
        logger.error("model %s refused: %s has no %s", entry.name, entry.folder, model_path.name)
        return
    actual = sha256_of_file(model_path)
    if actual != expected:
        entry.unavailable_reason = f"sha256 mismatch: card says {expected}, file is {actual}"
        logger.error("model %s refused: %s sha256 %s does not match card.json sha256 %s",
                     entry.name, model_path, actual, expected)
        return
    try:
        session = create_session(model_path, intra_op_threads, providers, allow_spinning)
        warm_up(session, entry, warmup_batch_sizes)
        check_graph_against_card(session, entry.card)
    except Exception as exc:  # a broken graph or card must not take the other models down
        # GET /models shows the reason to clients: onnxruntime's messages name the file, so the folder is
        # left out there (the log keeps the whole message).
        entry.unavailable_reason = "could not load it: " + str(exc).replace(str(entry.folder), entry.name)
        logger.error("model %s refused: %s", entry.name, exc)
        return
    entry.session = session
    # onnxruntime-gpu silently falls back to CPU when CUDA libraries are missing: report what runs.
    entry.provider = session.get_providers()[0]
    entry.output_names = [output.name for output in session.get_outputs()]
    logger.info("model %s %s loaded from %s: sha256 verified (%s), tag %s, from %s %s; provider %s (asked %s), "
                "%s graph, %d intra-op threads", entry.name, entry.card.get("version"), model_path, expected,
                entry.tag or "none (folder)", entry.source, entry.named_by, entry.provider, providers[0],
                entry.precision, intra_op_threads)
