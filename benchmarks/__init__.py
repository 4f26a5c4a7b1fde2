"""Benchmarks: one shared timer (timing.py), named shapes (shapes.py), one script per study."""
