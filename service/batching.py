"""Adaptive batching of concurrent requests into one model call.

Written here rather than using BentoML's batchable API because that dispatcher is only reachable
through BentoML's typed-API layer, which costs more than these models (docs/ARCHITECTURE.md, front-end
cost), and because it sheds queued requests with 503 whenever its latency estimate exceeds max_latency_ms.

The policy is "batch what is waiting": while one batch runs on the model, new requests queue; the
next call takes everything queued, up to max_batch_size images. Under light load a request runs
alone at once (no timer adds latency); under heavy load batches grow by themselves. The only
shedding is an explicit bound on queued images, answered with 503 and Retry-After.

A batch whose predicted model time is below `inline_below_seconds` runs on the event loop itself: for a small
model that is shorter than the two thread hand-offs it saves (to the model's thread and back). The loop reads no
new request meanwhile, so whatever arrives waits in the socket and joins the next batch, as it would have joined
the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from .errors import ApiError


@dataclass
class _Pending:
    pixels: np.ndarray
    future: asyncio.Future
    outputs: tuple[str, ...] | None  # the graph outputs this request asked for; None: the served one
    enqueued_at: float = 0.0  # time.perf_counter() when it joined the queue


class BatchObserver(Protocol):
    """What a runner reports per model (service/metrics.py's ModelMetrics, on /metrics)."""

    def queued(self, images: int) -> None: ...

    def batch_started(self, images: int, enqueued_at: list[float]) -> float: ...

    def batch_finished(self, started: float) -> None: ...


# run_batch(pixels, output_names) -> {name: array}: one model call for the union of the batch's outputs.
RunOutputs = Callable[[np.ndarray, Sequence[str]], dict[str, np.ndarray]]


class AdaptiveBatcher:
    """Coalesces concurrent `infer` calls for one model into batched calls of `run_batch` on one thread.

    Requests may ask for different graph outputs (probabilities for /classify, an embedding for /embed or a V2
    request): a batch runs the union of what its requests asked for, in one session call, and each request gets
    its own rows of the outputs it named.
    """

    def __init__(self, run_batch: RunOutputs, max_batch_size: int, max_queued_images: int,
                 retry_after_seconds: int, name: str, served_output: str,
                 observer: BatchObserver | None = None, inline_below_seconds: float = 0.0) -> None:
        self._run_batch = run_batch
        self._inline_below_seconds = inline_below_seconds
        # Seconds per image of this model's recent calls here (a moving average; None before the first call),
        # which predicts a batch's time. Measured around the executor hop too, so it errs towards the thread.
        self._seconds_per_image: float | None = None
        self._observer = observer
        self._served_output = served_output
        self._max_batch_size = max_batch_size
        self._max_queued_images = max_queued_images
        self._retry_after_seconds = retry_after_seconds
        # One thread per model: batches for a model run one after another, each using the
        # session's intra-op threads; the event loop stays free to parse the next requests.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._drain_task: asyncio.Task | None = None
        self.batch_sizes_seen: dict[int, int] = {}

    def reject_if_overloaded(self, images: int) -> None:
        if self._queued_images + images > self._max_queued_images:
            raise ApiError(503, "overloaded",
                           f"{self._queued_images} images are already waiting for this model; retry shortly",
                           headers={"Retry-After": str(self._retry_after_seconds)})

    async def infer(self, pixels: np.ndarray, outputs: Sequence[str] | None = None):
        """The served output's rows for `pixels` (an array), or with `outputs` a dict of those graph outputs."""
        self.reject_if_overloaded(len(pixels))
        loop = asyncio.get_running_loop()
        if self._drain_task is None or self._drain_task.done():
            # Started lazily: the service is constructed before the server's event loop serves requests.
            self._wakeup = asyncio.Event()
            self._drain_task = loop.create_task(self._drain_forever())
        pending = _Pending(pixels, loop.create_future(), tuple(outputs) if outputs is not None else None,
                           time.perf_counter())
        self._queue.append(pending)
        self._queued_images += len(pixels)
        if self._observer is not None:
            self._observer.queued(self._queued_images)
        self._wakeup.set()
        return await pending.future

    def _take_batch(self) -> list[_Pending]:
        """The oldest request and every queued one of the same image size, up to max_batch_size images;
        requests of other sizes (segmentation takes any size) keep their place for the next call."""
        first = self._queue.popleft()
        taken, images, kept = [first], len(first.pixels), deque()
        while self._queue:
            pending = self._queue.popleft()
            if (pending.pixels.shape[1:] == first.pixels.shape[1:]
                    and images + len(pending.pixels) <= self._max_batch_size):
                taken.append(pending)
                images += len(pending.pixels)
            else:
                kept.append(pending)
        self._queue = kept
        self._queued_images -= images
        if self._observer is not None:
            self._observer.queued(self._queued_images)
        return taken

    def runs_inline(self, images: int) -> bool:
        """Whether a batch of `images` is predicted to take less than the inline bound (on the event loop)."""
        return (self._seconds_per_image is not None
                and self._seconds_per_image * images < self._inline_below_seconds)

    def _note_seconds_per_image(self, seconds: float) -> None:
        previous = self._seconds_per_image
        self._seconds_per_image = seconds if previous is None else 0.9 * previous + 0.1 * seconds

    async def _drain_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = [p for p in self._take_batch() if not p.future.cancelled()]
                if not batch:
                    continue
                pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([p.pixels for p in batch])
                self.batch_sizes_seen[len(pixels)] = self.batch_sizes_seen.get(len(pixels), 0) + 1
                names = list(dict.fromkeys(name for p in batch for name in (p.outputs or (self._served_output,))))
                started = (self._observer.batch_started(len(pixels), [p.enqueued_at for p in batch])
                           if self._observer is not None else 0.0)
                try:
                    clock = time.perf_counter()
                    if self.runs_inline(len(pixels)):
                        outputs = self._run_batch(pixels, names)
                    else:
                        outputs = await loop.run_in_executor(self._executor, self._run_batch, pixels, names)
                    self._note_seconds_per_image((time.perf_counter() - clock) / len(pixels))
                    if self._observer is not None:
                        self._observer.batch_finished(started)
                except Exception as exc:  # delivered to every waiting request, never kills the loop
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                start = 0
                for p in batch:
                    end = start + len(p.pixels)
                    if not p.future.done():  # the client may have gone away
                        p.future.set_result(outputs[self._served_output][start:end] if p.outputs is None
                                            else {name: outputs[name][start:end] for name in p.outputs})
                    start = end


class DirectRunner:
    """The unbatched alternative (VISIONSERVE_BATCHING=off): each request is its own model call,
    run concurrently on a thread pool. Kept so batched vs unbatched can be measured on one build."""

    def __init__(self, run_batch: Callable, threads: int, name: str, served_output: str,
                 max_queued_items: int | None = None, retry_after_seconds: int = 1, size: Callable = len,
                 observer: BatchObserver | None = None) -> None:
        self._run_batch = run_batch  # (inputs, output_names) -> {name: array}
        self._observer = observer
        self._served_output = served_output
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"direct-{name}")
        self._max_queued_items = max_queued_items
        self._retry_after_seconds = retry_after_seconds
        self._size = size
        self._in_flight = 0
        self._name = name
        self.batch_sizes_seen: dict[int, int] = {}

    async def infer(self, inputs, outputs: Sequence[str] | None = None):
        """Run one request's inputs (an array, or a dict of named arrays) as one model call: the served output,
        or with `outputs` a dict of those graph outputs."""
        size = self._size(inputs)
        if self._max_queued_items is not None and self._in_flight + size > self._max_queued_items:
            raise ApiError(503, "overloaded", f"model {self._name} has {self._in_flight} items in flight; "
                           f"retry after {self._retry_after_seconds} s", None,
                           {"Retry-After": str(self._retry_after_seconds)})
        self._in_flight += size
        self.batch_sizes_seen[size] = self.batch_sizes_seen.get(size, 0) + 1
        if self._observer is not None:
            self._observer.queued(self._in_flight)
        try:
            names = list(outputs) if outputs is not None else [self._served_output]
            result = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed_run, inputs, names,
                                                                      time.perf_counter(), size)
            return result[self._served_output] if outputs is None else result
        finally:
            self._in_flight -= size
            if self._observer is not None:
                self._observer.queued(self._in_flight)

    def _timed_run(self, inputs, names: list[str], enqueued_at: float, size: int) -> dict:
        # The wait is measured on the pool's thread: the time this call waited for a free thread.
        if self._observer is None:
            return self._run_batch(inputs, names)
        started = self._observer.batch_started(size, [enqueued_at])
        result = self._run_batch(inputs, names)
        self._observer.batch_finished(started)
        return result
