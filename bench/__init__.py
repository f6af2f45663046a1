"""Benchmark scripts (not tests): each run writes its own section of docs/benchmarks.md."""
