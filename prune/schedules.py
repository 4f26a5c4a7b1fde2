"""Sparsity schedules: pure functions of the step number.

A schedule maps a step ``t`` (optimizer steps taken so far) to a target sparsity. Every schedule has
``begin_step`` (warm-up: before it nothing is pruned; at it the target is ``initial``), ``end_step`` (from it
on the target is held at ``final``: cool-down) and ``every`` (the target only changes on steps ``begin_step + k * every`` and at
``end_step``; between those boundaries it is held). Targets never decrease.

Example:
    >>> s = CubicRamp(initial=0.0, final=0.9, begin_step=0, end_step=100, every=10)
    >>> [round(s(t), 4) for t in (0, 5, 10, 50, 100, 1000)]
    [0.0, 0.0, 0.2439, 0.7875, 0.9, 0.9]
    >>> s.is_update_step(20), s.is_update_step(25)
    (True, False)
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from sparse_ops.errors import UserValueError


def _check_sparsity(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise UserValueError(f"{name} must be a sparsity in [0, 1), got {value!r}")


def _check_step(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserValueError(f"{name} must be a non-negative integer step, got {value!r}")


@dataclass(frozen=True)
class Schedule(ABC):
    """Base class: a ramp from ``initial`` to ``final`` between ``begin_step`` and ``end_step``.

    Subclasses only define :meth:`ramp`, the shape of the curve on progress ``p`` in [0, 1].
    """

    initial: float = 0.0
    final: float = 0.5
    begin_step: int = 0
    end_step: int = 0
    every: int = 1

    def __post_init__(self) -> None:
        _check_sparsity("initial sparsity", self.initial)
        _check_sparsity("final sparsity", self.final)
        _check_step("begin_step", self.begin_step)
        _check_step("end_step", self.end_step)
        if self.end_step < self.begin_step:
            raise UserValueError(f"end_step ({self.end_step}) is before begin_step ({self.begin_step})")
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise UserValueError(f"every must be a positive integer number of steps, got {self.every!r}")
        if self.final < self.initial:
            raise UserValueError(f"schedules never decrease: final sparsity {self.final} < initial {self.initial}")

    @abstractmethod
    def ramp(self, p: float) -> float:
        """Fraction of the way from ``initial`` to ``final`` at progress ``p`` in [0, 1]."""

    def _progress(self, step: int) -> float:
        """Progress in [0, 1] at the last update boundary at or before ``step``."""
        if step >= self.end_step:
            return 1.0
        if step < self.begin_step:
            return 0.0
        boundary = self.begin_step + (step - self.begin_step) // self.every * self.every
        return (boundary - self.begin_step) / (self.end_step - self.begin_step)

    def __call__(self, step: int) -> float:
        """Target sparsity after ``step`` optimizer steps."""
        _check_step("step", step)
        if step < self.begin_step:
            return 0.0
        p = self._progress(step)
        if p >= 1.0:
            return float(self.final)
        return float(self.initial + (self.final - self.initial) * self.ramp(p))

    def is_update_step(self, step: int) -> bool:
        """True on the steps where masks are recomputed: ``begin_step + k * every`` up to ``end_step``."""
        if step < self.begin_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.begin_step) % self.every == 0

    def values(self, steps: int | Iterable[int]) -> list[float]:
        """Targets at each step (``range(steps)`` when given an int), e.g. to plot the schedule."""
        return [self(t) for t in (range(steps) if isinstance(steps, int) else steps)]

    def to_dict(self) -> dict[str, object]:
        """Plain description (class name and fields), stored in the pruner's state."""
        return {"kind": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class Constant(Schedule):
    """One-shot: sparsity 0 before ``begin_step``, ``final`` from ``begin_step`` on (``Constant(0.9)``)."""

    final: float = 0.5

    def __init__(self, final: float = 0.5, begin_step: int = 0) -> None:
        object.__setattr__(self, "initial", 0.0)
        object.__setattr__(self, "final", final)
        object.__setattr__(self, "begin_step", begin_step)
        object.__setattr__(self, "end_step", begin_step)
        object.__setattr__(self, "every", 1)
        self.__post_init__()

    def ramp(self, p: float) -> float:
        return 1.0

    def to_dict(self) -> dict[str, object]:
        return {"kind": "Constant", "final": self.final, "begin_step": self.begin_step}


@dataclass(frozen=True)
class LinearRamp(Schedule):
    """s_t = s_i + (s_f - s_i) * p, with p = (t - t0) / (t_end - t0) at update boundaries."""

    def ramp(self, p: float) -> float:
        return p


@dataclass(frozen=True)
class CubicRamp(Schedule):
    """Zhu & Gupta 2017 ("To prune, or not to prune"): s_t = s_f + (s_i - s_f) * (1 - p)^3.

    Prunes fastest early, when redundancy is highest, and slows down near the end. Not to be confused with
    Intel Neural Compressor's "cube" schedule, which prunes *late* (s grows like p^3).
    """

    def ramp(self, p: float) -> float:
        return 1.0 - (1.0 - p) ** 3


@dataclass(frozen=True)
class ExponentialRamp(Schedule):
    """Density decays geometrically: 1 - s_t = (1 - s_i) * ((1 - s_f) / (1 - s_i)) ** p.

    Every update removes the same *fraction* of the remaining weights.
    """

    def ramp(self, p: float) -> float:
        d_i, d_f = 1.0 - self.initial, 1.0 - self.final
        if self.final == self.initial:
            return 1.0
        density = d_i * math.exp(p * math.log(d_f / d_i))
        return (d_i - density) / (d_i - d_f)


SCHEDULES: dict[str, type[Schedule]] = {c.__name__: c for c in (Constant, LinearRamp, CubicRamp, ExponentialRamp)}
# The names before 0.2 (`Linear` read like nn.Linear): still importable with a DeprecationWarning, and the kinds
# of pruner states saved under them still load.
RENAMED = {"Linear": "LinearRamp", "Cubic": "CubicRamp", "Exponential": "ExponentialRamp"}


def deprecated_name(module: str, name: str) -> type[Schedule]:
    """The schedule an old name stands for, with a DeprecationWarning; AttributeError for any other name."""
    if name not in RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    import warnings

    warnings.warn(f"{module}.{name} is now {RENAMED[name]}", DeprecationWarning, stacklevel=3)
    return SCHEDULES[RENAMED[name]]


def __getattr__(name: str) -> type[Schedule]:
    return deprecated_name(__name__, name)


def schedule_from_dict(d: dict[str, object]) -> Schedule:
    """Inverse of :meth:`Schedule.to_dict`.

    Example:
        >>> schedule_from_dict(LinearRamp(0.0, 0.5, 0, 10).to_dict()) == LinearRamp(0.0, 0.5, 0, 10)
        True
    """
    fields = dict(d)
    kind = fields.pop("kind", None)
    kind = RENAMED.get(kind, kind)  # type: ignore[arg-type]
    if kind not in SCHEDULES:
        raise UserValueError(f"unknown schedule kind {kind!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[kind](**fields)  # type: ignore[arg-type]
