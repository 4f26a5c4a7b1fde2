"""The `Pruner` under FSDP2 (``torch.distributed.fsdp.fully_shard``): masks kept on the sharded parameters.

FSDP2 holds each parameter as a DTensor sharded along dim 0 (a Linear's output rows) and all-gathers the shards
before a module's forward and again for its backward. The pruner keeps, for every target, only this rank's shard
of the mask and of the movement score, and makes the shard that FSDP all-gathers hold the masked weight:

- **before the model's forward** (a forward pre-hook on the model, ahead of FSDP's own hooks), the values of each
  shard's pruned entries are *parked* in a side tensor and zeroed in the shard, so every all-gather (forward and
  backward) yields ``W' = where(mask, W, 0)``: exact zeros, no full-size tensor, no extra communication;
- **once FSDP has reduce-scattered a shard's gradient** ``dL/dW'`` (a post-accumulate-grad hook on the sharded
  parameter, which FSDP2 calls), the parked values go back (the dense ``W`` that movement pruning may regrow),
  the criterion's ``increment(W, dL/dW')`` is added into the score, and the gradient is masked. The optimizer
  thus sees what it sees in one process: the dense ``W`` and the gradient ``where(mask, dL/dW', 0)``.

The reduce-scatter averages the gradient over the ranks, so the shard's score is the score of the whole batch:
no score all-reduce is needed. With gradient accumulation that reduce-scatters every micro-batch, the gradient
present at a forward is copied, and the next hook scores only what the backward added to it.

At a mask update the criterion scores each whole layer, as in one process (criteria read layer-wide statistics:
RMS, norms, energy): the layer's dense weight and score are gathered for it one layer at a time, the shard's
part of the result kept. Selection then runs on the shards (:mod:`prune.sharded_masks`).

Build the pruner *after* ``fully_shard`` on the model FSDP2 was applied to (its root), and call that model.
Refused, with the reason: FSDP1, meshes of more than one dim (HSDP), placements other than ``Shard(0)``, criteria
that read inputs (``wanda``) or learn their scores, and ``scope="row"`` or N:M on weights stored (in, out)
(transformers' ``Conv1D``), whose input dimension is the sharded one.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from prune.criteria.base import Criterion, Evidence
from prune.masks import NMPattern
from prune.report import LayerSparsity
from prune.sharded_masks import ShardedMaskMath
from prune.targets import Target
from sparse_ops.errors import UserValueError

ORDER = "build the Pruner after fully_shard(...), on the model fully_shard was applied to"


def is_sharded(t: object) -> bool:
    """True for a DTensor (what FSDP2 makes of a parameter)."""
    return isinstance(t, DTensor)


def refuse_fsdp1(model: nn.Module) -> None:
    """Raise ValueError when ``model`` is or holds an FSDP1 ``FullyShardedDataParallel`` (flat parameters)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise UserValueError("FSDP1 (FullyShardedDataParallel, flat parameters) is not supported: shard the model with "
                         "FSDP2's fully_shard(...) and " + ORDER)


