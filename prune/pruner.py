"""`Pruner`: wraps a model, keeps masks on its target weights, and updates them on a sparsity schedule.

Masks live in a mask store chosen once, when the pruner is built (:mod:`prune.mask_store`): on whole weights
by parametrization (one process, DDP: the module's ``weight`` becomes ``where(mask, W, 0)``, exactly 0.0 in every
forward whatever the optimizer does to ``W``), or on FSDP2's shards (:mod:`prune.sharding`). ``finalize()`` bakes
the zeros in and removes all of it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prune.schedules import LinearRamp
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> pruner = Pruner(model, sparsity=LinearRamp(0.0, 0.75, begin_step=0, end_step=4, every=2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for _ in range(5):
    ...     model(torch.randn(8, 16)).square().mean().backward(); opt.step(); pruner.step(); opt.zero_grad()
    >>> model = pruner.finalize()
    >>> float((model[0].weight == 0).float().mean())
    0.75
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from prune import criteria as _criteria
from prune import masks as _masks
from prune import recipe as _recipe
from prune import sharding as _sharding
from prune.calibration import InputStats
from prune.mask_store import LocalMasks, MaskStore
from prune.report import SparsityReport
from prune.schedules import Constant, Schedule, schedule_from_dict
from prune.targets import Target, find_targets
from sparse_ops.errors import MisuseError, UserValueError

if TYPE_CHECKING:
    from prune.distill import Distiller

STATE_VERSION = 1


class Pruner:
    """Prune a model while it trains; your loop only adds ``pruner.step()`` and ``pruner.finalize()``.

    Args:
        model: any ``nn.Module``; its target weights are masked in place.
        sparsity: a :class:`~prune.schedules.Schedule`, or a float for one-shot pruning at step 0.
        criterion: a name in :data:`prune.criteria.CRITERIA` (``"magnitude"``, ``"movement"``, ``"obert"``,
            ``"taylor"``, ``"wanda"``; :mod:`prune.criteria` says what each reads) or a
            :class:`~prune.criteria.Criterion`.
        pattern: ``"unstructured"`` or ``"N:M"`` along the input dimension (the schedule's final sparsity must
            then be ``1 - N/M``; intermediate targets prune a subset of the final N:M zeros).
        scope: ``"layer"`` (each weight reaches the target exactly), ``"row"`` (each output row of each weight
            does: the comparison Wanda prescribes) or ``"global"`` (one threshold over all).
        types: module types to prune (default: ``nn.Linear`` and transformers' ``Conv1D``).
        include, exclude: module name patterns, each covering its module's subtree (``prune.targets``): a
            glob on the name or any dotted suffix; a string is one pattern.
        max_layer_sparsity: with ``scope="global"``, no single weight is pruned beyond this.
        process_group: under ``torch.distributed`` (e.g. DDP), the group whose ranks share masks (default: the
            whole world when a process group is initialized). Movement scores are averaged over it before every
            mask update, which equals scoring from the all-reduced gradient, so every rank picks the same mask.
            Under FSDP2 (``fully_shard``) leave it None: build the pruner after ``fully_shard``; masks and scores
            are then kept as shards like the weights (see :mod:`prune.sharding`).

    Masks are recomputed on the schedule's update steps (``begin_step + k * every`` up to ``end_step``), then
    frozen. Step ``t`` counts calls to :meth:`step`; masks for ``t = 0`` are set at construction.

    Example: see the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | Schedule = 0.5,
        *,
        criterion: str = "magnitude",
        pattern: str = "unstructured",
        scope: str = "layer",
        types: Sequence[type[nn.Module]] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] = (),
        max_layer_sparsity: float | None = None,
        process_group: object | None = None,
    ) -> None:
        self.criterion = _criteria.get_criterion(criterion)
        self.nm = _masks.parse_pattern(pattern)
        self.pattern = str(self.nm) if self.nm else "unstructured"
        self.schedule = sparsity if isinstance(sparsity, Schedule) else Constant(sparsity)
        self.scope = _masks.check_scope(scope, self.nm, max_layer_sparsity)
        self.max_layer_sparsity = max_layer_sparsity
        if self.nm and abs(self.schedule.final - self.nm.sparsity) > 1e-9:
            raise UserValueError(f"pattern {self.pattern} means sparsity {self.nm.sparsity}, but the schedule's final "
                             f"sparsity is {self.schedule.final}")
        needs_data = self.criterion.uses_gradients or self.criterion.uses_inputs
        if needs_data and self.schedule.is_update_step(0) and self.schedule(0) > 0:
            what = "gradients" if self.criterion.uses_gradients else "inputs"
            raise UserValueError(f"criterion {self.criterion.name!r} ranks weights by the {what} of training steps, "
                             f"so it cannot prune at step 0 (target {self.schedule(0)}): use begin_step >= 1")
        self.model = model
        self.process_group = process_group
        _sharding.refuse_fsdp1(model)  # before find_targets: FSDP1 hides the weights in flat parameters
        self.targets = find_targets(model, types, include, exclude)
        self._target_args = {"types": types, "include": include, "exclude": exclude}  # for to_recipe()
        for t in self.targets:
            _check_nm_shape(t, self.nm)
            if self.criterion.uses_inputs:
                _check_feature_input(t, self.criterion)
        mesh = _sharding.fsdp2_mesh(model, self.targets)  # None unless FSDP2 shards the weights
        if mesh is not None:
            _sharding.check_settings(self.targets, self.criterion, self.nm, self.scope, process_group)
        self._store: MaskStore = (LocalMasks(self.targets, self.criterion, process_group) if mesh is None
                                  else _sharding.ShardedMasks(model, self.targets, self.criterion, mesh))
        self._step = 0
        self._finalized = False
        self._attach()
        if self.schedule.is_update_step(0):
            self._update_masks(self.schedule(0))

    # -- the training loop's API -------------------------------------------------------------------------------
    def step(self) -> None:
        """Call once after every ``optimizer.step()``: advances the schedule and updates masks when it is due."""
        self._check_live("step()")
        self._step += 1
        if self.schedule.is_update_step(self._step):
            self._update_masks(self.schedule(self._step))
        self._set_accumulate()

    def finalize(self) -> nn.Module:
        """Bake the zeros into the weights and remove all pruning machinery; returns the (same) model.

        The model's ``state_dict()`` has its original keys again and its outputs equal the masked model's.
        """
        self._check_live("finalize()")
        for handle in self._hooks:
            handle.remove()
        self._store.finalize()  # FSDP2: zeros into the shards; the model stays sharded (gather a full state dict)
        if self._model_save_pretrained is not None:
            del self.model.save_pretrained  # the instance attribute: the class's method again
        self._finalized = True
        return self.model

    def masked_state_dict(self) -> dict[str, Tensor]:
        """The model's state dict as the finalized model will have it: original keys, each target weight masked
        (exact zeros), nothing of the pruner's. What to export or convert before :meth:`finalize`; a Hugging
        Face model's ``save_pretrained`` saves this while the pruner is attached. To resume training, save
        ``model.state_dict()`` (the dense weights movement pruning may regrow) and :meth:`state_dict` instead.

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> state = Pruner(model, sparsity=0.5).masked_state_dict()
        >>> sorted(state), float((state["0.weight"] == 0).float().mean())
        (['0.bias', '0.weight'], 0.5)
        """
        self._check_live("masked_state_dict()")
        return self._store.masked_state_dict(self.model)  # FSDP2: sharded (DTensor), target weights masked

    def _save_pretrained(self, *args, state_dict: dict | None = None, **kwargs):
        """The model's own ``save_pretrained`` with :meth:`masked_state_dict` (unless a state dict is given)."""
        return self._model_save_pretrained(*args, state_dict=self.masked_state_dict() if state_dict is None
                                           else state_dict, **kwargs)

    @property
    def step_count(self) -> int:
        """Number of :meth:`step` calls so far."""
        return self._step

    @property
    def target_sparsity(self) -> float:
        """The schedule's target at the current step."""
        return self.schedule(self._step)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Current masks by module name (``True`` = kept). Read-only: change masks through the pruner.
        Under FSDP2, DTensors sharded like the weights (``.full_tensor()`` gathers one)."""
        return self._store.masks()

    def report(self) -> SparsityReport:
        """Per-layer rows (name, shape, nnz, sparsity, pattern) and totals for the target weights."""
        return SparsityReport(self._store.report_rows(self.pattern))  # FSDP2: counted over all ranks

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self, full_state_dict: bool = False) -> dict[str, object]:
        """Everything needed to resume: step, schedule, masks and (movement) scores. Safe for ``weights_only``.

        Under FSDP2 masks and scores are DTensors sharded like the weights (for ``torch.distributed.checkpoint``),
        or with ``full_state_dict=True`` whole tensors on every rank, as a single process saves them (a
        collective: call it on every rank). Without FSDP2 the flag changes nothing.
        """
        self._check_live("state_dict()")
        state: dict[str, object] = {
            "version": STATE_VERSION, "step": self._step, "criterion": self.criterion.name,
            "pattern": self.pattern, "scope": self.scope, "schedule": self.schedule.to_dict(),
            "masks": {t.name: self._param(t).mask.clone() for t in self.targets},
        }
        if self.criterion.uses_gradients:
            state["scores"] = {t.name: self._param(t).score.detach().clone() for t in self.targets}
            state["energy"] = {t.name: self._param(t).energy.clone() for t in self.targets}
        if self.criterion.uses_inputs:
            state["inputs"] = {name: stats.state_dict() for name, stats in self._inputs.items()}
        return self._store.export_state(state, full=full_state_dict)

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` into a pruner built with the same settings on the same architecture."""
        self._check_live("load_state_dict()")
        if state.get("version") != STATE_VERSION:
            raise UserValueError(f"pruner state version {state.get('version')!r} is not supported "
                             f"(expected {STATE_VERSION})")
        for key, mine in (("criterion", self.criterion.name), ("pattern", self.pattern), ("scope", self.scope)):
            if state.get(key) != mine:
                raise UserValueError(f"saved pruner has {key}={state.get(key)!r}, this one has {mine!r}")
        if schedule_from_dict(state["schedule"]) != self.schedule:  # type: ignore[arg-type]
            raise UserValueError(f"saved schedule {state['schedule']} differs from this pruner's {self.schedule}")
        state = self._store.import_state(state)  # FSDP2: sharded (DTensor) or whole tensors -> this rank's shards
        masks = state["masks"]
        scores = state.get("scores", {})
        names = [t.name for t in self.targets]
        if sorted(masks) != sorted(names):  # type: ignore[arg-type]
            raise UserValueError(f"saved masks are for {sorted(masks)}, this pruner targets {sorted(names)}")
        energy = state.get("energy", {})
        for t in self.targets:
            p = self._param(t)
            _copy_checked(p.mask, masks[t.name], f"mask of {t.name}")  # type: ignore[index]
            if p.score is not None:
                with torch.no_grad():
                    _copy_checked(p.score, scores[t.name], f"score of {t.name}")  # type: ignore[index]
                # a state saved before `energy` existed: unknown noise level (nan), not "no gradients"
                p.energy.copy_(energy.get(t.name, torch.tensor(float("nan"))))  # type: ignore[union-attr]
            if t.name in self._inputs:
                self._inputs[t.name].load_state_dict(state["inputs"][t.name])  # type: ignore[index]
        self._step = int(state["step"])  # type: ignore[arg-type]
        self._set_accumulate()

    # -- recipes (prune.recipe) ------------------------------------------------------------------------------
    @classmethod
    def from_recipe(cls, model: nn.Module, recipe: _recipe.RecipeSource, **kwargs: object) -> Pruner:
        """A pruner with a recipe's settings (a ``.yaml``/``.toml`` path, a mapping or a
        :class:`~prune.recipe.Recipe`); ``kwargs`` (``process_group``) go to the constructor.

        >>> from torch import nn
        >>> spec = {"scope": "global", "schedule": {"kind": "Constant", "final": 0.5}}
        >>> Pruner.from_recipe(nn.Sequential(nn.Linear(4, 4)), spec).to_recipe().scope
        'global'
        """
        return cls(model, **_recipe.as_recipe(recipe).pruner_kwargs(), **kwargs)  # type: ignore[arg-type]

    def to_recipe(self, distiller: Distiller | None = None) -> _recipe.Recipe:
        """This pruner's settings as a :class:`~prune.recipe.Recipe`, with ``distiller``'s (a
        :class:`~prune.Distiller` trained with) as its ``distill`` table: compare it, or ``.save(path)`` it."""
        return _recipe.recipe_of(self.schedule, self.criterion, self.pattern, self.scope,
                                 max_layer_sparsity=self.max_layer_sparsity,
                                 distill=None if distiller is None else distiller.settings, **self._target_args)

    # -- internals ---------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        # criteria that read the layers' inputs: a forward pre-hook per target feeds its InputStats
        self._inputs: dict[str, InputStats] = {}
        self._hooks = []
        if self.criterion.uses_inputs:
            for t in self.targets:
                weight = t.module.weight
                stats = self._inputs[t.name] = InputStats(weight.shape[t.in_dim], device=weight.device)
                self._hooks.append(stats.attach(t.module, when=lambda: self._collecting))
        self._set_accumulate()
        # Hugging Face's save_pretrained would store the dense `...parametrizations.weight.original` tensors and
        # lose the masks: while attached, it saves the masked weights under the original keys.
        save = getattr(self.model, "save_pretrained", None)
        self._model_save_pretrained = save if callable(save) else None
        if self._model_save_pretrained is not None:
            self.model.save_pretrained = self._save_pretrained

    def _param(self, t: Target):  # the store's entry: mask, score, energy, accumulate, world
        return self._store[t.name]

    def _dense(self, t: Target) -> Tensor:
        return self._store.dense(t.name)

    def _set_accumulate(self) -> None:
        # Scores and input statistics only matter until the last mask update; after it, stop paying for them.
        live = self._step < self.schedule.end_step
        self._collecting = self.criterion.uses_inputs and live
        world = self._store.world()
        for t in self.targets:
            self._param(t).accumulate = self.criterion.uses_gradients and live
            self._param(t).world = world

    def _scores(self, t: Target) -> Tensor:
        p = self._param(t)
        inputs = self._inputs.get(t.name)
        if inputs is not None and inputs.rows == 0:
            raise MisuseError(f"criterion {self.criterion.name!r} scores layer {t.name!r} by its inputs, but no "
                               "forward pass reached it since the last mask update; run the model between updates")
        evidence = self._evidence(t)
        s = self._store.score(t.name, self.criterion, evidence)
        if _criteria.has_nan(s):
            raise UserValueError(f"layer {t.name!r}: {self.criterion.name} scores contain NaN (NaN weights or "
                             "gradients); fix the weights or exclude the layer")
        if not self.criterion.regrows:
            s.masked_fill_(~p.mask, float("-inf"))  # pruned weights stay pruned
        return s

    def _evidence(self, t: Target) -> _criteria.Evidence:
        p = self._param(t)
        energy = float(p.energy) if p.energy is not None else None
        return _criteria.Evidence(in_dim=t.in_dim, accumulated=p.score.detach() if p.score is not None else None,
                                  inputs=self._inputs.get(t.name), mask=p.mask,
                                  energy=None if energy is not None and energy != energy else energy)

    def _set_mask(self, t: Target, mask: Tensor) -> None:
        """The new mask for ``t``; a criterion that ``updates_weights`` first adjusts the kept weights."""
        p = self._param(t)
        mask = mask.view_as(p.mask)
        if self.criterion.updates_weights:
            self.criterion.update(self._dense(t), mask, self._evidence(t))
        p.mask.copy_(mask)

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        self._store.sync(self._inputs)
        if self.scope == "global":
            # One float32 buffer for all scores (4 bytes/param while it lives), filled layer by layer.
            sizes = [self._param(t).mask.numel() for t in self.targets]  # not t.module.weight: it recomputes
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=self._dense(self.targets[0]).device)
            for t, part in zip(self.targets, flat.split(sizes)):
                part.copy_(self._scores(t).reshape(-1))
            new = self._store.select.global_masks(flat, sizes, sparsity, self.max_layer_sparsity)
            del flat
            for t, m in zip(self.targets, new):
                self._set_mask(t, m)
        for t in self.targets if self.scope != "global" else ():  # one layer's scores at a time
            self._set_mask(t, self._store.select.weight_mask(self._scores(t), sparsity, scope=self.scope,
                                                             nm=self.nm, in_dim=t.in_dim))
        for stats in self._inputs.values():  # the next update scores the inputs seen from now on
            stats.reset()

    def _check_live(self, what: str) -> None:
        if self._finalized:
            raise MisuseError(f"{what} called after finalize(): the pruner has been removed from the model")
        self._store.check_live(what)


