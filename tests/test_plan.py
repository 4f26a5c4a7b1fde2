"""sparse_ops.plan: per-layer, per-batch paths chosen by injected timers (never real ones), cached on disk."""
import copy
import json

import pytest
import torch

from sparse_ops.formats import CSR, TwoFour
from sparse_ops.kernels import cpp, reference
from sparse_ops.linear import SparseLinear
from sparse_ops.plan import BUCKETS, Planner, bucket, choose, plan_report
from sparse_ops.plan_cache import PlanCache, machine_key
from tests.test_formats import two_four, unstructured


def favour(path):
    """A timer under which ``path`` is twice as fast as every other path."""
    return lambda fns, device: {k: 0.5 if k == path else 1.0 for k in fns}


def planned(w, timer, cache=None, bias=None):
    return SparseLinear(CSR.from_dense(w) if not isinstance(w, TwoFour) else w, bias,
                        planner=Planner(timer=timer, cache=cache or PlanCache(None)), name="layer")


@pytest.mark.parametrize("n,expected", [(0, 1), (1, 1), (2, 8), (22, 8), (23, 64), (127, 64), (128, 256),
                                        (10_000, 256)])
def test_buckets_by_nearest_in_log_scale(n, expected):
    assert bucket(n) == expected and expected in BUCKETS


@pytest.mark.parametrize("times,expected", [
    ({"dense": 1.0, "csr.plain": 0.4, "csr.panels": 0.5, "csr:torch": 0.45}, "csr.plain"),
    ({"dense": 1.0, "csr.plain": 0.51, "csr.panels": 0.5}, "csr.plain"),  # within 3%: the first variant
    ({"dense": 1.0, "csr.plain": 0.6, "csr.panels": 0.5}, "csr.panels"),
    ({"dense": 1.0, "csr.plain": 1.02}, "csr.plain"),  # near-tie: ours (it fuses)
    ({"dense": 1.0, "csr.plain": 1.05}, "dense"),
    ({"dense": 1.0, "2:4": 0.9}, "2:4"),
    ({"dense": 1.0, "csr.plain": 0.9, "csr:torch": 0.5}, "csr:torch"),
])
def test_choose_takes_the_fastest_and_ours_on_near_ties(times, expected):
    assert choose(times) == expected


@pytest.mark.skipif(not cpp.available(), reason="native CPU kernels unavailable (no compiler)")
@pytest.mark.parametrize("path", ["dense", "csr.plain", "csr.panels", "csr:torch"])
@pytest.mark.parametrize("n", [1, 9, 64, 300])
@pytest.mark.parametrize("lead,act", [((), None), ((3,), "relu")])  # (n, in) plain; (3, n, in) with an activation
def test_every_chosen_path_computes_the_layer(path, n, lead, act):
    w = unstructured((40, 72), 0.8)
    w[3] = 0.0
    b = torch.randn(40)
    layer = planned(w, favour(path), bias=b)
    layer.activation = act
    x = torch.randn(*lead, n, 72)
    with torch.inference_mode():
        y = layer(x)
    tokens = x.numel() // 72
    want = path if path in map(str, layer.router.paths(tokens)) else "csr.plain"  # no panels for 1 token
    assert str(layer.route(tokens).path) == want and y.shape == (*lead, n, 40)
    ref = reference.csr_matmul(CSR.from_dense(w), x.reshape(-1, 72)).reshape(*lead, n, 40) + b
    torch.testing.assert_close(y, ref if act is None else torch.relu(ref), rtol=1e-5, atol=1e-5)


def test_two_four_layers_choose_between_dense_and_their_kernel():
    w = two_four((16, 32))
    layer = planned(TwoFour.from_dense(w), favour("dense"))
    assert list(map(str, layer.router.paths(8))) == ["dense", "2:4"] and str(layer.route(8).path) == "dense"
    x = torch.randn(8, 32)
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=0, atol=0)


