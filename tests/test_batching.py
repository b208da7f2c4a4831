"""service/batching.py's AdaptiveBatcher on the released CNN in a real onnxruntime session, in process: where a
batch runs (the model's thread, or the event loop when it is predicted short: VISIONSERVE_INLINE_BATCH_US), that
concurrent requests still share batches and get their own rows, and that a failing call reaches every request of
its batch without stopping the batcher."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.batching import AdaptiveBatcher

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(REPO / "models" / "cnn" / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def images(fashion_test_images) -> np.ndarray:
    return np.ascontiguousarray(fashion_test_images[0])  # uint8 [512, 1, 28, 28]


class Calls:
    """The batcher's run_batch: the real session, noting each call's thread and batch size."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.threads: list[int] = []
        self.sizes: list[int] = []

    def __call__(self, pixels: np.ndarray, names) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        self.sizes.append(len(pixels))
        return dict(zip(names, self.session.run(list(names), {"pixels": pixels})))


def batcher(calls: Calls, inline_below_seconds: float) -> AdaptiveBatcher:
    return AdaptiveBatcher(calls, max_batch_size=64, max_queued_images=1024, retry_after_seconds=1, name="cnn",
                           served_output="probabilities", inline_below_seconds=inline_below_seconds)


def test_short_batches_run_on_the_event_loop_once_measured(session, images):
    calls = Calls(session)
    pixels = np.ascontiguousarray(images[:1])

    async def run() -> int:
        runner = batcher(calls, inline_below_seconds=1.0)
        for _ in range(3):
            await runner.infer(pixels)
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    # The first call has no measured time yet: the model's thread; then a CNN image is far below 1 s: the loop.
    assert calls.threads[0] != loop_thread and calls.threads[1:] == [loop_thread, loop_thread]


def test_with_no_inline_bound_every_batch_runs_on_the_models_thread(session, images):
    calls = Calls(session)
    pixels = np.ascontiguousarray(images[:1])

    async def run() -> int:
        runner = batcher(calls, inline_below_seconds=0.0)
        for _ in range(3):
            await runner.infer(pixels)
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert loop_thread not in calls.threads and len(set(calls.threads)) == 1


@pytest.mark.parametrize("inline_below_seconds", [0.0, 1.0])
def test_concurrent_requests_share_batches_and_get_their_own_rows(session, images, inline_below_seconds):
    calls = Calls(session)
    images = np.ascontiguousarray(images[:40])
    expected = session.run(["probabilities"], {"pixels": images})[0]

    async def run() -> list[np.ndarray]:
        runner = batcher(calls, inline_below_seconds)
        await runner.infer(images[:1])  # measured once, so that the batches below may run inline
        return await asyncio.gather(*(runner.infer(images[i:i + 1]) for i in range(len(images))))

    answers = asyncio.run(run())
    np.testing.assert_allclose(np.concatenate(answers), expected, atol=1e-5)
    assert max(calls.sizes[1:]) > 1  # the 40 requests did not all run alone


def test_a_failing_call_fails_its_requests_and_the_batcher_goes_on(session, images):
    calls = Calls(session)
    good = np.ascontiguousarray(images[:1])
    wrong_size = np.zeros((1, 1, 27, 27), np.uint8)  # onnxruntime refuses the shape

    async def run():
        runner = batcher(calls, inline_below_seconds=1.0)
        await runner.infer(good)
        with pytest.raises(Exception, match="(?i)dimension|shape"):
            await runner.infer(wrong_size)
        return await runner.infer(good)

    answer = asyncio.run(run())
    assert answer.shape == (1, 10)
