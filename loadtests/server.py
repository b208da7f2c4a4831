"""The one way a test, a benchmark or a load test starts visionserve: `bentoml serve service.app:VisionService`
in a session of its own, returned once /readyz answers 200, stopped with its whole process group.

Callers decide the server's environment (tests isolate BentoML's store and pin one worker, benchmarks serve a
models folder as it is, `make loadtest` imports models/ into a store of its own); this module only runs it.
Imports nothing of ours and neither Locust nor torch, so that any driver can use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
READY_LOG_LINE = "visionserve ready"  # service/app.py logs it once every model is loaded and warmed up
# Ways of naming the models to serve; a server of a models folder drops the others from the caller's environment.
MODEL_SOURCES = ("VISIONSERVE_MODELS", "VISIONSERVE_MODELS_DIR", "VISIONSERVE_CARDS_DIR")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    ready_before_load: bool = False  # /readyz answered 200 before the service logged that models were loaded

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def status_of(url: str, timeout_s: float = 5) -> int | None:
    """The status of GET url; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def readyz(url: str, timeout_s: float = 5) -> int | None:
    """The status of GET url/readyz (visionserve's readiness); None when nothing answers."""
    return status_of(url.rstrip("/") + "/readyz", timeout_s)


def is_ready(url: str, timeout_s: float = 2) -> bool:
    return readyz(url, timeout_s) == 200


def wait_ready(process: subprocess.Popen, health_url: str, log_path: Path, timeout_s: float) -> None:
    """Returns once GET health_url answers 200. Raises RuntimeError with the log when the process exits first,
    or when it is not ready within `timeout_s` (it is stopped then)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}; its log ({log_path}):\n"
                               + log_path.read_text(errors="replace"))
        if status_of(health_url, timeout_s=2) == 200:
            return
        time.sleep(0.3)
    stop_process_group(process)
    raise RuntimeError(f"the server was not ready after {timeout_s:g} s; its log ({log_path}):\n"
                       + log_path.read_text(errors="replace"))


def folder_of(models: Iterable[Path], folder: Path) -> Path:
    """`folder` holding links to exactly these model folders (each keeps its name): the VISIONSERVE_MODELS_DIR of a
    server that loads them and nothing else. A link already there is kept, so rounds may call this again."""
    folder.mkdir(parents=True, exist_ok=True)
    for model in models:
        if not (folder / model.name).exists():
            (folder / model.name).symlink_to(Path(model).resolve())
    return folder


def models_folder_environment(models_dir: str | Path, settings: Mapping[str, str]) -> dict[str, str]:
    """The environment of a server of a models folder itself (VISIONSERVE_MODELS_DIR): BentoML's store is never
    read, so what it holds cannot change a measurement; other ways of naming models in the caller's environment
    are dropped, `settings` (VISIONSERVE_* of the run) applied over the rest."""
    inherited = {key: value for key, value in os.environ.items() if key not in MODEL_SOURCES}
    return {**inherited, **settings, "VISIONSERVE_MODELS_DIR": str(models_dir), "BENTOML_DO_NOT_TRACK": "True"}


def start_server(env: Mapping[str, str], log_path: Path, *, host: str | None = "127.0.0.1",
                 port: int | None = None, timeout_s: float = 180, cpus: Collection[int] | None = None) -> Server:
    """`bentoml serve` with exactly `env` on `port` (a free one by default), its output in `log_path`; returned
    once /readyz answers 200. `host=None` leaves the address to the service's own default (the URL is then
    127.0.0.1's). `cpus`: the CPU set the server and its workers may run on (their default worker count follows
    it). Raises RuntimeError with the server's log when it exits or is not ready within `timeout_s`."""
    port = port or free_port()
    command = [str(Path(sys.executable).parent / "bentoml"), "serve", "service.app:VisionService",
               *(["--host", host] if host else []), "--port", str(port)]
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=pinned_to(cpus))
    server = Server(f"http://{host or '127.0.0.1'}:{port}", process, log_path)
    wait_ready(process, server.url + "/readyz", log_path, timeout_s)
    # Checked at the first 200: the load-and-warm-up log line must already be there.
    server.ready_before_load = READY_LOG_LINE not in server.log()
    return server


def pinned_to(cpus: Collection[int] | None):
    """A Popen preexec_fn that confines the child (and what it starts) to `cpus`; None when not pinned."""
    if not cpus:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def split_cpus() -> tuple[set[int], set[int]] | None:
    """This process's usable CPUs halved, (server's, load generator's), so that the load does not compete with
    the server for cores; None with fewer than two."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None
    half = len(usable) // 2
    return set(usable[:half]), set(usable[half:])


def stop_process_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the process's own session (a CLI and the workers it forked), SIGKILL after `grace_s`; the
    session is signalled even when its leader has exited, so that no worker outlives it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def stop_server(server: Server) -> None:
    stop_process_group(server.process)


@contextlib.contextmanager
def running_server(env: Mapping[str, str], log_path: Path, **options) -> Iterator[Server]:
    """start_server(...) for the duration of a `with` block, stopped however the block ends."""
    server = start_server(env, log_path, **options)
    try:
        yield server
    finally:
        stop_server(server)


def worker_processes(server_pid: int) -> list[psutil.Process]:
    """BentoML's worker processes under `bentoml serve` (their command line names the worker module)."""
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            if "worker" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:
            pass
    return workers