def test_report_shows_each_bucket_reached_and_the_worst_choice():
    layer = planned(unstructured((16, 32), 0.9), lambda fns, d: {k: 1.0 if k == "dense" else 0.25 for k in fns})
    model = torch.nn.Sequential(layer)
    with torch.inference_mode():
        model(torch.randn(5, 32))
    text = plan_report(model)
    assert "16x32" in text and "(4.00x)" in text and text.count(" - ") >= 1
    assert text.splitlines()[-1] == "slowest chosen path: 4.00x of dense (1.00x: dense itself)"


def test_cache_file_is_shared_merged_and_survives_damage(tmp_path):
    path = tmp_path / "plans.json"
    w = unstructured((16, 32), 0.9)
    calls = []
    timer = lambda fns, device: calls.append(1) or {k: 1.0 if k == "dense" else 0.5 for k in fns}
    planned(w, timer, PlanCache(path)).route(1)
    planned(w, timer, PlanCache(path)).route(1)  # a new process: read from the file, not measured
    assert len(calls) == 1
    planned(unstructured((8, 32), 0.9), timer, PlanCache(path)).route(1)  # another layer: merged in
    entries = json.loads(path.read_text())[machine_key(torch.device("cpu"))]
    assert len(entries) == 2 and all(e["choice"] != "dense" for e in entries.values())
    path.write_text("{not json")
    planned(w, timer, PlanCache(path)).route(1)  # a damaged cache is measured again and rewritten
    assert len(calls) == 3 and json.loads(path.read_text())


def test_planned_layer_deep_copies_sharing_its_cache():
    layer = planned(unstructured((16, 32), 0.9), favour("dense"))
    x = torch.randn(4, 32)
    with torch.inference_mode():
        y = layer(x)
        clone = copy.deepcopy(layer)
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    assert clone.planner.cache is layer.planner.cache  # one cache shared by copies


@pytest.mark.parametrize("times,worst,expected", [
    # close medians: the one that stalls now and then (90th percentile 3x) is passed over
    ({"dense": 1.0, "csr.plain": 0.95}, {"dense": 1.1, "csr.plain": 3.0}, "dense"),
    # close and both bounded: the median decides as without worst cases
    ({"dense": 1.0, "csr.plain": 0.95}, {"dense": 1.1, "csr.plain": 1.4}, "csr.plain"),
    # not close (30% apart): the faster wins whatever its worst case
    ({"dense": 1.0, "csr.plain": 0.7}, {"dense": 1.1, "csr.plain": 5.0}, "csr.plain"),
    # the unbounded one left out, ours still preferred within 3% of what remains
    ({"dense": 1.0, "csr.plain": 1.02, "csr:torch": 0.93}, {"dense": 1.1, "csr.plain": 1.2, "csr:torch": 9.0},
     "csr.plain"),
])
def test_choose_passes_over_a_close_path_with_an_unbounded_worst_case(times, worst, expected):
    assert choose(times, worst=worst) == expected


class _Loads:
    """busy.Watch stand-in: each window in turn reports the next of ``loads``."""

    def __init__(self, *loads):
        self.loads, self.windows = list(loads), 0

    def __call__(self):
        outer = self

        class W:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.load = outer.loads[min(outer.windows, len(outer.loads) - 1)]
                outer.windows += 1
        return W()


def test_a_busy_measurement_is_retried_then_marked_reported_and_measured_again(monkeypatch, tmp_path):
    from sparse_ops import busy
    from sparse_ops.timing import Timing
    loaded = busy.Load(wall_s=1.0, other_share=0.5, slow_waits=2)
    watch = _Loads(loaded, loaded)
    monkeypatch.setattr(busy, "Watch", watch)
    timer = lambda fns, device: {k: Timing(0.5 if k == "csr.plain" else 1.0, 0.4, 0.6, 9) for k in fns}
    cache = PlanCache(tmp_path / "plans.json")
    layer = planned(unstructured((40, 72), 0.8), timer, cache)
    with torch.inference_mode():
        layer(torch.randn(1, 72))
    entry = layer.router.planned(1)
    assert watch.windows == 2 and entry["choice"] == "csr.plain"  # timed twice, both busy
    assert entry["busy"] == loaded.describe()
    report = plan_report(layer)
    assert "csr.plain (2.00x)*" in report and "1 of 1 choices were measured while the machine was busy" in report
    # the next process measures it again (quiet this time) instead of trusting the busy choice
    monkeypatch.setattr(busy, "Watch", _Loads(busy.Load(1.0, 0.0, 0)))
    again = planned(unstructured((40, 72), 0.8), timer, PlanCache(tmp_path / "plans.json"))
    with torch.inference_mode():
        again(torch.randn(1, 72))
    assert "busy" not in again.router.planned(1) and "*" not in plan_report(again)


