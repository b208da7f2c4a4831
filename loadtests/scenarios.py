"""Which endpoints a load test exercises, and whether the server under test has a model for each.

Shared by the Locust file (which users to spawn) and the `make loadtest` driver (which objectives to
check), so both make the same choice from the same `GET /models`. Imports neither Locust nor torch:
the driver must not monkey-patch itself with gevent, and the check must be cheap.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    """One kind of request: its Locust tag, its Locust request name and the model task it needs."""

    tag: str
    name: str  # Locust's request name; the report and the SLO file call it "POST <name>"
    task: str  # the `task` of a model card that must be available on the server

    @property
    def key(self) -> str:
        return f"POST {self.name}"

    @property
    def path(self) -> str:
        return self.name.split(" ")[0]  # a name is the path, then the variant in brackets if any


BATCH_IMAGES = 16  # images per batched request: a client that groups a page of thumbnails

ENDPOINTS = (
    Endpoint("classify", "/classify", "classification"),
    Endpoint("classify_batch", f"/classify [batch{BATCH_IMAGES}]", "classification"),
    Endpoint("tensor", f"/classify/tensor [batch{BATCH_IMAGES}]", "classification"),
    Endpoint("segment", "/segment", "segmentation"),
    Endpoint("generate", "/generate", "generation"),
    Endpoint("reconstruct", "/reconstruct", "reconstruction"),
)
ENDPOINTS_BY_TAG = {endpoint.tag: endpoint for endpoint in ENDPOINTS}
ALL_TAGS = tuple(ENDPOINTS_BY_TAG)

# smoke: the cheapest request of each classification path, which every server with a classifier answers.
# available: every endpoint whose task the server has a model for (the others are left out, not failed).
SCENARIOS = {
    "all": ALL_TAGS,
    "classify": ("classify", "classify_batch", "tensor"),
    "segment": ("segment",),
    "generate": ("generate",),
    "reconstruct": ("reconstruct",),
    "smoke": ("classify", "tensor"),
    "available": ALL_TAGS,
}


class ScenarioError(RuntimeError):
    """The selected users cannot run against this server (missing model, unreachable server, bad choice)."""


def fetch_models(host: str, timeout_s: float = 10) -> dict:
    """The server's `GET /models` answer."""
    url = host.rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ScenarioError(f"cannot read {url} ({exc}); is visionserve running there?") from None


def available_tasks(models: dict) -> set[str]:
    """Tasks with at least one model the server reports as available."""
    return {model.get("task") for model in models.get("models", []) if model.get("status") == "available"}


def select_endpoints(scenario: str, server_tasks: set[str], tags: list[str] | None = None,
                     exclude_tags: list[str] | None = None) -> list[Endpoint]:
    """The endpoints to load: the scenario's (or `tags`, when given), less `exclude_tags`.

    Raises ScenarioError naming every selected endpoint whose task has no available model on the
    server, because a load test that silently skips an endpoint reports a pass it never measured;
    only the `available` scenario drops those endpoints on purpose.
    """
    if scenario not in SCENARIOS:
        raise ScenarioError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    chosen = list(tags) if tags else list(SCENARIOS[scenario])
    unknown = sorted(set(chosen) - set(ALL_TAGS))
    if unknown:
        raise ScenarioError(f"unknown tag(s) {', '.join(unknown)}; tags are {', '.join(ALL_TAGS)}")
    endpoints = [ENDPOINTS_BY_TAG[tag] for tag in ALL_TAGS if tag in chosen and tag not in (exclude_tags or ())]
    missing = [endpoint for endpoint in endpoints if endpoint.task not in server_tasks]
    if scenario == "available":
        endpoints = [endpoint for endpoint in endpoints if endpoint not in missing]
    elif missing:
        raise ScenarioError(
            "the server has no available model for: "
            + "; ".join(f"{endpoint.key} (tag {endpoint.tag}) needs a {endpoint.task} model" for endpoint in missing)
            + f". It serves: {', '.join(sorted(server_tasks)) or 'nothing'}. Pick another scenario "
            "(LOADTEST_SCENARIO / --scenario / SCENARIO=), or `available` to load only what the server has.")
    if not endpoints:
        raise ScenarioError(f"scenario {scenario!r} selects no endpoint this server can answer "
                            f"(it serves: {', '.join(sorted(server_tasks)) or 'nothing'})")
    return endpoints
