"""Benchmarks and evaluations: each writes JSON plus a markdown table under benchmarks/results/; run from the
repository root as `python -m benchmarks.<name>` (docs/PERFORMANCE.md)."""
