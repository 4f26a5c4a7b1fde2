"""Schedules by hand: warm-up, begin, midpoints, between `every` boundaries, end, cool-down."""
import math

import pytest

from prune.schedules import Constant, CubicRamp, ExponentialRamp, LinearRamp, schedule_from_dict


def test_cubic_matches_zhu_gupta_by_hand():
    s = CubicRamp(initial=0.1, final=0.9, begin_step=100, end_step=500, every=50)
    assert s(0) == 0.0 and s(99) == 0.0  # warm-up: nothing pruned
    assert s(100) == pytest.approx(0.1)  # t0: initial
    # p = (300 - 100) / 400 = 0.5 -> 0.9 + (0.1 - 0.9) * 0.5**3 = 0.8
    assert s(300) == pytest.approx(0.8)
    # between boundaries the target is held at the last boundary (t = 150: p = 0.125)
    expected_150 = 0.9 + (0.1 - 0.9) * (1 - 0.125) ** 3
    assert s(150) == pytest.approx(expected_150) and s(199) == pytest.approx(expected_150)
    assert s(500) == 0.9 and s(10_000) == 0.9  # end, then held (cool-down)


def test_cubic_prunes_fastest_early():
    s = CubicRamp(0.0, 0.9, begin_step=0, end_step=100, every=1)
    v = s.values(101)
    gains = [b - a for a, b in zip(v, v[1:])]
    assert gains[0] > gains[50] > gains[98] > 0


def test_linear_by_hand():
    s = LinearRamp(0.2, 0.6, begin_step=10, end_step=50, every=10)
    assert [s(t) for t in (9, 10, 19, 20, 30, 45, 50, 99)] == pytest.approx(
        [0.0, 0.2, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6])


def test_exponential_removes_same_fraction_of_remaining():
    s = ExponentialRamp(0.0, 0.75, begin_step=0, end_step=2, every=1)
    # density 1 -> 0.5 -> 0.25: each update halves what is left
    assert [s(t) for t in (0, 1, 2)] == pytest.approx([0.0, 0.5, 0.75])


def test_constant_is_one_shot():
    s = Constant(0.8, begin_step=5)
    assert [s(t) for t in (0, 4, 5, 1000)] == [0.0, 0.0, 0.8, 0.8]
    assert [t for t in range(20) if s.is_update_step(t)] == [5]


def test_update_steps():
    s = CubicRamp(0.0, 0.5, begin_step=3, end_step=12, every=4)
    assert [t for t in range(30) if s.is_update_step(t)] == [3, 7, 11, 12]


def test_end_step_not_on_every_boundary_still_reaches_final():
    s = LinearRamp(0.0, 0.5, begin_step=0, end_step=10, every=4)
    assert s(8) == pytest.approx(0.4) and s(9) == pytest.approx(0.4) and s(10) == 0.5


@pytest.mark.parametrize("cls", [LinearRamp, CubicRamp, ExponentialRamp])
def test_monotone_and_bounded(cls):
    v = cls(0.05, 0.95, begin_step=7, end_step=300, every=3).values(400)
    assert all(b >= a for a, b in zip(v, v[1:]))
    assert v[-1] == 0.95 and min(v) == 0.0


@pytest.mark.parametrize("s", [Constant(0.3, 2), LinearRamp(0.0, 0.5, 1, 9, 2), CubicRamp(0.1, 0.9, 0, 5),
                               ExponentialRamp(0.0, 0.9, 3, 30, 3)])
def test_round_trip_dict(s):
    assert schedule_from_dict(s.to_dict()) == s


@pytest.mark.parametrize("kwargs, match", [
    (dict(initial=0.0, final=1.0), r"final sparsity must be a sparsity in \[0, 1\), got 1.0"),
    (dict(initial=-0.1, final=0.5), r"initial sparsity .* got -0.1"),
    (dict(initial=0.0, final=math.nan), r"final sparsity .* got nan"),
    (dict(final=0.5, begin_step=10, end_step=5), r"end_step \(5\) is before begin_step \(10\)"),
    (dict(final=0.5, every=0), r"every must be a positive integer .* got 0"),
    (dict(initial=0.6, final=0.5), r"never decrease"),
    (dict(final=0.5, begin_step=-1), r"begin_step .* got -1"),
])
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CubicRamp(**kwargs)


def test_bad_constant_and_kind():
    with pytest.raises(ValueError, match="got 1.5"):
        Constant(1.5)
    with pytest.raises(ValueError, match="unknown schedule kind 'Cube'"):
        schedule_from_dict({"kind": "Cube"})


def test_old_names_still_work_with_a_deprecation_warning_and_old_states_load():
    import prune
    import prune.schedules as schedules

    with pytest.warns(DeprecationWarning, match="prune.Linear is now LinearRamp"):
        assert prune.Linear is LinearRamp
    with pytest.warns(DeprecationWarning, match="prune.schedules.Cubic is now CubicRamp"):
        assert schedules.Cubic is CubicRamp
    old = {"kind": "Exponential", "initial": 0.0, "final": 0.9, "begin_step": 3, "end_step": 30, "every": 3}
    assert schedule_from_dict(old) == ExponentialRamp(0.0, 0.9, 3, 30, 3)  # a pruner state saved by 0.1
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        prune.Nope  # noqa: B018
    assert "Linear" not in prune.__all__  # nothing that reads like nn.Linear
