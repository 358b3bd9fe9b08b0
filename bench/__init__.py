"""Kernel microbenchmarks (run from the repository root: `python -m bench.run --quick`)."""
