"""Mask math: pure functions from scores to bool masks (``True`` = keep).

Counts are exact: pruning a tensor to sparsity ``s`` zeroes ``round(s * numel)`` entries. Ties are broken
deterministically: among equal scores, the entry with the lower flat index is kept (globally: earlier layer
first, then lower index).

Example:
    >>> import torch
    >>> layer_mask(torch.tensor([[3.0, 1.0, 2.0, 1.0]]), 0.5)
    tensor([[ True, False,  True, False]])
    >>> nm_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]]), 2, 4)
    tensor([[ True,  True, False, False,  True,  True, False, False]])
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_ops.errors import UserValueError


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` nonzeros in every group of ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str) -> NMPattern | None:
    """``"unstructured"`` -> None; ``"N:M"`` with 0 < N < M -> NMPattern; anything else raises ValueError."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise UserValueError(f"unknown pattern {pattern!r}; use 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4')")
    return NMPattern(int(match[1]), int(match[2]))


def num_pruned(sparsity: float, numel: int) -> int:
    """How many entries sparsity ``s`` zeroes in a tensor of ``numel`` entries: ``round(s * numel)``."""
    return int(round(sparsity * numel))


def prune_lowest(scores: Tensor, n_prune: int) -> Tensor:
    """Mask that drops the ``n_prune`` lowest scores; among ties the lower flat index is kept.

    O(numel): one selection, one comparison, and a pass over the entries tied at the threshold if any.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= n_prune <= n:
        raise UserValueError(f"cannot prune {n_prune} of {n} entries")
    if n_prune == 0 or n_prune == n:
        return torch.full(scores.shape, n_prune == 0, dtype=torch.bool, device=scores.device)
    threshold = kth_smallest(flat, n_prune)
    keep = flat > threshold
    n_tied_to_keep = n - n_prune - int(torch.count_nonzero(keep))
    if n_tied_to_keep:  # entries equal to the threshold: keep the lowest flat indices
        tied = torch.nonzero(flat == threshold).squeeze(1)  # ascending
        keep[tied[:n_tied_to_keep]] = True
    return keep.view(scores.shape)


def kth_smallest(flat: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest entry (1-based) of a 1-D tensor, exactly.

    ``torch.kthvalue`` is single-threaded and 2-3x slower than this on a million entries or more, so large inputs first
    bracket the answer with quantiles of a fixed-seed sample, count what lies below the bracket in one
    vectorised pass, and select inside the (small) bracket. Falls back to ``kthvalue`` if the bracket misses.
    """
    n = flat.numel()
    if n <= _EXACT_SELECT_MAX:
        return torch.kthvalue(flat, k).values
    gen = torch.Generator().manual_seed(0)
    sample = flat[torch.randint(n, (_SAMPLE,), generator=gen).to(flat.device)].sort().values
    q, margin = k / n, 6.0 * math.sqrt(max(k / n * (1 - k / n), 1.0 / _SAMPLE) / _SAMPLE)
    i_lo, i_hi = int((q - margin) * _SAMPLE), int((q + margin) * _SAMPLE)
    lo = sample[i_lo] if i_lo >= 0 else flat.new_tensor(-math.inf)
    hi = sample[i_hi] if i_hi < _SAMPLE else flat.new_tensor(math.inf)
    n_below = int(torch.count_nonzero(flat < lo))
    inside = flat[(flat >= lo) & (flat <= hi)]
    if n_below < k <= n_below + inside.numel():
        return torch.kthvalue(inside, k - n_below).values
    return torch.kthvalue(flat, k).values


_EXACT_SELECT_MAX = 1 << 17  # below this, kthvalue (quickselect) beats the sampled bracket
_SAMPLE = 1 << 14


def layer_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep the top ``1 - sparsity`` of one tensor's scores (exactly ``round(s * numel)`` zeros)."""
    return prune_lowest(scores, num_pruned(sparsity, scores.numel()))


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep the top ``1 - sparsity`` of every row (last dim) of ``scores``: each row gets exactly
    ``round(s * in)`` zeros; ties keep the lower index. ``scores``: (rows, in).

    >>> row_mask(torch.tensor([[1.0, 3.0, 2.0, 2.0], [4.0, 0.0, 0.0, 1.0]]), 0.5).int().tolist()
    [[0, 1, 1, 0], [1, 0, 0, 1]]
    """
    inp = scores.shape[-1]
    keep = inp - num_pruned(sparsity, inp)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` along the last dim; ties keep the lower index.

    ``scores``: (..., in) with ``in % m == 0``.
    """
    if scores.shape[-1] % m:
        raise UserValueError(f"input size {scores.shape[-1]} is not a multiple of M={m}")
    groups = scores.reshape(-1, m)  # (G, M)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]  # (G, N)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return keep.view(scores.shape)


def nm_schedule_mask(scores: Tensor, pattern: NMPattern, sparsity: float) -> Tensor:
    """Gradual N:M: prune ``round(s * numel)`` of the entries the N:M mask would drop, lowest first.

    At ``sparsity == pattern.sparsity`` this is exactly the N:M mask; below it, a subset of its zeros.
    ``scores``: (..., in), the input dimension last.
    """
    if sparsity > pattern.sparsity + 1e-12:
        raise UserValueError(f"sparsity {sparsity} exceeds what pattern {pattern} allows ({pattern.sparsity})")
    nm = nm_mask(scores, pattern.n, pattern.m)
    ranked = torch.where(nm, torch.full_like(scores, float("inf")), scores)
    n_prune = min(num_pruned(sparsity, scores.numel()), int(torch.count_nonzero(~nm)))
    return prune_lowest(ranked, n_prune)


