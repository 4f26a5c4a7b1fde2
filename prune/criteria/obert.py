"""``obert``: the Optimal BERT Surgeon (Kurtic et al. 2022), second-order pruning with a weight update.

Around a trained optimum the loss grows by ``0.5 * dW^T F dW`` (``F``: the empirical Fisher, the mean of
``g g^T`` over gradients ``g``). Removing weight ``q`` and letting the others make up for it costs
``rho_q = w_q^2 / (2 [F^-1]_qq)`` (the score; higher is kept), and the best compensation when a set ``Q`` is
removed is the Optimal Brain Surgeon step ``dW = -F^-1 E_Q^T (E_Q F^-1 E_Q^T)^-1 E_Q W``, applied to the kept
weights after each mask update (``update``).

As in the paper, ``F`` is block-diagonal: the weight is flattened (row-major) and cut into blocks of ``block``
consecutive entries (the last one zero-padded), each with its own ``block x block`` Fisher. The running score is
that Fisher, ``sum g_b g_b^T`` over every backward since the pruner was attached: ``4 * block`` bytes per weight
(128 at the default 32). Weights already pruned are held at zero, so each update inverts the Fisher of the kept
weights only (``F_SS + lambda I``), with ``lambda = damp * mean(diag F_SS)`` over the layer: ``damp`` guards
against the few gradients a short run sees. Pruned weights do not regrow. Not supported under FSDP2.

Example:
    >>> import torch
    >>> from prune.criteria.base import Evidence
    >>> fisher = torch.tensor([[[4.0, 0.0], [0.0, 1.0]]])  # one block: the first weight's loss is 4x as steep
    >>> OBert(block=2, damp=0.0).score(torch.tensor([1.0, 1.0]), Evidence(accumulated=fisher))
    tensor([2.0000, 0.5000])
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.criteria.base import Criterion, Evidence
from prune.criteria.signal import UninformativeScores, magnitude_unit
from sparse_ops.errors import UserValueError


@dataclass(frozen=True)
class OBert(Criterion):
    """``block``: entries per Fisher block (memory ``4 * block`` bytes per weight); ``damp``: the dampening,
    a fraction of the mean diagonal of the kept weights' Fisher, added to its diagonal before inverting."""

    block: int = 32
    damp: float = 0.01
    name = "obert"
    uses_gradients = True
    updates_weights = True
    increment_degree = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.block, int) and not isinstance(self.block, bool) and self.block >= 1):
            raise UserValueError(f"obert block must be an integer >= 1, got {self.block!r}")
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < float("inf")):
            raise UserValueError(f"obert damp must be a finite number >= 0, got {self.damp!r}")

    # -- the running Fisher ----------------------------------------------------------------------------------
    def new_score(self, weight: Tensor, in_dim: int) -> Tensor:
        blocks = -(-weight.numel() // self.block)
        return torch.zeros(blocks, self.block, self.block, dtype=torch.float32, device=weight.device)

    def accumulate(self, score: Tensor, energy: Tensor, weight: Tensor, grad_masked: Tensor, world: int) -> None:
        g = self._blocks(grad_masked.float())
        if world > 1:  # degree 2: the ranks' mean then equals one process summing their micro-batches
            g = g / world ** 0.5
        score.addcmul_(g.unsqueeze(2), g.unsqueeze(1))

    # -- scores and the surgeon's step -----------------------------------------------------------------------
    def score(self, weight: Tensor, evidence: Evidence) -> Tensor:
        assert evidence.accumulated is not None, "obert's Fisher accumulates in backward"
        fisher = evidence.accumulated
        if not bool(fisher.diagonal(dim1=1, dim2=2).any()):
            warnings.warn(f"criterion {self.name!r}: the gradients are all zero so far (a model at its optimum), "
                          "so this mask update ranks the layer by magnitude", UninformativeScores, stacklevel=2)
            return magnitude_unit(weight)
        kept = self._kept(weight, evidence.mask)
        inverse = self._inverse(fisher, kept)
        w = self._blocks(weight.detach().float()) * kept
        rho = w.square() / (2 * inverse.diagonal(dim1=1, dim2=2))
        return self._unblock(rho, weight)

    def update(self, weight: Tensor, mask: Tensor, evidence: Evidence) -> None:
        assert evidence.accumulated is not None, "obert's Fisher accumulates in backward"
        kept = self._kept(weight, evidence.mask)
        removed = kept & ~self._blocks(mask.reshape(-1))
        touched = removed.any(1)  # blocks that lose a weight in this update
        if not bool(touched.any()) or not bool(evidence.accumulated.diagonal(dim1=1, dim2=2).any()):
            return  # nothing removed, or no curvature seen: nothing to compensate
        inverse = self._inverse(evidence.accumulated, kept)[touched]
        q = removed[touched]
        w = self._blocks(weight.detach().float()) * kept
        # (F^-1)_QQ x_Q = w_Q with x = 0 off Q: the QxQ block, and the identity elsewhere so the system stays whole
        system = torch.where(q.unsqueeze(2) & q.unsqueeze(1), inverse, 0) + torch.diag_embed((~q).float())
        x = torch.cholesky_solve((w[touched] * q).unsqueeze(2), torch.linalg.cholesky(system)).squeeze(2)
        w[touched] -= torch.bmm(inverse, x.unsqueeze(2)).squeeze(2)
        new = self._unblock(w, weight).to(weight.dtype)
        weight.copy_(torch.where(mask, new, weight))  # pruned entries keep their (masked) values
        _LAST[0] = None  # the layer is done: free its inverse

    # -- internals -------------------------------------------------------------------------------------------
    def _blocks(self, t: Tensor) -> Tensor:
        """(blocks, block): the flattened tensor cut into blocks, the last one padded with zeros (False)."""
        flat = t.detach().reshape(-1)
        return F.pad(flat, (0, -flat.numel() % self.block)).view(-1, self.block)

    def _unblock(self, blocks: Tensor, like: Tensor) -> Tensor:
        return blocks.reshape(-1)[: like.numel()].view(like.shape)

    def _kept(self, weight: Tensor, mask: Tensor | None) -> Tensor:
        """(blocks, block) bool: the weights still kept; padding is not."""
        if mask is None:
            mask = torch.ones_like(weight, dtype=torch.bool)
        return self._blocks(mask.reshape(-1))

    def _inverse(self, fisher: Tensor, kept: Tensor) -> Tensor:
        """float32 ``(F_SS + lambda I)^-1`` per block, with pruned and padded entries decoupled (``1 / lambda``).
        The last one is kept: a mask update scores a layer, then updates it from the same inverse."""
        key = (fisher._version, self.damp)
        last = _LAST[0]
        if last is not None and last[0]() is fisher and last[1] == key and torch.equal(last[2], kept):
            return last[3]
        _LAST[0] = None  # free the previous layer's before the next one is made
        h = fisher * (kept.unsqueeze(2) & kept.unsqueeze(1))
        diag = h.diagonal(dim1=1, dim2=2)
        damp = self.damp * float(diag.double().sum()) / max(int(kept.sum()), 1)
        diag.add_(torch.where(kept, damp, 1.0))  # a decoupled entry's value does not reach the kept ones
        factor, info = torch.linalg.cholesky_ex(h)
        if bool(info.any()):
            raise UserValueError(f"obert: a block's Fisher is singular with damp={self.damp}; use damp > 0")
        inverse = torch.cholesky_inverse(factor)
        _LAST[0] = (weakref.ref(fisher), key, kept.clone(), inverse)
        return inverse


_LAST: list = [None]  # (the Fisher (weakly), (its version, damp), kept, inverse) of the last _inverse call


CRITERION = OBert()
