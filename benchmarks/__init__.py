"""Benchmarks of anomalib-tiled; run ``python -m benchmarks.compare_upstream --help`` from the repository root."""
