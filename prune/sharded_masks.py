"""Mask math over scores sharded across ranks (FSDP2): bit for bit the masks :mod:`prune.masks` computes on the
whole tensors, without any rank holding another rank's scores.

Every rank passes its local scores. A tensor's shards are consecutive ranges of its flat (row-major) entries, in
rank order: FSDP2 shards dim 0 (the output rows), rank ``r`` holding chunk ``r``. Counts and ties follow
``prune.masks``: ``round(s * numel)`` zeros over the whole tensor (or over all tensors for global scope), and
among scores equal to the threshold the lower global index is kept (earlier tensor first, then lower flat index).

The k-th smallest score over all ranks is found by radix selection on order-preserving int32 keys of the float32
scores: 4 rounds, each one all-reduce of a 256-bin histogram of the next byte among the entries that match the
bytes found so far. Ties at the threshold are then shared out from an all-gather of per-(tensor, rank) counts.
Every function here is a collective: all ranks of ``group`` call it with the same arguments but their scores.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from prune import masks as _masks
from prune.masks import NMPattern, from_input_last, input_last, nm_mask, num_pruned, row_mask
from sparse_ops.errors import UserValueError

_SIGN = -(2**31)  # int32 with only the sign bit set
_BYTE_SHIFTS = (24, 16, 8, 0)


def sortable_keys(flat: Tensor) -> Tensor:
    """int32 keys ordered like the float32 values (``-0.0`` counted as ``0.0``); NaN must be excluded beforehand.

    >>> sortable_keys(torch.tensor([-2.0, -0.0, 0.0, 1.5, float("inf")])).argsort().tolist()
    [0, 1, 2, 3, 4]
    """
    bits = (flat.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negatives: larger magnitude -> smaller key


def sum_over_ranks(values: Sequence[int], group: object | None, device: torch.device) -> list[int]:
    """Element-wise sum of integers over the ranks of ``group``."""
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def kth_smallest_key(keys: Tensor, k: int, group: object | None) -> int:
    """The ``k``-th smallest (1-based) of the keys of all ranks, by radix selection one byte at a time."""
    candidates = keys.reshape(-1) ^ _SIGN  # sign bit flipped: the bytes read as unsigned compare like the keys
    unsigned = 0
    for shift in _BYTE_SHIFTS:
        digits = (candidates >> shift) & 255  # (n,) the next byte of every candidate
        hist = torch.bincount(digits, minlength=256)
        dist.all_reduce(hist, group=group)
        below = hist.cumsum(0)
        byte = int(torch.searchsorted(below, torch.tensor(k, device=below.device)))  # first bin reaching k
        k -= int(below[byte - 1]) if byte else 0
        unsigned |= byte << shift
        candidates = candidates[digits == byte]
    return unsigned + _SIGN  # back from the unsigned reading to the int32 key


def prune_lowest(flat: Tensor, sizes: Sequence[int], n_prune: int, group: object | None) -> Tensor:
    """Sharded :func:`prune.masks.prune_lowest`: drop the ``n_prune`` lowest scores of all ranks.

    ``flat`` holds this rank's parts of one or more tensors end to end (``sizes`` long each). Ties keep the lower
    global index: tensor by tensor, and within a tensor rank by rank. Returns this rank's flat keep mask.
    """
    if flat.numel() != sum(sizes):
        raise UserValueError(f"scores hold {flat.numel()} entries but sizes add up to {sum(sizes)}")
    (n,) = sum_over_ranks([flat.numel()], group, flat.device)
    if not 0 <= n_prune <= n:
        raise UserValueError(f"cannot prune {n_prune} of {n} entries")
    if n_prune == 0 or n_prune == n:
        return torch.full((flat.numel(),), n_prune == 0, dtype=torch.bool, device=flat.device)
    keys = sortable_keys(flat.reshape(-1))
    threshold = kth_smallest_key(keys, n_prune, group)
    keep = keys > threshold
    (n_above,) = sum_over_ranks([int(torch.count_nonzero(keep))], group, flat.device)
    n_tied_to_keep = n - n_prune - n_above
    if n_tied_to_keep:
        _keep_first_ties(keep, keys == threshold, sizes, n_tied_to_keep, group)
    return keep


def _keep_first_ties(keep: Tensor, tied: Tensor, sizes: Sequence[int], n_keep: int, group: object | None) -> None:
    """Set ``keep`` on the ``n_keep`` tied entries of lowest global index (tensor-major, then rank, then index)."""
    local = torch.stack([torch.count_nonzero(part) for part in tied.split(list(sizes))]).to(torch.int64)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, local, group=group)
    counts = torch.stack(everyone).tolist()  # (world, tensors)
    rank = dist.get_rank(group)
    for i, (part_keep, part_tied) in enumerate(zip(keep.split(list(sizes)), tied.split(list(sizes)))):
        before = sum(sum(row[:i]) for row in counts) + sum(row[i] for row in counts[:rank])
        allowed = max(0, min(n_keep - before, counts[rank][i]))
        if allowed:
            part_keep[torch.nonzero(part_tied).squeeze(1)[:allowed]] = True


def layer_mask(scores: Tensor, sparsity: float, group: object | None) -> Tensor:
    """Sharded :func:`prune.masks.layer_mask`: the whole (sharded) tensor gets ``round(s * numel)`` zeros."""
    (n,) = sum_over_ranks([scores.numel()], group, scores.device)
    return prune_lowest(scores.reshape(-1), [scores.numel()], num_pruned(sparsity, n), group).view(scores.shape)


def nm_schedule_mask(rows: Tensor, pattern: NMPattern, sparsity: float, group: object | None) -> Tensor:
    """Sharded :func:`prune.masks.nm_schedule_mask`; ``rows``: (rows, in), whole rows on each rank, so every
    group of M is local and only the count of the gradual prune is shared."""
    if sparsity > pattern.sparsity + 1e-12:
        raise UserValueError(f"sparsity {sparsity} exceeds what pattern {pattern} allows ({pattern.sparsity})")
    nm = nm_mask(rows, pattern.n, pattern.m)
    ranked = torch.where(nm, torch.full_like(rows, float("inf")), rows)
    numel, n_free = sum_over_ranks([rows.numel(), int(torch.count_nonzero(~nm))], group, rows.device)
    keep = prune_lowest(ranked.reshape(-1), [ranked.numel()], min(num_pruned(sparsity, numel), n_free), group)
    return keep.view(rows.shape)


def weight_mask(scores: Tensor, sparsity: float, *, scope: str = "layer", nm: NMPattern | None = None,
                in_dim: int = 1, group: object | None = None) -> Tensor:
    """Sharded :func:`prune.masks.weight_mask` for a weight sharded along dim 0; ``scope="row"`` and N:M need
    whole input rows on each rank (``in_dim != 0``)."""
    if nm is None and scope == "layer":
        return layer_mask(scores, sparsity, group)
    if in_dim == 0:
        raise UserValueError(f"scope={scope!r} / pattern {nm} need the input dimension unsharded, but it is dim 0, the "
                         "one FSDP2 shards")
    rows = input_last(scores, in_dim)
    rows = row_mask(rows, sparsity) if nm is None else nm_schedule_mask(rows, nm, sparsity, group)
    return from_input_last(rows, scores.shape, in_dim)


def global_masks(flat: Tensor, sizes: Sequence[int], sparsity: float, max_layer_sparsity: float | None = None,
                 group: object | None = None) -> list[Tensor]:
    """Sharded :func:`prune.masks.global_masks`: ``flat`` holds this rank's parts of the tensors (``sizes`` long
    each); one threshold over all of every rank's scores, the same cap rule. Returns this rank's flat masks."""
    return _masks.global_masks(flat, sizes, sparsity, max_layer_sparsity,
                               lowest=lambda pool, part_sizes, n: prune_lowest(pool, part_sizes, n, group),
                               count=lambda values: sum_over_ranks(values, group, flat.device))


@dataclass(frozen=True)
class ShardedMaskMath:
    """``weight_mask`` and ``global_masks`` bound to the process group of the shards: what the pruner calls
    (with the signatures of :mod:`prune.masks`) when its weights are FSDP2 shards."""

    group: object | None = None

    def weight_mask(self, scores: Tensor, sparsity: float, *, scope: str = "layer", nm: NMPattern | None = None,
                    in_dim: int = 1) -> Tensor:
        return weight_mask(scores, sparsity, scope=scope, nm=nm, in_dim=in_dim, group=self.group)

    def global_masks(self, flat: Tensor, sizes: Sequence[int], sparsity: float,
                     max_layer_sparsity: float | None = None) -> list[Tensor]:
        return global_masks(flat, sizes, sparsity, max_layer_sparsity, group=self.group)
