"""Helpers for tests, benchmarks and the demo: in-memory batches, synthetic workloads, a local I/O server."""