def _check_feature_input(t: Target, criterion: _criteria.Criterion) -> None:
    """Input statistics are per feature of the input's last dim: linear layers (nn.Linear, Conv1D) only."""
    if not (isinstance(t.module, nn.Linear) or t.in_dim == 0) or t.module.weight.dim() != 2:
        raise UserValueError(f"criterion {criterion.name!r} reads each layer's input features, which only linear "
                         f"layers have; layer {t.name!r} is a {type(t.module).__name__}: exclude it")


def _check_nm_shape(t: Target, nm: _masks.NMPattern | None) -> None:
    if nm is not None and t.module.weight.shape[t.in_dim] % nm.m:
        raise UserValueError(f"layer {t.name!r} with weight shape {tuple(t.module.weight.shape)}: its input size "
                         f"{t.module.weight.shape[t.in_dim]} is not a multiple of M={nm.m} for pattern {nm}; "
                         "exclude it or pad the layer")


def _copy_checked(dst: Tensor, src: object, what: str) -> None:
    if not isinstance(src, Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
        got = f"{tuple(src.shape)} {src.dtype}" if isinstance(src, Tensor) else type(src).__name__
        raise UserValueError(f"saved {what} is {got}, expected {tuple(dst.shape)} {dst.dtype}")
    dst.copy_(src)

