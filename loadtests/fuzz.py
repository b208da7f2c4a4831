"""`make fuzz`: schemathesis against the server's own OpenAPI document (GET /openapi.json).

    .venv/bin/python -m loadtests.fuzz                                   # ~1000 cases, every phase
    .venv/bin/python -m loadtests.fuzz --cases 200 --phases examples,fuzzing,stateful --seed 0
    VISIONSERVE_API_KEY=... .venv/bin/python -m loadtests.fuzz --host http://127.0.0.1:3000   # a server with a key

Uses the service answering at --host, or starts one there as `make loadtest` does (loadtests/run.py) and
stops it afterwards. When VISIONSERVE_API_KEY is set (for the server it starts, or the key of the one
running), every request carries it as a bearer token. Requests are generated from the document (valid and
invalid ones), sent one at a time, and every answer is checked: never a 5xx, a status the document lists, its content type, its headers and
its body against the document's schema, invalid requests refused, wrong methods answered 405.

One check is left out: positive_data_acceptance ("every schema-valid request gets a 2xx"). A schema cannot
say "a decodable image", "a .npy array" or "one of this generator's labels", so random bytes sent as an
image or an unknown class name are schema-valid and rightly refused with a 4xx.

Writes reports/fuzz/<UTC stamp>/: schemathesis.log (its output, with a curl command reproducing each
failure), its JSON and JUnit reports, summary.json and summary.md. Exits with schemathesis's status (0: no
failure), or 2 when the run itself could not be made.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

from loadtests.run import BIN, new_report_dir, service_at

EXCLUDED_CHECKS = ("positive_data_acceptance",)
PHASES = "examples,coverage,fuzzing,stateful"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1000,
                   help="generated cases to aim for in the fuzzing phase, spread over the operations (default 1000)")
    p.add_argument("--host", default="http://127.0.0.1:3000", help="the server's URL")
    p.add_argument("--phases", default=PHASES, help=f"schemathesis phases (default {PHASES})")
    p.add_argument("--seed", type=int, default=None, help="schemathesis seed (default: a random one, reported)")
    p.add_argument("--out", default="reports/fuzz", help="parent folder of the run's report folder")
    p.add_argument("--server-timeout", type=float, default=180, help="seconds to wait for a started server")
    p.add_argument("--request-timeout", type=float, default=30, help="seconds per request")
    return p.parse_args(argv)


def operation_count(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url.rstrip("/") + "/openapi.json", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        document = json.load(response)
    return sum(len(methods) for methods in document["paths"].values())


KEY_VARIABLE = "VISIONSERVE_FUZZ_API_KEY"


# What counts as refusing an invalid request: schemathesis's own list lacks 413, which this API answers
# for a form field or a body over a limit, however else the request is wrong.
REJECTION_STATUSES = (400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429)


def schemathesis_config(out: Path, with_key: bool) -> Path:
    """A schemathesis.toml for the run. The key, when there is one, comes from the environment at run time,
    so that it appears neither on a command line (visible to every local user) nor in a report file."""
    lines = [f'headers = {{ Authorization = "Bearer ${{{KEY_VARIABLE}}}" }}'] if with_key else []
    lines += ["", "[checks.negative_data_rejection]",
              f"expected-statuses = [{', '.join(map(str, REJECTION_STATUSES))}]"]
    config = out / "schemathesis.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def schemathesis_command(url: str, args: argparse.Namespace, max_examples: int, seed: int, out: Path,
                         with_key: bool) -> list[str]:
    command = [str(BIN / "schemathesis"), "--config-file", str(schemathesis_config(out, with_key)),
               "run", url.rstrip("/") + "/openapi.json",
               "--checks", "all", "--exclude-checks", ",".join(EXCLUDED_CHECKS),
               "--phases", args.phases, "--max-examples", str(max_examples), "--seed", str(seed),
               "--workers", "1",  # one request at a time: the server shares its cores with everything else
               "--request-timeout", str(args.request_timeout),
               "--report", "json,junit", "--report-dir", str(out),
               "--report-json-path", str(out / "schemathesis.json"), "--report-junit-path", str(out / "junit.xml")]
    return command


def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    started = "started by this run" if summary["server_started"] else "already running"
    result = "passed" if summary["exit_code"] == 0 else "FAILED (schemathesis.log has a curl command per failure)"
    lines = [f"# Fuzz run {out.name}", "",
             f"- server: {summary['url']} ({started})",
             f"- schemathesis {summary.get('schemathesis_version')}, seed {summary['seed']}, phases {summary['phases']}, "
             f"max examples per operation {summary['max_examples']}",
             f"- operations: {summary['operations']}; cases generated: {summary['cases']} "
             f"({summary['accepted']} of them answered 2xx); "
             f"failures: {summary['failures']}; errors: {summary['errors']}",
             f"- checks: all but {', '.join(EXCLUDED_CHECKS)}",
             f"- result: {result}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def fuzz(args: argparse.Namespace, out: Path) -> int:
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    api_key = os.environ.get("VISIONSERVE_API_KEY", "").strip() or None  # the server's key, as it reads it
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with service_at(args.host, out / "server.log", args.server_timeout) as (url, started):
        operations = operation_count(url, headers)
        max_examples = max(1, math.ceil(args.cases / operations))
        command = schemathesis_command(url, args, max_examples, seed, out, api_key is not None)
        print(f"fuzz: {operations} operations x {max_examples} examples, seed {seed}, against {url}", file=sys.stderr)
        with open(out / "schemathesis.log", "wb") as log:
            env = {**os.environ, "NO_COLOR": "1", **({KEY_VARIABLE: api_key} if api_key else {})}
            # In the report folder: schemathesis keeps a crash cache (.schemathesis/) in its working directory.
            exit_code = subprocess.run(command, cwd=out, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    report = json.loads((out / "schemathesis.json").read_text()) if (out / "schemathesis.json").is_file() else {}
    cases = report.get("test_cases", {})
    # Requests the API accepted (2xx): a run where everything is refused would pass every check and test little.
    accepted = sum(phase.get("accepted", 0) for rates in report.get("valid_rates", {}).values()
                   for phase in rates.values())
    summary = {"url": url, "server_started": started, "seed": seed, "phases": args.phases,
               "max_examples": max_examples, "operations": operations, "cases": cases.get("generated"),
               "accepted": accepted,
               "failures": cases.get("unique_failures"), "errors": len(report.get("errors", [])),
               "schemathesis_version": report.get("schemathesis_version"), "exit_code": exit_code,
               "command": " ".join(command)}
    write_summary(out, summary)
    print((out / "summary.md").read_text(), file=sys.stderr)
    return exit_code


def main(args: argparse.Namespace) -> int:
    out = new_report_dir(Path(args.out).resolve())
    print(f"fuzz: report in {out}", file=sys.stderr)
    try:
        return fuzz(args, out)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        print(f"fuzz: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(parse_args()))