def fsdp2_mesh(model: nn.Module, targets: list[Target]) -> object | None:
    """The device mesh that FSDP2 shards the targets' weights over, or None when no weight is sharded.

    Raises ValueError for what the pruner cannot mask: some targets sharded and others not, a mesh of more than
    one dim, a placement other than ``Shard(0)``, a target no ``fully_shard`` module of ``model`` manages.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [t.name for t in targets if is_sharded(t.module.weight)]
    if not sharded:
        return None
    if len(sharded) != len(targets):
        plain = [t.name for t in targets if t.name not in sharded]
        raise UserValueError(f"targets {plain} are not sharded while {sharded} are: apply fully_shard to the whole "
                         "model, or exclude the layers it does not shard")
    mesh = targets[0].module.weight.device_mesh
    for t in targets:
        w = t.module.weight
        if w.device_mesh.ndim != 1 or tuple(w.placements) != (Shard(0),):
            raise UserValueError(f"layer {t.name!r} is sharded as {tuple(w.placements)} over a {w.device_mesh.ndim}-D "
                             "mesh; the pruner supports FSDP2's default, (Shard(dim=0),) over a 1-D mesh "
                             "(no HSDP, no shard_placement_fn)")
        owners = [""] + [".".join(t.name.split(".")[:i]) for i in range(1, t.name.count(".") + 2)]
        if not any(isinstance(model.get_submodule(o), FSDPModule) for o in owners):
            raise UserValueError(f"no fully_shard module of the given model manages layer {t.name!r}: " + ORDER)
    others = [t.name for t in targets if t.module.weight.device_mesh != mesh]  # equal meshes: the same ranks
    if others:
        raise UserValueError(f"layers {others} are sharded over another device mesh than {targets[0].name!r}; use one")
    return mesh


def check_settings(targets: list[Target], criterion: Criterion, nm: NMPattern | None, scope: str,
                   process_group: object | None) -> None:
    """Refuse pruner settings that sharded weights cannot honour, saying why and what works."""
    if criterion.uses_inputs:
        raise UserValueError(f"criterion {criterion.name!r} reads layer inputs, which is not supported under FSDP2; "
                         "use 'magnitude' or 'movement', or prune one-shot before sharding")
    if criterion.updates_weights:
        raise UserValueError(f"criterion {criterion.name!r} keeps whole-layer curvature and updates kept weights, which "
                         "is not supported under FSDP2; use 'taylor', 'movement' or 'magnitude', or DDP")
    if process_group is not None:
        raise UserValueError("under FSDP2 the ranks that share masks are those of the weights' device mesh: leave "
                         f"process_group=None (got {process_group!r})")
    for t in targets:
        if t.in_dim == 0 and (nm is not None or scope == "row"):
            what = f"pattern {nm}" if nm is not None else "scope='row'"
            raise UserValueError(f"layer {t.name!r} stores its weight (in, out) (transformers' Conv1D) and FSDP2 shards "
                             f"dim 0, its input dimension, so {what} would compare weights across ranks: use "
                             "pattern='unstructured' with scope 'layer' or 'global', or exclude the layer")


class ShardedWeight:
    """One target under FSDP2: this rank's shard of its mask (and score), and its pruned values while parked.

    ``mask`` and ``score`` have the shape of the local shard (``param.to_local()``): about 1/world of the weight.
    """

    def __init__(self, param: nn.Parameter, criterion: Criterion) -> None:
        local = param.to_local()
        self.criterion = criterion
        self.mask = torch.ones_like(local, dtype=torch.bool)
        self.score = torch.zeros_like(local, dtype=torch.float32) if criterion.uses_gradients else None
        self.energy = torch.zeros((), device=local.device) if self.score is not None else None  # of this shard
        self.accumulate = self.score is not None
        self.parked: Tensor | None = None  # values of the pruned entries, while the shard holds zeros there
        self._grad_before: tuple[Tensor, int, Tensor] | None = None  # (grad, its version, copy) at the forward
        self._bind(param)

    def _bind(self, param: nn.Parameter) -> None:
        self.param = param
        self._hook = param.register_post_accumulate_grad_hook(self._after_grad)

    def before_forward(self, current: object) -> None:
        """Park and zero the pruned entries (unless parked); note the gradient a backward would add to."""
        with_backward = torch.is_grad_enabled()
        if is_sharded(current) and current is not self.param:  # FSDP swapped the sharded parameter (e.g. _apply)
            self._hook.remove()
            self._bind(current)  # type: ignore[arg-type]
        with torch.no_grad():
            self._park()
            grad = self.param.grad
            if self.accumulate and with_backward and grad is not None:
                self._note_grad(grad)

    def _park(self) -> None:
        if self.parked is None:
            local = self.param.to_local()
            self.parked = local[~self.mask]
            local.masked_fill_(~self.mask, 0)

    def _note_grad(self, grad: DTensor) -> None:
        """A backward will add into ``grad`` (gradient accumulation): copy it, unless already copied as it is."""
        g = grad.to_local()
        if self._grad_before is None or self._grad_before[0] is not grad or self._grad_before[1] != g._version:
            self._grad_before = (grad, g._version, g.clone())

    @torch.no_grad()
    def unpark(self) -> None:
        """Put the parked values back: the shard holds the dense weight again."""
        if self.parked is not None:
            self.param.to_local().masked_scatter_(~self.mask, self.parked)
            self.parked = None

    @torch.no_grad()
    def _after_grad(self, param: nn.Parameter) -> None:
        self.unpark()
        grad = param.grad.to_local()  # type: ignore[union-attr]  # dL/dW' of this shard, averaged over ranks
        if self.accumulate:
            before = self._grad_before
            added = grad  # FSDP adds in place into the same gradient: exactly one version step since the copy
            if before is not None and before[0] is param.grad and grad._version == before[1] + 1:
                added = grad - before[2]
            inc = self.criterion.increment(param.to_local(), added)
            self.score.add_(inc)  # type: ignore[union-attr]
            self.energy.add_(inc.square().sum())  # type: ignore[union-attr]
        self._grad_before = None
        grad.masked_fill_(~self.mask, 0)

    def dense(self) -> Tensor:
        """This rank's shard of the dense weight."""
        self.unpark()
        return self.param.to_local()

    def masked(self) -> Tensor:
        """This rank's shard of the masked weight (a new tensor)."""
        with torch.no_grad():
            return torch.where(self.mask, self.dense(), 0)

    @torch.no_grad()
    def criterion_score(self, criterion: Criterion, evidence: Evidence) -> Tensor:
        """This rank's shard of ``criterion.score`` computed on the whole layer, as in one process: criteria read
        layer-wide statistics (RMS, norms, energy). The dense weight and the score are gathered for it, one layer
        at a time (like FSDP's own all-gather); the energy is summed over the shards. A collective."""
        energy = None
        if self.energy is not None:
            total = self.energy.clone()
            dist.all_reduce(total, group=self.param.device_mesh.get_group())
            energy = None if torch.isnan(total) else float(total)
        whole = dataclasses.replace(evidence, energy=energy, accumulated=None if evidence.accumulated is None
                                    else self.to_dtensor(evidence.accumulated).full_tensor())
        s = criterion.score(self.to_dtensor(self.dense()).full_tensor(), whole)
        return self.local_part(s, "score")

    def to_dtensor(self, local: Tensor) -> DTensor:
        """A local shard of the weight's shape (mask, score) as a DTensor laid out like the weight."""
        p = self.param
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def local_part(self, saved: Tensor, what: str) -> Tensor:
        """This rank's shard of a saved tensor: a DTensor laid out like the weight, or the whole tensor."""
        p = self.param
        if tuple(saved.shape) != tuple(p.shape):
            raise UserValueError(f"saved {what} has shape {tuple(saved.shape)}, expected {tuple(p.shape)}")
        if is_sharded(saved):
            if saved.placements != p.placements or saved.device_mesh != p.device_mesh:
                saved = saved.redistribute(p.device_mesh, p.placements)
            return saved.to_local()
        return distribute_tensor(saved.to(self.mask.device), p.device_mesh, p.placements,
                                 src_data_rank=None).to_local()  # each rank slices its own copy

    def finalize(self) -> None:
        """Zero the pruned entries in the shard for good and stop masking."""
        with torch.no_grad():
            self.dense().masked_fill_(~self.mask, 0)
        self._hook.remove()


