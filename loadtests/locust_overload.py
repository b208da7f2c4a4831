"""Locust user for the hardening runs (loadtests/overload.py, soak.py, faults.py): one Fashion-MNIST PNG per
POST /classify, every answer recorded with its time, status, latency and Retry-After header.

Each process writes its own `OVERLOAD_RECORD_PREFIX.<label>.<pid>.csv` when it quits, so that a run with
several Locust processes (`--processes N`) is still one timeline. Locust's own statistics cannot say which
503s carried a Retry-After or give p99 per second for accepted requests only; the CSV can.

Run from the repository root (the locustfile imports loadtests.payloads):

  BENCH_IMAGES_NPY=/tmp/images.npy OVERLOAD_RECORD_PREFIX=/tmp/o/requests OVERLOAD_LABEL=burst \
      .venv/bin/locust -f loadtests/locust_overload.py --headless -u 200 -r 200 -t 60s -H http://127.0.0.1:3000

OVERLOAD_WAIT_S sets a constant pause between one user's requests (default 0: a saturating closed loop);
OVERLOAD_USER_RATE paces each user at that many requests per second instead.
"""

from __future__ import annotations

import csv
import itertools
import os
import time

from locust import FastHttpUser, constant, constant_throughput, events, task

from loadtests.payloads import MULTIPART_CONTENT_TYPE, single_png_bodies

BODIES = itertools.cycle(single_png_bodies(os.environ["BENCH_IMAGES_NPY"]))
LABEL = os.environ.get("OVERLOAD_LABEL", "load")
RECORDS: list[tuple[float, int, float, str]] = []  # (end time, status, ms, Retry-After or "")


class OverloadClient(FastHttpUser):
    # OVERLOAD_USER_RATE (requests per second per user) paces each user: an offered rate independent of latency.
    wait_time = (constant_throughput(float(os.environ["OVERLOAD_USER_RATE"])) if os.environ.get("OVERLOAD_USER_RATE")
                 else constant(float(os.environ.get("OVERLOAD_WAIT_S", "0"))))

    @task
    def classify_one_png(self) -> None:
        started = time.perf_counter()
        with self.client.post("/classify", data=next(BODIES), name="/classify 1 png", catch_response=True,
                              headers={"Content-Type": MULTIPART_CONTENT_TYPE}) as response:
            elapsed_ms = (time.perf_counter() - started) * 1000
            status = response.status_code or 0  # 0: no answer (connection refused or reset)
            RECORDS.append((time.time(), status, elapsed_ms, response.headers.get("Retry-After") or ""
                            if response.headers else ""))
            if status in (429, 503) and response.headers and response.headers.get("Retry-After"):
                response.success()  # shedding as designed; the driver counts it apart from failures


@events.quitting.add_listener
def write_records(environment, **_kwargs) -> None:
    prefix = os.environ.get("OVERLOAD_RECORD_PREFIX")
    if not prefix or not RECORDS:
        return
    with open(f"{prefix}.{LABEL}.{os.getpid()}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", "status", "ms", "retry_after"])
        writer.writerows((f"{t:.4f}", s, f"{ms:.2f}", r) for t, s, ms, r in RECORDS)
