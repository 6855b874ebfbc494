"""Throughput and memory harness: ``python -m benchmarks.throughput`` and ``python -m benchmarks.memory``."""
