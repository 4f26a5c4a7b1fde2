"""Pruning criteria by name: every module of this package that defines ``CRITERION`` (see
:mod:`prune.criteria.base` for the interface; a new criterion is one new file here).

- ``magnitude``: |W| (``magnitude.py``).
- ``movement``: accumulated ``-W * dL/dW' + saliency * |W * dL/dW'|`` in units of its noise, plus a magnitude
  prior (``movement.py``).
- ``obert``: ``W^2 / (2 [F^-1]_qq)`` from a block-diagonal empirical Fisher, and after each mask update the
  Optimal Brain Surgeon step on the kept weights (``obert.py``).
- ``taylor``: accumulated ``(W * dL/dW')^2``, a first-order / Fisher saliency, plus a magnitude prior (``taylor.py``).
- ``wanda``: |W| times the input feature's L2 norm (``wanda.py``).

Scores are float32 whatever the weight's dtype. NaN scores are an error (the pruner names the layer); an
infinite weight has an infinite magnitude and is kept.

Example:
    >>> sorted(CRITERIA)
    ['magnitude', 'movement', 'obert', 'taylor', 'wanda']
    >>> get_criterion("magnitude").uses_gradients
    False
"""
from __future__ import annotations

import importlib
import pkgutil

import torch
from torch import Tensor

from prune.criteria.base import Criterion, Evidence
from sparse_ops.errors import UserValueError


def _discover() -> dict[str, Criterion]:
    found: dict[str, Criterion] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in ("base", "signal"):
            continue
        criterion = getattr(importlib.import_module(f"{__name__}.{info.name}"), "CRITERION", None)
        if isinstance(criterion, Criterion):
            found[criterion.name] = criterion
    return found


CRITERIA: dict[str, Criterion] = _discover()


def get_criterion(name: str | Criterion) -> Criterion:
    """A criterion by name (or the instance itself); unknown names raise ``ValueError`` listing the known ones."""
    if isinstance(name, Criterion):
        return name
    if name not in CRITERIA:
        raise UserValueError(f"unknown criterion {name!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]


def has_nan(scores: Tensor) -> bool:
    """True when any score is NaN (the pruner then refuses to choose a mask)."""
    return bool(torch.isnan(scores).any())


__all__ = ["CRITERIA", "Criterion", "Evidence", "get_criterion", "has_nan"]
