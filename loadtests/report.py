"""A finished Locust run -> per-endpoint statistics, objectives met or missed, summary.json/.md and a plot.

Reads Locust's `--json-file` output, written once at shutdown with every request counted, rather than
its CSVs, which are rewritten once a second and so miss the last second of a run.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from loadtests.scenarios import ENDPOINTS, Endpoint

PERCENTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}
OBJECTIVE_KEYS = ("p95_ms", "p99_ms", "max_error_rate")


@dataclass(frozen=True)
class EndpointStats:
    key: str  # "POST /classify"
    requests: int
    failures: int
    error_rate: float
    requests_per_s: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class ObjectiveResult:
    endpoint: str
    objective: str  # p95_ms, p99_ms, max_error_rate, or "requests" when nothing was measured
    limit: float | None
    measured: float | None
    met: bool
    note: str = ""

    def describe(self) -> str:
        if self.objective == "requests":
            return f"{self.endpoint}: {self.note}"
        verdict = "met" if self.met else "MISSED"
        return f"{self.endpoint} {self.objective} <= {self.limit:g}: measured {self.measured:g} ({verdict})"


def response_time_percentile(response_times: dict[int, int], requests: int, fraction: float) -> float:
    """Locust's own percentile over its rounded response-time histogram (locust.stats.
    calculate_response_time_percentile), copied because importing locust here would monkey-patch
    this process with gevent."""
    allowed_above = int(requests * fraction)
    counted = 0
    for response_time in sorted(response_times, reverse=True):
        counted += response_times[response_time]
        if requests - counted <= allowed_above:
            return float(response_time)
    return 0.0


def endpoint_stats(entry: dict) -> EndpointStats:
    """One entry of Locust's --json-file output."""
    requests, failures = entry["num_requests"], entry["num_failures"]
    histogram = {int(float(ms)): count for ms, count in entry["response_times"].items()}
    duration = max(entry["last_request_timestamp"] - entry["start_time"], 1e-9) if requests else 1.0
    return EndpointStats(
        key=f"{entry['method']} {entry['name']}",
        requests=requests,
        failures=failures,
        error_rate=failures / requests if requests else 0.0,
        requests_per_s=round(requests / duration, 2),
        mean_ms=round(entry["total_response_time"] / requests, 2) if requests else 0.0,
        **{name: response_time_percentile(histogram, requests, fraction) for name, fraction in PERCENTILES.items()},
        max_ms=round(entry["max_response_time"], 2),
    )


