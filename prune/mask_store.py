"""Where a :class:`~prune.Pruner` keeps its masks: the mask store, chosen once when the pruner is built.

Two stores answer the same questions (the protocol below): :class:`LocalMasks` here, for whole weights (one
process, or DDP, whose every rank holds the whole model), and :class:`prune.sharding.ShardedMasks`, for FSDP2's
shards. ``store[name]`` is one target's entry: its ``mask`` (bool, True = kept), running ``score`` and
``energy`` (gradient criteria), and the flags ``accumulate`` and ``world`` the pruner sets.

``LocalMasks`` attaches a parametrization to each target: the module's ``weight`` becomes ``where(mask, W, 0)``,
computed from the dense parameter ``W`` at every access, so masked weights are exactly 0.0 in every forward
whatever the optimizer does to ``W`` (momentum, weight decay, clipping). The dense ``W`` is kept so that a
criterion may let a weight regrow. Under DDP each rank accumulates scores from its own micro-batch;
:meth:`LocalMasks.sync` averages them before a mask update, so every rank picks the same mask.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prune import masks as _masks
from prune import sharding as _sharding
from prune.calibration import InputStats
from prune.criteria import Criterion, Evidence
from prune.report import LayerSparsity, layer_row
from prune.targets import Target
from sparse_ops.errors import MisuseError


class MaskStore(Protocol):
    """What the pruner asks of a mask store (see the module docstring)."""

    select: object  # the mask math: prune.masks, or its sharded twin

    def __getitem__(self, name: str) -> object: ...
    def dense(self, name: str) -> Tensor: ...
    def score(self, name: str, criterion: Criterion, evidence: Evidence) -> Tensor: ...
    def world(self) -> int: ...
    def sync(self, inputs: dict[str, InputStats]) -> None: ...
    def masks(self) -> dict[str, Tensor]: ...
    def report_rows(self, pattern: str) -> list[LayerSparsity]: ...
    def masked_state_dict(self, model: nn.Module) -> dict[str, Tensor]: ...
    def export_state(self, state: dict[str, object], full: bool) -> dict[str, object]: ...
    def import_state(self, state: dict[str, object]) -> dict[str, object]: ...
    def check_live(self, what: str) -> None: ...
    def finalize(self) -> None: ...


class _Mask(nn.Module):
    """Parametrization ``W -> where(mask, W, 0)``; with a gradient criterion it also runs the criterion's
    ``accumulate`` in every backward.

    ``mask`` and ``score`` are plain attributes, not buffers: DDP broadcasts buffers from rank 0 at every forward,
    which would overwrite each rank's own score and cost a mask-sized broadcast per step. They are saved by
    ``Pruner.state_dict()`` and follow the module across devices through ``_apply``. ``energy`` (0-d) sums
    ``||increment||^2`` over backward passes: the noise level the criterion compares its score to. ``world`` is the
    DDP world size (see :meth:`LocalMasks.sync`).
    """

    def __init__(self, mask: Tensor, score: Tensor | None, criterion: Criterion) -> None:
        super().__init__()
        self.mask = mask
        self.score = score
        self.energy = torch.zeros((), device=mask.device) if score is not None else None
        self.criterion = criterion
        self.accumulate = score is not None
        self.world = 1

    def _apply(self, fn, recurse=True):  # model.to(device) / .cuda(): move mask and score, keep their dtypes
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.mask.device)).device
        self.mask = self.mask.to(device)
        if self.score is not None:
            self.score = self.score.to(device)
            self.energy = self.energy.to(device)
        return self

    def forward(self, weight: Tensor) -> Tensor:
        if self.accumulate and torch.is_grad_enabled() and weight.requires_grad:
            return _MaskedWeight.apply(weight, self.mask, self.score, self.energy, self.criterion, self.world)
        return torch.where(self.mask, weight, 0)


class _MaskedWeight(torch.autograd.Function):
    """``where(mask, W, 0)`` whose backward also runs ``criterion.accumulate``: adds ``increment(W, dL/dW')``
    into ``score`` and ``||increment||^2`` into ``energy``, scaled for DDP's ``world`` ranks."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, score: Tensor, energy: Tensor,  # type: ignore[override]
                criterion: Criterion, world: int) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.score, ctx.energy, ctx.criterion, ctx.world = score, energy, criterion, world
        return torch.where(mask, weight, 0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, mask = ctx.saved_tensors
        ctx.criterion.accumulate(ctx.score, ctx.energy, weight, grad, ctx.world)  # grad is dL/dW', dense
        return torch.where(mask, grad, 0), None, None, None, None, None


class LocalMasks:
    """Masks and scores on whole weights, by parametrization (see the module docstring)."""

    select = _masks

    def __init__(self, targets: list[Target], criterion: Criterion, process_group: object | None) -> None:
        self.targets = {t.name: t for t in targets}
        self.group = process_group
        self._order = {t.name: list(t.module._parameters) for t in targets}
        for t in targets:
            w = t.module.weight
            score = criterion.new_score(w, t.in_dim) if criterion.uses_gradients else None
            parametrize.register_parametrization(t.module, "weight",
                                                 _Mask(torch.ones_like(w, dtype=torch.bool), score, criterion))

    def __getitem__(self, name: str) -> _Mask:
        return self.targets[name].module.parametrizations["weight"][0]

    def dense(self, name: str) -> Tensor:
        return self.targets[name].module.parametrizations["weight"].original

    def score(self, name: str, criterion: Criterion, evidence: Evidence) -> Tensor:
        return criterion.score(self.dense(name), evidence)

    def world(self) -> int:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def sync(self, inputs: dict[str, InputStats]) -> None:
        """Average gradient scores over DDP's ranks: each rank accumulated ``-W * g_local``; W is the same on
        every rank, so the mean is ``-W * mean(g)``, the score of the all-reduced gradient. Scores of higher
        degree in the gradient (``taylor``'s squares, the noise ``energy``) were divided by ``world ** (k - 1)``
        as they accumulated: after the mean, a DDP run holds exactly what one process accumulating the ranks'
        micro-batches with loss / world would, whatever the degree. Input statistics are summed: every rank
        then scores from all ranks' data."""
        world = self.world()
        if world == 1:
            return
        for name in self.targets:
            entry = self[name]
            if entry.score is not None:
                for t in (entry.score, entry.energy):
                    torch.distributed.all_reduce(t, group=self.group)
                    t.div_(world)
        for stats in inputs.values():
            stats.all_reduce(self.group)

    def masks(self) -> dict[str, Tensor]:
        return {name: self[name].mask for name in self.targets}

    def report_rows(self, pattern: str) -> list[LayerSparsity]:
        with torch.no_grad():
            return [layer_row(name, t.module.weight, pattern) for name, t in self.targets.items()]

    def masked_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        originals = {f"{name}.parametrizations.weight.original": name for name in self.targets}
        with torch.no_grad():
            return {(f"{originals[k]}.weight" if k in originals else k):
                    (self.targets[originals[k]].module.weight.detach().clone() if k in originals else v)
                    for k, v in model.state_dict().items()}

    def export_state(self, state: dict[str, object], full: bool) -> dict[str, object]:
        return state  # whole tensors already

    def import_state(self, state: dict[str, object]) -> dict[str, object]:
        return state

    def check_live(self, what: str) -> None:
        if any(_sharding.is_sharded(self.dense(name)) for name in self.targets):
            raise MisuseError(f"{what}: fully_shard (FSDP2) sharded the model after the Pruner was built, which "
                              "the pruner cannot follow; " + _sharding.ORDER)

    def finalize(self) -> None:
        """Bake the zeros in and remove the parametrizations; each module's parameters keep their order."""
        for name, t in self.targets.items():
            parametrize.remove_parametrizations(t.module, "weight", leave_parametrized=True)
            params, order = t.module._parameters, self._order[name]
            for key in order + [k for k in list(params) if k not in order]:
                params[key] = params.pop(key)