class ShardedMasks:
    """The targets' :class:`ShardedWeight` by module name, and the model's forward pre-hook that parks them."""

    def __init__(self, model: nn.Module, targets: list[Target], criterion: Criterion, mesh: object) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()  # type: ignore[attr-defined]
        self.select = ShardedMaskMath(self.group)
        self.targets = targets
        self.weights = {t.name: ShardedWeight(t.module.weight, criterion) for t in targets}
        # prepend: ahead of FSDP's pre-forward, which starts the all-gathers. Saving or loading the model's
        # state dict first puts the parked values back: checkpoints hold the dense weights.
        self._hooks = [model.register_forward_pre_hook(self._before_forward, prepend=True),
                       model.register_state_dict_pre_hook(self._unpark_all),
                       model.register_load_state_dict_pre_hook(self._unpark_all)]

    def __getitem__(self, name: str) -> ShardedWeight:
        return self.weights[name]

    # -- the mask store protocol (prune.mask_store) ------------------------------------------------------------
    def dense(self, name: str) -> Tensor:
        return self.weights[name].dense()  # this rank's shard

    def score(self, name: str, criterion: Criterion, evidence: Evidence) -> Tensor:
        return self.weights[name].criterion_score(criterion, evidence)  # scored whole, this rank's shard

    def world(self) -> int:
        return 1  # increments come from the reduce-scattered (averaged) gradient: nothing to scale

    def sync(self, inputs: dict) -> None:
        """Nothing: shard gradients arrive averaged over ranks (and input criteria are refused)."""

    def masks(self) -> dict[str, Tensor]:
        return {name: w.to_dtensor(w.mask) for name, w in self.weights.items()}

    def check_live(self, what: str) -> None:
        """Nothing to check: the weights were sharded before the pruner was built."""

    def _before_forward(self, _module: nn.Module, _args: tuple) -> None:
        for t in self.targets:
            self.weights[t.name].before_forward(t.module.weight)

    def _unpark_all(self, *_args: object) -> None:
        for w in self.weights.values():
            w.unpark()

    def report_rows(self, pattern: str) -> list[LayerSparsity]:
        """Per-layer nonzeros of the masked weights, counted over all ranks (a collective)."""
        local = [int(torch.count_nonzero(self.weights[t.name].masked())) for t in self.targets]
        nnz = torch.tensor(local, dtype=torch.int64, device=self.weights[self.targets[0].name].mask.device)
        dist.all_reduce(nnz, group=self.group)
        return [LayerSparsity(t.name, tuple(t.module.weight.shape), n, 1.0 - n / max(t.module.weight.numel(), 1),
                              pattern) for t, n in zip(self.targets, nnz.tolist())]

    def masked_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """``model.state_dict()`` (sharded DTensors) with each target weight masked, under its original key."""
        names = {f"{t.name}.weight": self.weights[t.name] for t in self.targets}
        return {k: (names[k].to_dtensor(names[k].masked()) if k in names else v)
                for k, v in model.state_dict().items()}

    def export_state(self, state: dict[str, object], full: bool) -> dict[str, object]:
        """The pruner's state with its shards as DTensors laid out like the weights, or (``full``) whole tensors
        on every rank, as one process saves them. A shard's energy is one entry of a (world,) DTensor; whole, the
        layer's is their sum. A collective."""
        out = dict(state)
        for section in ("masks", "scores"):
            if section in state:
                out[section] = {n: _whole_if(self.weights[n].to_dtensor(v), full)
                                for n, v in state[section].items()}  # type: ignore[attr-defined]
        if "energy" in state:
            out["energy"] = {n: self._energy_out(v, full) for n, v in state["energy"].items()}  # type: ignore
        return out

    def import_state(self, state: dict[str, object]) -> dict[str, object]:
        """Saved masks, scores and energies (DTensors, or whole tensors as :meth:`export_state` with ``full`` or
        one process writes them) as this rank's shards, ready to copy in. A whole (0-d) energy is shared out
        over the shards in proportion to their size."""
        for w in self.weights.values():
            w.unpark()  # the parked entries follow the old mask
        out = dict(state)
        for section, what in (("masks", "mask"), ("scores", "score")):
            saved = state.get(section)
            if isinstance(saved, dict):
                out[section] = {n: self.weights[n].local_part(v, f"{what} of {n}")
                                if n in self.weights and isinstance(v, Tensor) else v for n, v in saved.items()}
        saved = state.get("energy")
        if isinstance(saved, dict):
            out["energy"] = {n: self._energy_in(n, v) if n in self.weights and isinstance(v, Tensor) else v
                             for n, v in saved.items()}
        return out

    def _energy_out(self, local: Tensor, full: bool) -> Tensor:
        if full:
            total = local.clone()
            dist.all_reduce(total, group=self.group)
            return total
        world = dist.get_world_size(self.group)
        return DTensor.from_local(local.reshape(1).clone(), self.mesh, [Shard(0)], run_check=False,
                                  shape=(world,), stride=(1,))

    def _energy_in(self, name: str, saved: Tensor) -> Tensor:
        if is_sharded(saved):
            return saved.to_local().reshape(())
        if saved.dim() != 0:
            raise UserValueError(f"saved energy of {name} has shape {tuple(saved.shape)}, expected a 0-d tensor")
        w = self.weights[name]
        return saved.to(w.mask.device) * (w.mask.numel() / max(w.param.numel(), 1))  # this shard's share

    def finalize(self) -> None:
        for w in self.weights.values():
            w.finalize()
        for handle in self._hooks:
            handle.remove()


def _whole_if(t: DTensor, full: bool) -> Tensor:
    return t.full_tensor() if full else t
