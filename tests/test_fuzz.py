"""GET /openapi.json describes our routes, and a bounded schemathesis run against it finds nothing.

The run is `make fuzz`'s driver (loadtests/fuzz.py) with ~200 cases instead of 1000+: requests generated
from the document, valid and invalid, each answer checked for a 5xx, an undocumented status, content type
or header, a body that does not match its schema, an invalid request accepted, a wrong method not 405.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from starlette.routing import Route

from conftest import EVERY_TASK_LIMITS, REPO
from service import classify, explain, features, generate, reconstruct, segment, v2

pytestmark = pytest.mark.server
# Cases asked of the fuzzing phase; the examples and the stateful phase add theirs (about 220 in all).
FUZZ_PHASE_CASES = 150


def test_every_route_of_ours_is_documented(every_task_server):
    document = httpx.get(every_task_server.url + "/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, methods in document["paths"].items() for method in methods}
    ours = {(method, route.path) for route in [*classify.ROUTES, *explain.ROUTES, *features.ROUTES, *segment.ROUTES,
                                                 *generate.ROUTES, *reconstruct.ROUTES, *v2.ROUTES]
            for method in route.methods - {"HEAD"} if isinstance(route, Route)}
    ours |= {("GET", "/models"), ("GET", "/models/{name}"), ("GET", "/openapi.json")}
    assert documented == ours
    # Built from this server's configuration: its sample limit and its default models as examples.
    n = document["components"]["schemas"]["GenerateParams"]["properties"]["n"]
    assert n["maximum"] == int(EVERY_TASK_LIMITS["VISIONSERVE_MAX_SAMPLES"])
    defaults = httpx.get(every_task_server.url + "/models", timeout=10).json()["default"]
    example = document["paths"]["/models/{name}"]["get"]["parameters"][0]["example"]
    assert example == defaults["classification"]
    assert "security" not in document  # no API key on this server


def test_bounded_fuzz_run_finds_no_failure(every_task_server, tmp_path):
    result = subprocess.run([sys.executable, "-m", "loadtests.fuzz", "--cases", str(FUZZ_PHASE_CASES),
                             "--phases", "examples,fuzzing,stateful", "--seed", "0",
                             "--host", every_task_server.url, "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    (report,) = tmp_path.iterdir()
    log = (report / "schemathesis.log").read_text(errors="replace")
    assert result.returncode == 0, result.stderr + log[-6000:]
    summary = json.loads((report / "summary.json").read_text())
    assert not summary["server_started"] and summary["failures"] == 0 and summary["errors"] == 0
    assert 150 <= summary["cases"] <= 400, summary
    assert summary["accepted"] >= 40, summary  # it reached the models, not only the validators
    assert (report / "junit.xml").is_file() and (report / "summary.md").is_file()
    server_log = every_task_server.log()
    assert "Traceback" not in server_log and "unhandled error" not in server_log, server_log[-3000:]
