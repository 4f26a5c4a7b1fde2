"""Was the machine busy while we measured? What the plan and ``prune bench`` check before they trust a timing.

Two signs, read over the window of a measurement (``Watch``):

- **other processes' CPU time**: the machine's busy time (``/proc/stat``: user, system, irq, steal) less this
  process's own CPU time, as a share of the window's wall time times the cores. Beside one process keeping
  both cores of a 2-core machine busy it reads about 0.5; an idle machine reads a few percent.
- **slow waits**: parallel kernel calls whose caller waited for a descheduled thread of ours
  (``cpp.thread_stats``, ``csrc/work_pool.h``): the kernels then move to their work pool or to one thread,
  and a time measured meanwhile is not the quiet machine's.

Other processes' share above ``OTHER_SHARE_BUSY`` marks the window busy (``Load.busy``); in a window too short
for ``/proc/stat`` (``MIN_WINDOW_S``), or off Linux, two slow waits do (a quiet machine has one now and then:
six in a 55 s benchmark on the 2-core EPYC). A plan choice measured busy is timed once more,
kept with its mark, and measured again by the next process (``SparseLinear._plan``); the benchmarks print
``Load.advice()``: a choice made beside a competing process is that moment's, not the machine's.

Example:
    >>> with Watch() as w:
    ...     _ = sum(range(1000))
    >>> isinstance(w.load.busy, bool)
    True
    >>> Load(wall_s=1.0, other_share=0.52, slow_waits=0).busy, Load(wall_s=55.0, other_share=0.01, slow_waits=6).busy
    (True, False)
    >>> Load(wall_s=0.05, other_share=None, slow_waits=2).busy
    True
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from sparse_ops.kernels import cpp

OTHER_SHARE_BUSY = 0.2  # other processes used more than this share of all cores
# /proc/stat counts in ticks of 1/100 s: a window shorter than this cannot tell 20% from nothing
MIN_WINDOW_S = 0.1


def _machine_busy_s() -> float | None:
    """Seconds of CPU time the whole machine has been busy since boot (all cores), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]  # user nice system idle iowait irq softirq steal ...
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Load:
    """What a window of measurement saw: its length, the share of all cores other processes used, and our
    kernels' slow waits."""

    wall_s: float
    other_share: float | None  # None: not measurable (a short window, or no /proc/stat)
    slow_waits: int

    @property
    def busy(self) -> bool:
        if self.other_share is None:
            return self.slow_waits >= 2
        return self.other_share > OTHER_SHARE_BUSY

    def describe(self) -> str:
        """One line: what made the window busy (or that it was quiet).

        >>> Load(2.0, 0.48, 5).describe()
        'other processes used 48% of the cores; 5 kernel calls waited for a descheduled thread'
        """
        parts = [] if self.other_share is None else [f"other processes used {self.other_share:.0%} of the cores"]
        if self.slow_waits:
            parts.append(f"{self.slow_waits} kernel call{'s' * (self.slow_waits > 1)} waited for a descheduled "
                         f"thread")
        return "; ".join(parts)

    def advice(self) -> str:
        """The warning a benchmark prints for a busy window.

        >>> print(Load(2.0, 0.5, 0).advice())
        the machine was busy while this ran (other processes used 50% of the cores): times and choices are that moment's; rerun on an idle machine, or compare with --threads 1, which cannot wait for a descheduled thread
        """
        return (f"the machine was busy while this ran ({self.describe()}): times and choices are that moment's; "
                "rerun on an idle machine, or compare with --threads 1, which cannot wait for a descheduled thread")

    def to_dict(self) -> dict[str, object]:
        share = None if self.other_share is None else round(self.other_share, 3)
        return {"wall_s": round(self.wall_s, 3), "other_share": share, "slow_waits": self.slow_waits,
                "busy": self.busy}


class Watch:
    """A context manager measuring the ``Load`` of its block (``.load`` after it exits)."""

    def __enter__(self) -> Watch:  # noqa: PYI034 (Self needs 3.11)
        self._start = (time.perf_counter(), time.process_time(), _machine_busy_s(), cpp.thread_stats())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, cpu0, machine0, stats0 = self._start
        wall, cpu, machine = time.perf_counter() - wall0, time.process_time() - cpu0, _machine_busy_s()
        share = None
        if machine is not None and machine0 is not None and wall >= MIN_WINDOW_S:
            share = max(0.0, (machine - machine0 - cpu) / (wall * (os.cpu_count() or 1)))
        self.load = Load(wall, share, cpp.thread_stats().since(stats0).slow_waits)
