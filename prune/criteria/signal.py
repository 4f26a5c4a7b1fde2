"""When gradient scores carry signal, and how they are put on one scale with a magnitude prior.

A gradient criterion sums one increment per backward into a score ``S`` and the squares of the increments into
``energy`` (``Evidence.energy``). If the increments were zero-mean noise, ``S`` is a random walk and
``||S||^2 ~= energy``; a consistent direction over T steps gives up to ``T * energy``. So
``signal_ratio = ||S||^2 / energy`` is ~1 for noise and grows with signal, and ``S / sqrt(energy / numel)``
(the scores in units of their noise, RMS ``sqrt(signal_ratio)``) is comparable across layers and runs.

A model that starts at its optimum (a pretrained model distilled to itself, or fine-tuned from a converged
checkpoint) has exactly zero gradients until something is pruned: ``energy == 0``, every score ties, and a
top-k would keep the lowest flat indices: pruning by position. :func:`with_prior` never lets that happen: it
adds ``prior * |W| / rms(W)`` to the noise-normalised scores, so where the scores are noise (or zero) magnitude
decides, and where they carry signal (RMS ``sqrt(ratio) >> prior``) the gradient does.

Example:
    >>> import torch
    >>> w = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    >>> with_prior(torch.zeros(1, 4), w, energy=0.0, prior=1.0).argsort(descending=True).tolist()  # no signal
    [[0, 2, 1, 3]]
    >>> signal_ratio(torch.tensor([4.0, 0.0]), energy=4.0)  # two increments of 2 in the same direction
    4.0
"""
from __future__ import annotations

import math
import warnings

from torch import Tensor

from sparse_ops.errors import UserValueError

MIN_SIGNAL = 2.0  # below this signal_ratio the scores are mostly noise: warn that magnitude decides


def signal_ratio(score: Tensor, energy: float | None) -> float:
    """``||S||^2 / energy``: ~1 for a random walk, up to T after T consistent steps; 0 without gradients.

    ``energy`` None (unknown, e.g. a state saved before it was recorded) counts as one random walk (1.0)."""
    total = float(score.double().square().sum())
    if energy is None:
        return 1.0 if total > 0 else 0.0
    return total / energy if energy > 0 else 0.0


def magnitude_unit(weight: Tensor) -> Tensor:
    """``|W| / rms(W)``: float32 magnitudes on a per-layer scale (RMS 1), so layers compare under global scope."""
    w = weight.detach().float().abs()
    rms = float(w.square().mean().sqrt())
    return w / rms if rms > 0 else w


def with_prior(score: Tensor, weight: Tensor, energy: float | None, prior: float) -> Tensor:
    """Noise-normalised gradient scores plus ``prior`` times the unit magnitude (see the module docstring).

    ``score / sqrt(energy / numel) + prior * |W| / rms(W)``; with no gradient energy at all, the magnitude only.
    """
    if not prior >= 0 or math.isinf(prior):
        raise UserValueError(f"prior must be a finite number >= 0, got {prior!r}")
    mag = magnitude_unit(weight)
    total = float(score.double().square().sum())
    noise_sq = (energy if energy is not None else total) / score.numel()
    if noise_sq <= 0 or total == 0:
        return mag
    return score.float() / math.sqrt(noise_sq) + prior * mag


def warn_if_uninformative(name: str, score: Tensor, energy: float | None) -> bool:
    """Warn (once per criterion) when the scores are mostly noise or zero, so that the magnitude prior decides.

    Returns whether they were."""
    ratio = signal_ratio(score, energy)
    if ratio >= MIN_SIGNAL:
        return False
    warnings.warn(f"criterion {name!r}: the gradient scores carry no signal yet (||S||^2 / energy < {MIN_SIGNAL}; "
                  "~0 means (near) zero gradients, as when a model starts at its optimum), so this "
                  "mask update ranks the layer by magnitude; later updates use the gradients once they carry "
                  "signal. From an optimum (a converged model, or one distilled to itself) signed movement scores "
                  "alone (saliency=0) measure only the compensation for what is pruned and do worse than "
                  "magnitude (docs/quality.md, 'Which criterion while training').",
                  UninformativeScores, stacklevel=2)
    return True


class UninformativeScores(UserWarning):
    """A mask update whose gradient scores were noise or zero: magnitude decided it."""


__all__ = ["MIN_SIGNAL", "UninformativeScores", "magnitude_unit", "signal_ratio", "warn_if_uninformative",
           "with_prior"]
