"""Benchmark engine: run specs → executor → results store → summary (Δm, verdicts, cost)."""