def test_a_quiet_retry_replaces_the_busy_measurement(monkeypatch):
    from sparse_ops import busy
    watch = _Loads(busy.Load(1.0, 0.6, 0), busy.Load(1.0, 0.01, 0))
    monkeypatch.setattr(busy, "Watch", watch)
    layer = planned(unstructured((40, 72), 0.8), favour("dense"))
    with torch.inference_mode():
        layer(torch.randn(1, 72))
    assert watch.windows == 2 and "busy" not in layer.router.planned(1) and str(layer.route(1).path) == "dense"


@pytest.mark.skipif(not cpp.available(), reason="the cold rule follows the native kernels' cache sizes")
@pytest.mark.parametrize("over", [False, True])
def test_a_model_larger_than_the_l3_is_planned_cold_at_one_token(monkeypatch, over):
    """sparsify sets ``Planner.cold`` when the model's weights (stored formats and other parameters) exceed the
    L3: the one-token paths of its layers of COLD_MIN_BYTES or more are then timed a call at a time after
    ``flush_caches``, and cached under a key of their own; smaller layers and the other buckets as before."""
    import sparse_ops.plan
    from sparse_ops import plan
    from sparse_ops.loading import sparsify
    from sparse_ops.plan_cache import layer_key

    timings = []
    monkeypatch.setattr(sparse_ops.plan, "time_candidates",
                        lambda fns, device, **kw: timings.append(kw) or {k: 1.0 if k == "dense" else 0.5 for k in fns})
    model = torch.nn.Sequential(torch.nn.Linear(72, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24))
    state = {"0.weight": CSR.from_dense(unstructured((40, 72), 0.8)), "0.bias": torch.randn(40),
             "2.weight": CSR.from_dense(unstructured((24, 40), 0.7)), "2.bias": torch.randn(24)}
    size = sum(state[k].nbytes for k in ("0.weight", "2.weight")) + (40 + 24) * 4
    monkeypatch.setattr(cpp, "caches", lambda: {"L1D": 1 << 15, "L2": 1 << 19, "L3": size - over})
    monkeypatch.setattr(plan, "COLD_MIN_BYTES", state["0.weight"].nbytes)  # the first layer, not the second
    cache = PlanCache(None)
    sparsify(model, state, batches=(1, 8), cache=cache)
    cold = [kw for kw in timings if "before" in kw]
    assert len(timings) == 4 and len(cold) == over
    assert all(kw["before"] is plan.flush_caches and kw["repeats"] == plan.COLD_REPEATS for kw in cold)
    machine, cpu = machine_key(torch.device("cpu")), torch.device("cpu")
    for b in (1, 8):
        first = layer_key("csr" + (" cold" if over and b == 1 else ""), (40, 72), torch.float32, 0.8, cpu, b)
        second = layer_key("csr", (24, 40), torch.float32, 0.7, cpu, b)
        assert cache.get(machine, first) is not None and cache.get(machine, second) is not None, (first, second)


def test_cold_timing_flushes_before_every_sample_of_one_call():
    from sparse_ops.timing import time_candidates

    log = []
    times = time_candidates({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, torch.device("cpu"),
                            repeats=3, before=lambda: log.append("flush"))
    assert log[:4] == ["a", "a", "b", "b"]  # each one's warm-up and first call, unflushed
    assert log[4:] == ["flush", "a", "flush", "b"] * 3 and all(t.repeats == 3 for t in times.values())
