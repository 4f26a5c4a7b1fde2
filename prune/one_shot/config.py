"""``OneShotConfig``: every option of a one-shot run, checked in one place when it is made. ``oneshot()``,
``oneshot_folder``, ``prune oneshot`` (its flags named as the fields) and recipes (their ``oneshot`` table:
``prune.recipe.oneshot_config``) all take one. Importing this module does not load torch.

Example:
    >>> OneShotConfig(method="wanda", pattern="2:4").resolved()
    (NMPattern(n=2, m=4), 0.5, 'row')
    >>> OneShotConfig(method="obs")
    Traceback (most recent call last):
    ...
    sparse_ops.errors.UserValueError: unknown method 'obs'; choose one of ['sparsegpt', 'wanda', 'magnitude']
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparse_ops.errors import UserValueError

if TYPE_CHECKING:  # prune.masks loads torch: not at import, so that the CLI reads the defaults cheaply
    from prune.masks import NMPattern

METHODS = ("sparsegpt", "wanda", "magnitude")
PROFILES = ("uniform", "owl")
SCOPES = ("layer", "row")
DEFAULT_SCOPE = {"sparsegpt": None, "wanda": "row", "magnitude": "layer"}


@dataclass(frozen=True)
class OneShotConfig:
    """What to prune and how (see :func:`prune.oneshot` for each option's meaning). ``sparsity`` None means 0.5,
    or ``1 - N/M`` with an N:M ``pattern``; ``scope`` None the method's default (``resolved()``)."""

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str = "unstructured"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] = ()
    profile: str = "uniform"
    scope: str | None = None
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    block_size: int = 128
    damp: float = 0.01
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    sequential: bool = False
    errors: bool = True
    bits: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.resolved()  # every check, at creation
        if self.bits not in (None, 8):
            raise UserValueError(f"bits must be None or 8, got {self.bits!r}")
        if not (self.damp >= 0 and self.block_size >= 1):
            raise UserValueError(f"damp must be >= 0 and block_size >= 1, got damp={self.damp}, "
                                 f"block_size={self.block_size}")

    def resolved(self) -> tuple[NMPattern | None, float, str | None]:
        """(N:M pattern or None, the sparsity per layer, the scope) these options mean; UserValueError naming a
        bad one."""
        from prune.masks import parse_pattern

        if self.method not in METHODS:
            raise UserValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if self.profile not in PROFILES:
            raise UserValueError(f"unknown profile {self.profile!r}; choose one of {list(PROFILES)}")
        nm, sparsity = parse_pattern(self.pattern), self.sparsity
        if nm is not None:
            if sparsity is not None and abs(sparsity - nm.sparsity) > 1e-9:
                raise UserValueError(f"pattern {nm} means sparsity {nm.sparsity}, got sparsity={sparsity}")
            if self.profile != "uniform":
                raise UserValueError(f"profile {self.profile!r} varies sparsity per block, which pattern {nm} "
                                     "fixes; use profile='uniform'")
            sparsity = nm.sparsity
        sparsity = 0.5 if sparsity is None else sparsity
        if not 0.0 <= sparsity < 1.0:
            raise UserValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if self.scope is not None and (self.method == "sparsegpt" or self.scope not in SCOPES):
            allowed = "none (SparseGPT chooses per column block)" if self.method == "sparsegpt" else list(SCOPES)
            raise UserValueError(f"scope {self.scope!r} does not apply to method {self.method!r}; allowed: {allowed}")
        return nm, sparsity, self.scope or DEFAULT_SCOPE[self.method]
