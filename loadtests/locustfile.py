"""Locust users for every visionserve endpoint, with payloads cut from Fashion-MNIST test images.

Run from the repository root (defaults in loadtests/locust.conf: every endpoint, 8 users, 20 s,
http://127.0.0.1:3000):

    .venv/bin/locust --config loadtests/locust.conf
    .venv/bin/locust --config loadtests/locust.conf --scenario classify -u 8 -t 20s -H http://127.0.0.1:3000
    LOADTEST_SCENARIO=available .venv/bin/locust --config loadtests/locust.conf
    .venv/bin/locust --config loadtests/locust.conf --tags classify segment

`make loadtest` (loadtests/run.py) runs this file headless, writes the reports and checks the objectives.

Scenarios (--scenario or LOADTEST_SCENARIO): all, classify, segment, generate, reconstruct, smoke, available
(loadtests/scenarios.py). `--tags` picks users by their tags instead: classify, classify_batch, tensor,
segment, generate, reconstruct. At start the master (or the single local process) reads GET /models and
exits with a message naming every selected endpoint the server has no model for, except under `available`,
which loads only the endpoints the server can answer.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from collections.abc import Callable

import locust.runners
from locust import FastHttpUser, between, events, tag, task
from locust.runners import WorkerRunner

from loadtests.payloads import MULTIPART_CONTENT_TYPE, shared_payloads
from loadtests.scenarios import (
    BATCH_IMAGES,
    ENDPOINTS_BY_TAG,
    SCENARIOS,
    Endpoint,
    ScenarioError,
    available_tasks,
    fetch_models,
    select_endpoints,
)

GENERATE_IMAGES = 16
GENERATE_CLASSES = 10  # the Fashion-MNIST classes a conditional generator is trained on
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECONSTRUCTION_ERROR_HEADER = "X-Reconstruction-Error"  # service/reconstruct.py's ERROR_HEADER
_user_seeds = itertools.count()  # each user of a process gets its own seeded stream of choices


def error_code(response) -> str:
    """Our error shape's `code`, else a short excerpt: failures group by this text in the report, so
    it must not carry per-request details (queue lengths, sizes)."""
    try:
        return json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return (response.text or "")[:60].replace("\n", " ")


def check_json(response, expected_predictions: int | None = None, required_key: str | None = None) -> None:
    """Marks the response failed unless it is a 200 with the answer's shape."""
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code} {error_code(response)}")
        return
    try:
        answer = response.json()
    except ValueError:
        response.failure("200 with a body that is not JSON")
        return
    if expected_predictions is not None and len(answer.get("predictions", [])) != expected_predictions:
        response.failure(f"expected {expected_predictions} predictions")
    elif required_key is not None and required_key not in answer:
        response.failure(f"answer lacks '{required_key}'")


def check_png(response, required_header: str | None = None) -> None:
    """Marks the response failed unless it is a 200 whose body is a PNG (carrying `required_header`, if given)."""
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code} {error_code(response)}")
    elif not response.content.startswith(PNG_SIGNATURE):
        response.failure("200 with a body that is not a PNG")
    elif required_header is not None and not response.headers.get(required_header):
        response.failure(f"answer lacks the {required_header} header")


class VisionUser(FastHttpUser):
    """A client that sends a request, reads the answer, and sends its next one after a short pause.

    The pause keeps the load an open-ended mix of clients rather than a saturating closed loop, in
    which latency is only users / throughput (docs/ARCHITECTURE.md: measured pitfalls).
    """

    abstract = True
    wait_time = between(0.05, 0.25)
    endpoint: Endpoint

    def on_start(self) -> None:
        self.payloads = shared_payloads()
        self.rng = random.Random(next(_user_seeds))

    def pick(self, bodies: list[bytes]) -> bytes:
        return bodies[self.rng.randrange(len(bodies))]

    def post(self, body: bytes, check: Callable[..., None] = check_json, content_type: str = MULTIPART_CONTENT_TYPE,
             **expected) -> None:
        """POST `body` to the endpoint; `check(response, **expected)` judges the answer."""
        with self.client.post(self.endpoint.path, data=body, headers={"Content-Type": content_type},
                              name=self.endpoint.name, catch_response=True) as response:
            check(response, **expected)


class ClassifyUser(VisionUser):
    """One PNG per request: the web page's and most clients' call."""

    weight = 4
    endpoint = ENDPOINTS_BY_TAG["classify"]

    @tag("classify")
    @task
    def classify_one_image(self) -> None:
        self.post(self.pick(self.payloads.single_images), expected_predictions=1)


