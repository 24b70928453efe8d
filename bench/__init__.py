"""Benchmarks, one module per technique: ``run(ctx) -> str`` (see tools/bench.py)."""