def read_stats(json_path: Path) -> dict[str, EndpointStats]:
    """Per endpoint, in the catalogue's order (scenarios.ENDPOINTS), any other request name after them."""
    stats = {entry.key: entry for entry in map(endpoint_stats, json.loads(json_path.read_text()))}
    order = [endpoint.key for endpoint in ENDPOINTS]
    return dict(sorted(stats.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def read_failures(csv_path: Path) -> list[dict]:
    """Locust's failures table (method, name, error, occurrences); may miss the run's last second."""
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as f:
        return [{"endpoint": f"{row['Method']} {row['Name']}", "error": row["Error"],
                 "occurrences": int(row["Occurrences"])} for row in csv.DictReader(f)]


def load_objectives(path: Path) -> dict[str, dict[str, float]]:
    """The SLO file: {objectives: {"POST /classify": {p95_ms: .., p99_ms: .., max_error_rate: ..}, ...}}."""
    document = yaml.safe_load(path.read_text()) or {}
    objectives = document.get("objectives")
    if not isinstance(objectives, dict) or not objectives:
        raise ValueError(f"{path}: expected a mapping 'objectives: {{<endpoint>: {{p95_ms, p99_ms, max_error_rate}}}}'")
    for endpoint, limits in objectives.items():
        unknown = set(limits) - set(OBJECTIVE_KEYS) if isinstance(limits, dict) else set()
        if not isinstance(limits, dict) or not limits or unknown:
            raise ValueError(f"{path}: {endpoint}: objectives are {', '.join(OBJECTIVE_KEYS)}"
                             + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
    return objectives


def check_objectives(objectives: dict[str, dict[str, float]], stats: dict[str, EndpointStats],
                     selected: list[Endpoint], users_hint: str = "") -> list[ObjectiveResult]:
    """Every objective of the endpoints this run selected, met or missed.

    An endpoint outside the run's scenario is not judged (a classify-only run says nothing about
    /segment); a selected endpoint that got no request, or an objective naming no known endpoint,
    is a miss, since nothing shows that it was met.
    """
    known = {endpoint.key for endpoint in ENDPOINTS}
    results = []
    for key, limits in objectives.items():
        if key not in known:
            results.append(ObjectiveResult(key, "requests", None, None, False,
                                           f"names no endpoint of the load test (known: {', '.join(sorted(known))})"))
            continue
        if key not in {endpoint.key for endpoint in selected}:
            continue
        measured = stats.get(key)
        if measured is None or measured.requests == 0:
            results.append(ObjectiveResult(key, "requests", None, 0, False, "got no requests" + users_hint))
            continue
        for objective, limit in limits.items():
            value = measured.error_rate if objective == "max_error_rate" else getattr(measured, objective)
            results.append(ObjectiveResult(key, objective, float(limit), value, value <= float(limit)))
    return results


def plot_percentiles(stats: dict[str, EndpointStats], objectives: dict[str, dict[str, float]], title: str,
                     path: Path) -> None:
    """Grouped bars of p50/p95/p99 per endpoint, with the p95/p99 objectives as short dashes."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    keys = [key for key in stats if stats[key].requests]
    figure = Figure(figsize=(max(6.0, 1.8 * len(keys) + 2), 4.5), layout="constrained")
    axes = figure.subplots()
    width = 0.26
    colours = {"p50_ms": "#4c78a8", "p95_ms": "#f58518", "p99_ms": "#e45756"}
    for offset, (name, colour) in enumerate(colours.items()):
        xs = [i + (offset - 1) * width for i in range(len(keys))]
        axes.bar(xs, [getattr(stats[key], name) for key in keys], width, label=name[:3], color=colour)
        if name != "p50_ms":
            for x, key in zip(xs, keys):
                if name in objectives.get(key, {}):
                    axes.hlines(objectives[key][name], x - width / 2, x + width / 2, colors="black", linestyles="--")
    axes.set_xticks(range(len(keys)), [key.replace(" [", "\n[") for key in keys], fontsize=8)
    axes.set_ylabel("response time (ms)")
    axes.set_yscale("log")
    axes.set_title(title, fontsize=9)
    axes.plot([], [], "k--", label="objective")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(path, dpi=120)


def summary_markdown(summary: dict) -> str:
    run = summary["run"]
    lines = [f"# Load test {run['stamp']}", "",
             f"Scenario `{run['scenario']}` against {run['host']}: {run['users']} users (spawn rate "
             f"{run['spawn_rate']:g}/s) for {run['duration']}, {run['locust_workers'] or 'no'} Locust workers; "
             f"server {'started by the driver' if run['server_started'] else 'already running'}. "
             f"Command: `{run['command']}`.", "",
             "| endpoint | requests | failures | error rate | req/s | p50 ms | p95 ms | p99 ms | max ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary["endpoints"].values():
        lines.append(f"| {s['key']} | {s['requests']} | {s['failures']} | {s['error_rate']:.2%} | "
                     f"{s['requests_per_s']} | {s['p50_ms']:g} | {s['p95_ms']:g} | {s['p99_ms']:g} | {s['max_ms']:g} |")
    lines += ["", f"## Objectives ({summary['slo_file']}): "
              + ("all met" if summary["passed"] else f"{len(summary['missed'])} missed"), ""]
    lines += [f"- {result}" for result in summary["objective_lines"]]
    if summary["failures"]:
        lines += ["", "## Failures", "", "| endpoint | error | occurrences |", "|---|---|---:|"]
        lines += [f"| {f['endpoint']} | {f['error']} | {f['occurrences']} |" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, run: dict, stats: dict[str, EndpointStats], results: list[ObjectiveResult],
                  failures: list[dict], slo_path: Path) -> dict:
    missed = [result for result in results if not result.met]
    summary = {
        "run": run,
        "slo_file": str(slo_path),
        "passed": not missed,
        "endpoints": {key: asdict(value) for key, value in stats.items()},
        "objectives": [asdict(result) for result in results],
        "objective_lines": [result.describe() for result in results],
        "missed": [result.describe() for result in missed],
        "failures": failures,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(summary))
    return summary
