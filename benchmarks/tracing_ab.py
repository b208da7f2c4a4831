"""BentoML's OpenTelemetry middleware on against off (VISIONSERVE_TRACING): two CNN servers side by side, one
sequential client alternating single-PNG /classify requests between them, medians in one run.

    .venv/bin/python benchmarks/tracing_ab.py --requests 1200     (the figure in docs/SERVING.md)
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_serve import start_server, stop_server  # noqa: E402
from formats.idx import FASHION_MNIST_DIR, find_idx, read_idx  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1200, help="per server; the first 100 are warm-up")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tracing-ab-"))
    shutil.copytree(REPO / "models" / "cnn", work / "models" / "cnn")
    servers = {mode: start_server({"VISIONSERVE_TRACING": mode, "VISIONSERVE_WORKERS": "1"}, str(work / "models"),
                                  work / f"{mode}.log") for mode in ("on", "off")}
    image = read_idx(find_idx(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte"))[0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    files = {"images": ("image.png", buffer.getvalue(), "image/png")}
    seconds: dict[str, list[float]] = {mode: [] for mode in servers}
    try:
        with httpx.Client() as client:
            for _ in range(args.requests):
                for mode, (_, url) in servers.items():
                    started = time.perf_counter()
                    client.post(url + "/classify", files=files).raise_for_status()
                    seconds[mode].append(time.perf_counter() - started)
    finally:
        for process, _ in servers.values():
            stop_server(process)
    medians = {mode: statistics.median(values[100:]) * 1e3 for mode, values in seconds.items()}
    print(f"median ms, {args.requests - 100} requests each: on {medians['on']:.2f}, off {medians['off']:.2f}, "
          f"off/on {medians['off'] / medians['on']:.2f}")


if __name__ == "__main__":
    main()
