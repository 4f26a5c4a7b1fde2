"""Distillation from a teacher while pruning: the losses sparse transfer learning trains with.

A pruned model recovers more of its quality when it learns from its dense self (or a larger teacher) than from
the task's labels alone: movement pruning (Sanh et al. 2020) and oBERT (Kurtic et al. 2022) prune with a mix
of the task loss, a KL divergence between the teacher's and the student's logits at a temperature, and
distances between chosen hidden states. :class:`Distiller` computes that mix in an ordinary training loop:

- the teacher: any ``nn.Module`` taking the student's inputs, run in eval mode without gradients; by default a
  frozen copy of the student made when the Distiller is built, which must be before a :class:`~prune.Pruner`
  masks it (the dense model is the teacher);
- ``logits``: ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over the last dimension, averaged over
  the rows (tokens; with an ``attention_mask`` in the inputs, its padded tokens left out);
- ``hidden``: {student module name: teacher module name} (or a list of names: the same module in both); each
  pair's outputs (a module's tensor, or the first element of a tuple) compared by ``"mse"`` or ``"cosine"``
  (1 - cosine over the last dimension), averaged over the pairs;
- the task loss: the student output's ``loss`` (a transformers model given ``labels``), or ``task_loss(output,
  inputs)``;
- ``loss = task_weight * task + logits_weight * logits + hidden_weight * hidden``; a weight of 0 skips its term.

Distributed training (``tests/test_distill_distributed.py``; the order matters because the default teacher is a
copy of the dense model): build the Distiller on the model first, then shard or wrap it.

- DDP: ``distiller = Distiller(model)``, ``Pruner(model, ...)``, ``ddp = DistributedDataParallel(model)``, and
  each step ``distiller(inputs, student=ddp)``, so that the student's gradients are synchronised. The teacher
  is replicated: every rank holds a whole copy and runs it on its own micro-batch.
- FSDP2: ``distiller = Distiller(model)``, ``fully_shard(...)`` on the model, ``Pruner(model, ...)``, then
  ``distiller(inputs)``. The default teacher is replicated (a whole dense copy per rank, without gradients or
  optimizer state); to shard it too, pass ``teacher=`` a copy that ``fully_shard`` was applied to.

Each rank's loss is the mean over its micro-batch, so with equal micro-batches the ranks' mean is the
single-process loss on the global batch, and the synchronised gradients are its gradients.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prune import Pruner, Constant
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> distiller = Distiller(model, temperature=2.0, hidden={"1": "1"})  # the teacher: a copy, before pruning
    >>> pruner = Pruner(model, sparsity=Constant(0.5))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x = torch.randn(32, 8)
    >>> losses = []
    >>> for _ in range(20):
    ...     out = distiller(x)
    ...     out.loss.backward()
    ...     opt.step(); opt.zero_grad(); pruner.step()
    ...     losses.append(out.loss.item())
    >>> sorted(out.parts), losses[-1] < losses[0]
    (['hidden', 'logits'], True)
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from prune.distill_settings import HIDDEN_LOSSES, SETTINGS, check_settings  # noqa: F401 (re-exported)
from prune.sharding import is_sharded
from sparse_ops.errors import UserTypeError, UserValueError


@dataclass
class Distilled:
    """One step's result: ``loss`` (the weighted mix, to backpropagate), ``parts`` (each term before its
    weight, detached: "task", "logits", "hidden", those computed) and the student's ``output``."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    output: object = None