class ClassifyBatchUser(VisionUser):
    """BATCH_IMAGES PNGs in one multipart request."""

    weight = 1
    endpoint = ENDPOINTS_BY_TAG["classify_batch"]

    @tag("classify_batch")
    @task
    def classify_image_batch(self) -> None:
        self.post(self.pick(self.payloads.image_batches), expected_predictions=BATCH_IMAGES)


class ClassifyTensorUser(VisionUser):
    """A high-throughput client: BATCH_IMAGES model-ready images as one .npy uint8 body."""

    weight = 1
    endpoint = ENDPOINTS_BY_TAG["tensor"]

    @tag("tensor")
    @task
    def classify_tensor_batch(self) -> None:
        self.post(self.pick(self.payloads.tensor_batches), content_type="application/octet-stream",
                  expected_predictions=BATCH_IMAGES)


class SegmentUser(VisionUser):
    """One 64x64 scene of two test items per request; the JSON answer (statistics, components, mask)."""

    weight = 1
    endpoint = ENDPOINTS_BY_TAG["segment"]

    @tag("segment")
    @task
    def segment_scene(self) -> None:
        self.post(self.pick(self.payloads.scenes), required_key="mask_png")


class GenerateUser(VisionUser):
    """POST /generate to its contract: JSON {n, class?, seed?, format: grid|images, scale}; a PNG grid
    or a JSON answer. Mixes conditional and unconditional calls and both formats."""

    weight = 1
    endpoint = ENDPOINTS_BY_TAG["generate"]

    def generate_request(self) -> dict:
        request = {"n": GENERATE_IMAGES, "seed": self.rng.randrange(2**31),
                   "format": self.rng.choice(["grid", "images"]), "scale": 2}
        if self.rng.random() < 0.75:
            request["class"] = self.rng.randrange(GENERATE_CLASSES)
        return request

    @tag("generate")
    @task
    def generate_samples(self) -> None:
        request = self.generate_request()
        with self.client.post(self.endpoint.path, json=request, name=self.endpoint.name, catch_response=True) as response:
            if request["format"] == "images":
                check_json(response, required_key="images")
            else:
                check_png(response)


class ReconstructUser(VisionUser):
    """One PNG per request to the autoencoder: the answer is its reconstruction as a PNG (format=auto with one
    image), the reconstruction error in a header."""

    weight = 1
    endpoint = ENDPOINTS_BY_TAG["reconstruct"]

    @tag("reconstruct")
    @task
    def reconstruct_one_image(self) -> None:
        self.post(self.pick(self.payloads.single_images), check_png, required_header=RECONSTRUCTION_ERROR_HEADER)


# A worker says it is ready before its init event has built its payloads, and sends no heartbeat while it builds
# them; with Locust's default liveness (3 missed 1 s heartbeats) a master on a busy 2-core machine declared both
# workers missing and stopped the run before a request was sent (seen in the test suite). Read by the master at
# run time, so setting it here works.
locust.runners.HEARTBEAT_LIVENESS = 15


@events.init_command_line_parser.add_listener
def add_scenario_option(parser) -> None:
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="all", env_var="LOADTEST_SCENARIO",
                        help="which endpoints to load (loadtests/scenarios.py); --tags overrides it")


@events.init.add_listener
def choose_users(environment, **_kwargs) -> None:
    """Keeps only the selected users, after checking that the server has a model for each of them.

    Runs in the master or the single local process: workers spawn whatever the master assigns them,
    so they only build their payloads. Exits the process (status 1) with the reason when the check fails.
    """
    if not isinstance(environment.runner, WorkerRunner):
        options = environment.parsed_options
        if not environment.host:
            sys.exit("loadtest: no target; pass --host (-H) http://HOST:PORT")
        try:
            server_tasks = available_tasks(fetch_models(environment.host))
            endpoints = select_endpoints(options.scenario, server_tasks, options.tags, options.exclude_tags)
        except ScenarioError as exc:
            sys.exit(f"loadtest: {exc}")
        environment.user_classes[:] = [user for user in environment.user_classes if user.endpoint in endpoints]
        print(f"loadtest: scenario {options.scenario}, endpoints {', '.join(e.key for e in endpoints)}",
              file=sys.stderr)
    if not environment.parsed_options.master:
        shared_payloads()  # built before the clock starts, not in the first user's on_start
