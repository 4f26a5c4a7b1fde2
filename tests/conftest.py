"""Shared test set-up: CUDA-marked tests skip cleanly without a GPU; seeds are fixed; without a GPU, Triton runs
its kernels in its CPU interpreter for the whole session (set before any test module imports triton: a process
that used triton compiled first cannot interpret its kernels later)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _ours_fastest(fns, device, **timing):
    """The stand-in timer of ``sparse_ops.plan`` in tests: our kernel (its first variant) fastest, then torch's,
    dense slowest, so planned layers run our kernels without measuring anything (tests never depend on timing;
    the tests of the plan inject their own timers)."""
    return {k: 1.0 if k == "dense" else 0.9 if k.endswith(":torch") else 0.5 for k in fns}


@pytest.fixture(autouse=True, scope="session")
def _plans_of_subprocesses(tmp_path_factory):
    """CLI tests run in subprocesses: their plans go to a file of this session, not the user's cache."""
    import os

    os.environ["SPARSE_OPS_PLANS"] = str(tmp_path_factory.mktemp("plans") / "plans.json")


@pytest.fixture(autouse=True)
def _no_timing_in_plans(monkeypatch):
    from sparse_ops import plan, plan_cache

    monkeypatch.setattr(plan, "time_candidates", _ours_fastest)
    cache = plan_cache.PlanCache(None)  # nothing written to the user's cache
    monkeypatch.setattr(plan, "default_cache", lambda: cache)