def global_masks(flat: Tensor, sizes: Sequence[int], sparsity: float, max_layer_sparsity: float | None = None, *,
                 lowest: Callable[[Tensor, list[int], int], Tensor] | None = None,
                 count: Callable[[list[int]], list[int]] | None = None) -> list[Tensor]:
    """One threshold over several tensors' scores: exactly ``round(s * total)`` zeros in total.

    ``flat`` holds the tensors' scores end to end (``sizes`` long each), so the caller can fill one buffer
    instead of keeping every tensor's scores *and* their concatenation. Returns one flat mask per tensor.
    With ``max_layer_sparsity``, no tensor is pruned beyond it: capped tensors get exactly their cap and the
    rest of the budget goes to the others by a new common threshold (repeated until no tensor exceeds its cap).
    ``lowest(pool, sizes, n)`` (the mask pruning the ``n`` lowest of ``pool``) and ``count(per_tensor)`` (totals
    of per-tensor counts) default to this process's; sharded callers pass collective ones
    (:mod:`prune.sharded_masks`), where ``flat`` is this rank's part of every tensor.

    Example:
        >>> [m.tolist() for m in global_masks(torch.tensor([1.0, 5.0, 2.0, 3.0]), [2, 2], 0.5)]
        [[False, True], [False, True]]
    """
    lowest = lowest or (lambda pool, _sizes, n: prune_lowest(pool, n))
    count = count or list
    if flat.numel() != sum(sizes):
        raise UserValueError(f"scores hold {flat.numel()} entries but sizes add up to {sum(sizes)}")
    parts = flat.split(list(sizes))
    totals = count(list(sizes))  # whole tensors' numel
    budget = num_pruned(sparsity, sum(totals))
    cap = [int(max_layer_sparsity * n) if max_layer_sparsity is not None else n for n in totals]
    if budget > sum(cap):
        raise UserValueError(f"sparsity {sparsity} is unreachable with max_layer_sparsity={max_layer_sparsity}: "
                         f"at most {sum(cap) / sum(totals):.4f} of the weights may be pruned")
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(sizes)) if i not in capped]
        n_free = budget - sum(cap[i] for i in capped)
        pool = flat if not capped else torch.cat([parts[i] for i in free]) if free else flat[:0]
        kept = lowest(pool, [sizes[i] for i in free], n_free).split([sizes[i] for i in free])
        pruned = count([sizes[i] - int(torch.count_nonzero(k)) for i, k in zip(free, kept)])
        over = {i for i, p in zip(free, pruned) if p > cap[i]}
        if not over:
            break
        capped |= over
    masks: list[Tensor] = [flat[:0].bool()] * len(sizes)
    for i, k in zip(free, kept):
        masks[i] = k
    for i in sorted(capped):
        masks[i] = lowest(parts[i], [sizes[i]], cap[i])
    return masks


SCOPES = ("layer", "row", "global")  # what a Pruner's scope= may be (weight_mask takes the first two)


def check_scope(scope: str, nm: NMPattern | None, max_layer_sparsity: float | None) -> str:
    """``scope`` if it is one of :data:`SCOPES` and fits the N:M pattern and ``max_layer_sparsity``; else a
    ValueError naming the value and what is allowed.

    >>> check_scope("global", None, 0.9)
    'global'
    """
    if scope not in SCOPES:
        raise UserValueError(f"unknown scope {scope!r}; choose one of {list(SCOPES)}")
    if nm is not None and scope != "layer":
        raise UserValueError(f"scope {scope!r} does not apply to N:M pattern {nm} (every group keeps {nm.n} of "
                         f"{nm.m}); use scope='layer'")
    if max_layer_sparsity is not None:
        if scope != "global":
            raise UserValueError("max_layer_sparsity only applies to scope='global'")
        if not 0.0 < max_layer_sparsity <= 1.0:
            raise UserValueError(f"max_layer_sparsity must be in (0, 1], got {max_layer_sparsity!r}")
    return scope


def weight_mask(scores: Tensor, sparsity: float, *, scope: str = "layer", nm: NMPattern | None = None,
                in_dim: int = 1) -> Tensor:
    """The mask of one weight from its scores: ``scope="layer"`` (the whole tensor to ``sparsity``), ``"row"``
    (every row along the input dimension to it), or the N:M pattern ``nm`` (gradually, ``nm_schedule_mask``).

    >>> weight_mask(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0.5, scope="row").tolist()
    [[False, True], [False, True]]
    """
    if nm is None and scope == "layer":
        return layer_mask(scores, sparsity)
    rows = input_last(scores, in_dim)
    rows = row_mask(rows, sparsity) if nm is None else nm_schedule_mask(rows, nm, sparsity)
    return from_input_last(rows, scores.shape, in_dim)


def input_last(t: Tensor, in_dim: int) -> Tensor:
    """View a weight as (rows, in) with its input dimension last, e.g. a conv's (out, in, kh, kw) -> (out*kh*kw, in)."""
    return t.movedim(in_dim, -1).reshape(-1, t.shape[in_dim])


def from_input_last(t2d: Tensor, shape: torch.Size, in_dim: int) -> Tensor:
    """Inverse of :func:`input_last` for a tensor of the original ``shape``."""
    moved = list(shape)
    moved.append(moved.pop(in_dim))
    return t2d.reshape(moved).movedim(-1, in_dim)
