"""Parameter counts shared by the sparse-family layers: what a layer holds against what one token touches."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamCounts:
    """``total`` parameters stored; ``active`` parameters one token's forward pass reads (eval mode).

    Example:
        >>> ParamCounts(total=10, active=4).active_fraction
        0.4
    """

    total: int
    active: int

    @property
    def active_fraction(self) -> float:
        return self.active / self.total if self.total else 0.0
