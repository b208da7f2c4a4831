"""Where a single-image POST /classify spends its time inside a running visionserve worker (issue 22, part 3).

Starts visionserve as shipped but with one worker (the CNN only), with a sitecustomize on PYTHONPATH that arms
cProfile in every interpreter of the server and starts/stops it on SIGUSR1/SIGUSR2, so that start-up, model
loading and warm-up stay out of the profile. One sequential client sends the same Fashion-MNIST test PNG
--requests times: first unprofiled (the wall time per request), then with the worker's event-loop thread profiled.
A batch predicted shorter than VISIONSERVE_INLINE_BATCH_US (a lone CNN image is) runs on the event loop, where
cProfile sees it; a longer one runs on the batcher's executor thread, which cProfile does not see. Either way the
model's raw time is also measured as onnxruntime batch-1 `session.run` in this process, in the same run.

Shares are of the profiled event-loop thread's CPU time (time.thread_time; epoll waits excluded), grouped by stage:
our named functions by cumulative time (multipart, decode, fit, OOD, answer + JSON), the rest by the file each
function lives in (BentoML, uvicorn and its HTTP parser, Starlette, asyncio); a C function (a socket send, a
queue put) goes to the stage of its caller. cProfile inflates pure-Python layers against C
code, so the unprofiled wall time is reported beside it. Writes benchmarks/results/profile.{md,json}.

    .venv/bin/python -m benchmarks.profile_classify --requests 3000
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import write_results

REPO = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = '''
import os, signal
_out = os.environ.get("VISIONSERVE_CPROFILE_DIR")
if _out:
    import cProfile
    import time
    _profile = cProfile.Profile(time.thread_time)  # CPU time of the thread: preemption on shared cores stays out

    def _start(signum, frame):
        _profile.enable()

    def _stop(signum, frame):
        _profile.disable()
        _profile.dump_stats(os.path.join(_out, f"{os.getpid()}.prof"))

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
'''

# (stage, file suffix, function name): cumulative time of our functions on the request path. They do not call
# each other, so their cumulative times add up.
NAMED_STAGES = [
    ("multipart parsing (Starlette form + python-multipart)", "service/parsing.py", "read_multipart_upload"),
    ("PNG decode (Pillow)", "service/images.py", "decode_image"),
    ("fit to the input spec (mode, polarity, resize, pad)", "service/images.py", "fit_to_input_spec"),
    ("OOD answers (the score itself is the model call's derived output, below)", "service/ood.py", "answers"),
    ("model call + OOD score on the event loop (short batches: VISIONSERVE_INLINE_BATCH_US)",
     "service/onnx_models.py", "run"),
    ("answer: top-k dict", "service/classify.py", "classification_answer"),
    ("JSON encoding (orjson: service/json_response.py)", "service/json_response.py", "render"),
    ("request parameters", "service/parsing.py", "parse_params"),
]
# The rest by where the code lives (exclusive time), first match wins.
FILE_STAGES = [
    ("batching hand-off (our batcher, futures, run_in_executor)", ("service/batching.py", "concurrent/futures",
                                                                   "asyncio/futures.py", "asyncio/base_events.py:call_soon_threadsafe")),
    ("BentoML's own layers (its ASGI app, middlewares, context, metrics)", ("bentoml/", "_bentoml_impl/")),
    ("OpenTelemetry tracing (BentoML's ASGI middleware, a span per request)", ("opentelemetry/",)),
    ("Prometheus metrics (prometheus_client: BentoML's and ours)", ("prometheus_client/",)),
    ("uvicorn + its HTTP parser (httptools, or h11 without it)", ("uvicorn/", "h11/", "httptools/")),
    ("Starlette routing, middleware, requests", ("starlette/",)),
    ("asyncio event loop and socket I/O", ("asyncio/", "selectors.py")),
    ("visionserve, other (routing, metrics, logging)", ("service/",)),
]
IDLE = ("<method 'poll' of 'select.epoll' objects>", "<method 'select' of 'select.epoll' objects>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "cnn"))
    p.add_argument("--requests", type=int, default=3000, help="sequential requests per phase")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true")
    return p.parse_args(argv)


def worker_pid(server_pid: int) -> int:
    import psutil

    for child in psutil.Process(server_pid).children(recursive=True):
        if any("_bentoml_impl.worker" in part for part in child.cmdline()):
            return child.pid
    raise RuntimeError("no BentoML worker process found under the server")


def sequential(url: str, png: bytes, count: int) -> list[float]:
    import httpx

    latencies = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(count):
            start = time.perf_counter()
            response = client.post("/classify", files=[("images", ("x.png", png, "image/png"))])
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"/classify answered {response.status_code}: {response.text[:300]}")
    return latencies


def raw_run_ms(model_path: Path, pixels, seconds: float = 3.0) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feed = {"pixels": pixels[None, None]}
    times, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        session.run(["probabilities", "embedding"], feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def stage_shares(stats: pstats.Stats) -> tuple[dict[str, float], float]:
    """(seconds per stage, busy seconds) of the profiled thread."""
    entries = stats.stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    busy = sum(tt for (_f, _l, name), (_cc, _nc, tt, _ct, _c) in entries.items() if name not in IDLE)
    seconds: dict[str, float] = {}
    named = set()
    for stage, suffix, function in NAMED_STAGES:
        for key, (_cc, _nc, _tt, ct, _c) in entries.items():
            if key[0].endswith(suffix) and key[2] == function:
                seconds[stage] = seconds.get(stage, 0.0) + ct
                named.add(key)
    # Exclusive time of everything the named stages did not already cover (their callees are counted in their
    # cumulative time, so Pillow, python-multipart, json and numpy code are left out of the file buckets).
    covered_files = ("PIL/", "multipart/", "python_multipart/", "json/", "numpy/", "starlette/formparsers.py",
                     "starlette/datastructures.py", "threadpoolctl", "service/images.py", "service/ood.py",
                     "service/classify.py")
    def bucket(key) -> str | None:
        file, name = key[0], key[2]
        if key in named or any(part in file for part in covered_files):
            return None  # inside a named stage's cumulative time already
        for stage, parts in FILE_STAGES:
            if any(part.split(":")[0] in file and (":" not in part or part.split(":")[1] == name) for part in parts):
                return stage
        return "everything else (stdlib contextlib/typing/abc, logging, urllib, ...)"

    for key, (_cc, _nc, tt, _ct, callers) in entries.items():
        if key in named or key[2] in IDLE:
            continue
        if key[0] == "~":  # a C function (socket send, queue put, ...): the stage of whoever called it
            for caller, caller_times in callers.items():
                stage = bucket(caller)
                if stage is not None:
                    seconds[stage] = seconds.get(stage, 0.0) + caller_times[2]
            continue
        stage = bucket(key)
        if stage is not None:
            seconds[stage] = seconds.get(stage, 0.0) + tt
    return seconds, busy


def markdown_report(results: dict) -> str:
    per = results["requests"]
    lines = ["# Where a single-image /classify spends its time (cProfile of a running worker)", "",
             f"Command: `{results['command']}` ({results['started']}, commit {results['commit']}); machine: "
             f"{results['processor']}, load average {results['load_average']} (shared with other work).",
             f"visionserve as shipped, one worker, the CNN only; one sequential client, the same "
             f"{results['png_bytes']}-byte test PNG, {per} requests per phase.", "",
             f"- wall time per request at the client, unprofiled: median **{results['wall_ms_unprofiled']:.2f} ms** "
             f"(profiled: {results['wall_ms_profiled']:.2f} ms)",
             f"- the model itself (raw onnxruntime batch-1 `session.run`, probabilities + embedding, 1 thread, in the "
             f"same run): **{results['raw_model_ms']:.3f} ms** = {results['raw_model_ms'] / results['wall_ms_unprofiled']:.0%} "
             f"of the unprofiled request",
             f"- the worker process's CPU time per request, unprofiled, all threads: "
             f"**{results['worker_cpu_ms_unprofiled']:.2f} ms**",
             f"- the worker's event-loop thread used {results['busy_ms_per_request']:.2f} ms of CPU per request under "
             f"cProfile (thread CPU time, so preemption by other work on the shared cores stays out); its shares:",
             "",
             "| stage | ms per request (profiled) | share of loop busy time |", "|---|---:|---:|"]
    for stage, ms in sorted(results["stages_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {stage} | {ms:.3f} | {ms / results['busy_ms_per_request']:.1%} |")
    stages, busy = results["stages_ms"], results["busy_ms_per_request"]

    def share(*prefixes: str) -> float:
        return sum(ms for stage, ms in stages.items() if stage.startswith(prefixes)) / busy

    lines += ["", f"Grouped: BentoML's own (its layers and the OpenTelemetry middleware it always installs) "
              f"**{share('BentoML', 'OpenTelemetry'):.0%}**; the ASGI server and framework every peer pays too "
              f"(uvicorn and its HTTP parser, the event loop, Starlette routing) {share('uvicorn', 'asyncio', 'Starlette'):.0%}; "
              f"reading the upload (multipart, decode, fit) {share('multipart', 'PNG', 'fit'):.0%}; ours and shared "
              f"(OOD, Prometheus metrics of BentoML and ours, batching hand-off, answer, JSON, parameters) "
              f"{share('OOD', 'Prometheus', 'visionserve', 'batching', 'answer', 'JSON', 'request'):.0%}. cProfile "
              f"made the loop thread use {busy / results['worker_cpu_ms_unprofiled']:.1f}x the whole unprofiled "
              f"worker's CPU per request, and it inflates code made of many small Python calls (OpenTelemetry, "
              f"h11) more than C code (Pillow, onnxruntime): read the shares as a ranking, not as exact fractions."]
    lines += ["", "Top 15 functions by exclusive time on the loop thread:", "", "| function | ms per request |",
              "|---|---:|"]
    lines += [f"| `{name}` | {ms:.3f} |" for name, ms in results["top_functions"]]
    lines += ["", "The remaining time between the loop's busy time and the client's wall time is any model run on "
              "the executor thread (batches above VISIONSERVE_INLINE_BATCH_US), the kernel's loopback TCP and the "
              "client itself. "
              "Written by `python -m benchmarks.profile_classify`.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    from loadtests.machine import git_commit, load_average, processor_name
    from loadtests.payloads import fashion_test_images, png as png_bytes
    from loadtests.server import folder_of, models_folder_environment, running_server

    model_dir = Path(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="profile-classify-"))
    (workdir / "site").mkdir()
    (workdir / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (workdir / "prof").mkdir()
    models = folder_of([model_dir], workdir / "models")
    image = fashion_test_images(1, args.seed)[0]
    png = png_bytes(image)
    raw_ms = raw_run_ms(model_dir / "model.onnx", image)
    env = {"VISIONSERVE_WORKERS": "1", "PYTHONPATH": str(workdir / "site"),
           "VISIONSERVE_CPROFILE_DIR": str(workdir / "prof")}
    with running_server(models_folder_environment(models, env), workdir / "server.log") as server:
        import psutil

        url = server.url
        pid = worker_pid(server.process.pid)
        sequential(url, png, 200)  # warm-up
        worker = psutil.Process(pid)
        cpu_before = sum(worker.cpu_times()[:2])
        unprofiled = sequential(url, png, args.requests)
        worker_cpu_s = sum(worker.cpu_times()[:2]) - cpu_before
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        profiled = sequential(url, png, args.requests)
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not (workdir / "prof" / f"{pid}.prof").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # dump_stats writes in one go; let it finish
    stats = pstats.Stats(str(workdir / "prof" / f"{pid}.prof"))
    seconds, busy = stage_shares(stats)
    top = sorted(((f"{Path(f).name}:{line}({name})" if f != "~" else name, tt)
                  for (f, line, name), (_cc, _nc, tt, _ct, _c) in stats.stats.items() if name not in IDLE),
                 key=lambda kv: -kv[1])[:15]
    n = args.requests
    results = {"command": " ".join(["python -m benchmarks.profile_classify", *sys.argv[1:]]),
               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
               "processor": processor_name(), "load_average": load_average(), "requests": n, "png_bytes": len(png),
               "wall_ms_unprofiled": statistics.median(unprofiled) * 1000,
               "wall_ms_profiled": statistics.median(profiled) * 1000, "raw_model_ms": raw_ms,
               "busy_ms_per_request": busy / n * 1000, "worker_cpu_ms_unprofiled": worker_cpu_s / n * 1000,
               "stages_ms": {stage: s / n * 1000 for stage, s in seconds.items()},
               "top_functions": [(name, tt / n * 1000) for name, tt in top]}
    write_results(args.out, "profile", results, markdown_report(results), args.dry_run)
    return results


if __name__ == "__main__":
    main(parse_args())
