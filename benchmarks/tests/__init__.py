"""Tests of the benchmark harness (collected by the repository's test run: testpaths in pyproject.toml)."""
