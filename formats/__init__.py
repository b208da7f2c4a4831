"""File formats every part of the tree reads (training/, service/, loadtests/, benchmarks/): numpy only, no torch,
and nothing of ours, so that each may import it without breaking the one-way data flow (docs/ARCHITECTURE.md)."""
