"""Benchmark scoring, each metric as its benchmark's official script computes it."""
