"""Optional packages in tests: a test module that needs one is skipped where it is missing, unless the run names
it in ``PRUNE_SPARSE_REQUIRE`` (comma-separated, e.g. ``triton``; CI sets it): then its absence fails the run
instead of silently skipping the only tests of that code."""
import importlib
import os

import pytest


def required(name: str) -> bool:
    """Whether this run names ``name`` in ``PRUNE_SPARSE_REQUIRE`` (its absence must fail, not skip)."""
    return name in os.environ.get("PRUNE_SPARSE_REQUIRE", "").split(",")


def import_or_skip(name: str, reason: str):
    """The module ``name``; skip the calling test module without it, or fail if the run requires it."""
    if required(name):
        return importlib.import_module(name)  # an ImportError here fails the run
    return pytest.importorskip(name, reason=reason)
