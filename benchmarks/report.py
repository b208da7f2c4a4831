"""Where a benchmark's figures go: <name>.json beside a <name>.md table, in benchmarks/results/ by default."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"


def argument_parser(description: str) -> argparse.ArgumentParser:
    """A benchmark's command line with the two options every served-model benchmark has: the models folder to
    measure (--models, models/ by default) and where the results go (--out, benchmarks/results/)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(REPO / "models"))
    parser.add_argument("--out", default=str(RESULTS_DIR))
    return parser


def write_results(out: str | Path, name: str, results: dict, markdown: str, dry_run: bool = False) -> None:
    """out/<name>.json and out/<name>.md (none with `dry_run`: measured, not kept); the markdown also to stdout."""
    if not dry_run:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (folder / f"{name}.md").write_text(markdown)
    print(markdown)
