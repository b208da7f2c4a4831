"""BentoML's OpenTelemetry middleware on against off (VISIONSERVE_TRACING): two CNN servers side by side, one
sequential client alternating single-PNG /classify requests between them, medians in one run.

    .venv/bin/python -m benchmarks.tracing_ab --requests 1200     (the figure in docs/SERVING.md)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from formats.idx import FASHION_MNIST_DIR, find_idx, read_idx
from loadtests.payloads import png
from loadtests.server import models_folder_environment, running_server

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1200, help="per server; the first 100 are warm-up")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tracing-ab-"))
    shutil.copytree(REPO / "models" / "cnn", work / "models" / "cnn")
    image = read_idx(find_idx(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte"))[0]
    files = {"images": ("image.png", png(image), "image/png")}
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    with contextlib.ExitStack() as servers:
        urls = {}
        for mode in seconds:
            env = models_folder_environment(work / "models", {"VISIONSERVE_TRACING": mode, "VISIONSERVE_WORKERS": "1"})
            urls[mode] = servers.enter_context(running_server(env, work / f"{mode}.log")).url
        with httpx.Client() as client:
            for _ in range(args.requests):
                for mode, url in urls.items():
                    started = time.perf_counter()
                    client.post(url + "/classify", files=files).raise_for_status()
                    seconds[mode].append(time.perf_counter() - started)
    medians = {mode: statistics.median(values[100:]) * 1e3 for mode, values in seconds.items()}
    print(f"median ms, {args.requests - 100} requests each: on {medians['on']:.2f}, off {medians['off']:.2f}, "
          f"off/on {medians['off'] / medians['on']:.2f}")


if __name__ == "__main__":
    main()