def logits_of(output: object) -> torch.Tensor:
    """The logits of a model's output: ``output.logits``, the first element of a tuple, or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UserTypeError(f"cannot find logits in a {type(output).__name__}: pass a model whose output is a tensor, a "
                    f"tuple starting with the logits, or has .logits")


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over the last dimension, averaged over the rows
    (every leading position; where ``mask`` (the leading shape) is 0 the row is left out).

    >>> s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2.0 * torch.log(torch.tensor(3.0))]])
    >>> round(kl_logits(s, t, 2.0).item(), 5)  # T = 2: teacher (1/4, 3/4), student (1/2, 1/2); 4 KL
    0.52325
    """
    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=-1)
    t_log = F.log_softmax(teacher.float() / t, dim=-1)
    per_row = (t_log.exp() * (t_log - s_log)).sum(-1)
    if mask is None:
        return per_row.mean() * t * t
    keep = mask.to(per_row.dtype)
    return (per_row * keep).sum() / keep.sum().clamp_min(1) * t * t


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean squared error (``"mse"``) or 1 - cosine similarity over the last dimension, averaged (``"cosine"``).

    >>> a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    >>> hidden_distance(a, b, "mse").item(), hidden_distance(a, b, "cosine").item()
    (2.5, 1.0)
    """
    if student.shape != teacher.shape:
        raise UserValueError(f"hidden states differ in shape: student {tuple(student.shape)}, teacher "
                         f"{tuple(teacher.shape)}")
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    raise UserValueError(f"unknown hidden_loss {kind!r}; allowed: {', '.join(HIDDEN_LOSSES)}")


class _Capture:
    """Forward hooks keeping the output tensor of named modules (the first element of a tuple output)."""

    def __init__(self, model: nn.Module, names: list[str], who: str):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UserValueError(f"{who} has no module {missing[0]!r} (hidden= names modules as named_modules() "
                             f"does)")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable:
        def keep(module: nn.Module, args: tuple, output: object) -> None:
            t = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(t, torch.Tensor):
                raise UserTypeError(f"module {name!r} returned a {type(t).__name__}, not a tensor")
            self.out[name] = t
        return keep

    def take(self) -> dict[str, torch.Tensor]:
        out, self.out = self.out, {}
        return out


class Distiller:
    """Runs the teacher beside the student and mixes the distillation losses with the task loss (see the module
    docstring). ``distiller(inputs)`` -> :class:`Distilled`: inputs a dict (``model(**inputs)``), a tuple
    (``model(*inputs)``) or one tensor; ``loss`` is what to backpropagate.

    Example: see the module docstring.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, temperature: float = 2.0,
                 logits_weight: float = 1.0, hidden: Mapping[str, str] | Sequence[str] | None = None,
                 hidden_loss: str = "mse", hidden_weight: float = 1.0, task_weight: float = 1.0,
                 task_loss: Callable[[object, object], torch.Tensor] | None = None):
        settings = check_settings(temperature=temperature, logits_weight=logits_weight, hidden=hidden,
                                  hidden_loss=hidden_loss, hidden_weight=hidden_weight, task_weight=task_weight)
        if isinstance(student, nn.parallel.DistributedDataParallel):
            raise UserTypeError("pass the model itself, not its DistributedDataParallel wrapper: build the Distiller "
                            "first and call distiller(inputs, student=ddp_model)")
        if teacher is None:
            if any(is_sharded(p) for p in student.parameters()):
                raise UserValueError("the student is already sharded (fully_shard): build the Distiller before "
                                 "fully_shard, so that its teacher is a dense copy, or pass teacher=")
            if any(parametrize.is_parametrized(m) for m in student.modules()):
                raise UserValueError("the student is already masked (a Pruner wraps it): build the Distiller before the "
                                 "Pruner, so that its teacher is the dense model, or pass teacher=")
            teacher = copy.deepcopy(student)
        teacher.eval()
        teacher.requires_grad_(False)
        self.student, self.teacher = student, teacher
        self.settings = settings
        self.temperature, self.hidden_loss = settings["temperature"], hidden_loss
        self.weights = {k: settings[f"{k}_weight"] for k in ("task", "logits", "hidden")}
        self.task_loss = task_loss
        self.pairs = settings["hidden"]
        if self.pairs and self.weights["hidden"] > 0:
            self._student_hooks = _Capture(student, list(self.pairs), "the student")
            self._teacher_hooks = _Capture(teacher, list(self.pairs.values()), "the teacher")
        else:
            self._student_hooks = self._teacher_hooks = None

    @classmethod
    def from_recipe(cls, student: nn.Module, recipe: object, teacher: nn.Module | None = None, *,
                    task_loss: Callable[[object, object], torch.Tensor] | None = None) -> Distiller:
        """A Distiller with a recipe's ``distill`` settings (a path, a mapping or a :class:`~prune.Recipe`;
        see :mod:`prune.recipe`); a recipe without them is a ValueError.

        >>> spec = {"schedule": {"kind": "Constant", "final": 0.5}, "distill": {"temperature": 4, "hidden": ["0"]}}
        >>> Distiller.from_recipe(nn.Sequential(nn.Linear(4, 4)), spec).settings["hidden"]
        {'0': '0'}
        """
        from prune.recipe import as_recipe

        rec = as_recipe(recipe)
        if rec.distill is None:
            raise UserValueError("the recipe has no 'distill' settings")
        return cls(student, teacher, task_loss=task_loss, **rec.distill)

    def __call__(self, inputs: object, student: nn.Module | None = None) -> Distilled:
        """One step's losses on ``inputs``. ``student``: the module to run in the student's place, a wrapper
        around it such as ``DistributedDataParallel(student)`` (whose gradient synchronisation the step needs)."""
        if student is None:
            student = self.student
        elif getattr(student, "module", student) is not self.student:
            raise UserValueError(f"student= must be the Distiller's student or a wrapper of it (its .module), got a "
                             f"{type(student).__name__} around another model")
        with torch.no_grad():
            self.teacher.eval()
            t_out = _run(self.teacher, inputs)
        s_out = _run(student, inputs)
        parts: dict[str, torch.Tensor] = {}
        total = None

        def add(name: str, value: torch.Tensor) -> None:
            nonlocal total
            parts[name] = value.detach()
            term = self.weights[name] * value
            total = term if total is None else total + term

        if self.weights["task"] > 0:
            task = self.task_loss(s_out, inputs) if self.task_loss else getattr(s_out, "loss", None)
            if task is not None:
                add("task", task)
        if self.weights["logits"] > 0:
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            student_logits = logits_of(s_out)
            if mask is not None and mask.shape != student_logits.shape[:-1]:
                mask = None  # not per token of the logits (a classifier's): every row counts
            add("logits", kl_logits(student_logits, logits_of(t_out), self.temperature, mask))
        if self._student_hooks is not None:
            s_h, t_h = self._student_hooks.take(), self._teacher_hooks.take()
            dist = [hidden_distance(s_h[s], t_h[t], self.hidden_loss) for s, t in self.pairs.items()]
            add("hidden", torch.stack(dist).mean())
        if total is None:
            raise UserValueError("nothing to train on: no term has a positive weight and a value (the student's "
                             "output has no .loss and no task_loss was given)")
        return Distilled(total, parts, s_out)

    def remove(self) -> None:
        """Remove the forward hooks this Distiller put on the student and the teacher."""
        for hooks in (self._student_hooks, self._teacher_hooks):
            for h in hooks.handles if hooks else ():
                h.remove()




def _run(model: nn.Module, inputs: object) -> object:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
