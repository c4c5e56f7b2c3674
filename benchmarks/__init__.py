"""Benchmarks of flyte-actors: ``python -m benchmarks`` (``make bench``); see docs/performance.md."""
