"""Recovery after one-shot pruning: a short distillation run of the pruned model with every zero held.

One-shot pruning (``prune oneshot``) costs a language model quality that a little training against its dense
self wins back. :func:`recover` trains the pruned model on token windows with a :class:`~prune.Distiller`'s
loss (the language-modelling loss mixed with the KL to the dense teacher's logits), while :func:`hold_masks`
keeps each pruned weight at exactly zero: a :class:`~prune.Pruner` at sparsity 0 whose masks are replaced by the
model's own nonzeros and never updated, so any per-layer or per-row sparsity the one shot chose (OWL's among
them) stays as it was. At the end the masks are baked in (``Pruner.finalize``): the model has the same zeros,
with new values in the weights it kept.

``prune recover PRUNED --teacher DENSE --text FILE -o OUT`` runs it on model folders.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=1)
    >>> teacher = LlamaForCausalLM(cfg)
    >>> student = LlamaForCausalLM(cfg)
    >>> student.load_state_dict(teacher.state_dict())
    <All keys matched successfully>
    >>> with torch.no_grad():  # pruned: half of every projection's weights zero
    ...     for name, p in student.named_parameters():
    ...         if name.endswith("proj.weight"):
    ...             _ = p.mul_((torch.rand_like(p) > 0.5).float())
    >>> zeros = {n: p == 0 for n, p in student.named_parameters() if n.endswith("proj.weight")}
    >>> report = recover(student, teacher, [torch.randint(0, 32, (4, 16))], steps=20, lr=1e-2, progress=False)
    >>> report.losses[-1] < report.losses[0], all(torch.equal(p == 0, zeros[n])
    ...     for n, p in student.named_parameters() if n in zeros)
    (True, True)
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from prune.distill import Distiller
from prune.model_folder import check_output, load_folder, write_model_folder
from prune.pruner import Pruner
from sparse_ops.errors import UserValueError

REPORT = "recovery.json"  # in the output folder: the RecoveryReport


def hold_masks(model: nn.Module, **targets) -> Pruner:
    """A :class:`~prune.Pruner` whose masks are ``model``'s current nonzeros, never updated: training keeps
    every zero weight at zero. ``targets``: the Pruner's ``types`` / ``include`` / ``exclude``.

    >>> model = nn.Sequential(nn.Linear(3, 2, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))
    >>> hold_masks(model).masks["0"].int().tolist()
    [[1, 0, 1], [0, 0, 1]]
    """
    pruner = Pruner(model, sparsity=0.0, **targets)
    state = pruner.state_dict()
    with torch.no_grad():
        state["masks"] = {t.name: t.module.weight != 0 for t in pruner.targets}
    pruner.load_state_dict(state)
    return pruner


@dataclass
class RecoveryReport:
    """What :func:`recover` did: the loss of every step (the weighted mix) and each term per step."""

    steps: int
    losses: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)

    def __str__(self) -> str:
        def mean(v: list[float]) -> float:
            return sum(v) / max(1, len(v))

        first, last = self.losses[: max(1, self.steps // 10)], self.losses[-max(1, self.steps // 10):]
        terms = ", ".join(f"{k} {mean(v[:len(first)]):.4f} -> {mean(v[-len(last):]):.4f}"
                          for k, v in self.parts.items())
        return f"recovery: {self.steps} steps, loss {mean(first):.4f} -> {mean(last):.4f} ({terms})"


def recover(model: nn.Module, teacher: nn.Module, batches: Sequence[Tensor], *, steps: int = 200,
            lr: float = 2e-5, warmup: float = 0.1, temperature: float = 2.0, task_weight: float = 1.0,
            logits_weight: float = 1.0, max_grad_norm: float = 1.0, include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] = (), progress: bool = True) -> RecoveryReport:
    """Train a pruned causal LM towards ``teacher`` for ``steps`` optimizer steps over ``batches`` ((B, L) token
    ids, cycled), every zero of its target weights held (:func:`hold_masks`); returns the per-step losses.

    The loss: ``task_weight`` times the model's language-modelling loss plus ``logits_weight`` times the KL to
    the teacher's logits at ``temperature``. AdamW at ``lr`` (linear warm-up over the first ``warmup`` share of
    the steps, then linear decay to 0), gradients clipped to ``max_grad_norm``. The model is left finalized
    (plain weights, the same zeros) and in eval mode, also when training stops early (an exception, Ctrl-C).
    Example: see the module docstring.
    """
    if steps < 1:
        raise UserValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise UserValueError(f"lr must be positive, got {lr}")
    if not 0 <= warmup < 1:
        raise UserValueError(f"warmup must be in [0, 1), got {warmup}")
    if not batches:
        raise UserValueError("recover needs at least one batch of token ids")
    for b in batches:
        if not isinstance(b, Tensor) or b.ndim != 2 or b.dtype != torch.long:
            raise UserValueError(f"batches must be (batch, length) int64 token ids, got "
                             f"{getattr(b, 'shape', type(b).__name__)} {getattr(b, 'dtype', '')}")
    distiller = Distiller(model, teacher, temperature=temperature, task_weight=task_weight,
                          logits_weight=logits_weight)
    pruner = hold_masks(model, include=include, exclude=exclude)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ramp = max(1, math.ceil(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / ramp, max(0.0, (steps - s) / max(1, steps - ramp))))
    report = RecoveryReport(steps)
    model.train()
    device = next(model.parameters()).device
    try:
        with tqdm(total=steps, desc="recover", unit="step", disable=not progress, file=sys.stderr) as bar:
            for ids in itertools.islice(itertools.cycle(batches), steps):
                ids = ids.to(device)
                out = distiller({"input_ids": ids, "labels": ids})
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                pruner.step()
                report.losses.append(out.loss.item())
                for k, v in out.parts.items():
                    report.parts.setdefault(k, []).append(v.item())
                bar.set_postfix(loss=f"{report.losses[-1]:.4f}")
                bar.update()
    finally:
        model.eval()
        distiller.remove()
        pruner.finalize()
    return report


def recover_folder(pruned_dir: str | os.PathLike, teacher_dir: str | os.PathLike, text: str | os.PathLike,
                   out_dir: str | os.PathLike, *, overwrite: bool = False, samples: int = 64, seq_len: int = 256,
                   batch_size: int = 4, seed: int = 0, **options) -> RecoveryReport:
    """:func:`recover` on model folders (``prune recover``): the pruned (dense-stored) folder trained towards the
    ``teacher_dir`` model on ``samples`` windows of ``seq_len`` tokens of ``text`` (a .txt or .jsonl file), in
    float32, written to ``out_dir`` with its tokenizer and ``recovery.json`` (the report); ``options`` go to
    :func:`recover`. The output appears whole or not at all."""
    from prune.one_shot.data import as_texts, calibration_batches

    dst = check_output(out_dir, [pruned_dir, teacher_dir], overwrite)
    texts = as_texts(text)  # read (and refused when empty or malformed) before the models load
    model, tokenizer = load_folder(pruned_dir, tokenizer_for="training on text")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise UserValueError(f"seq_len={seq_len} exceeds the model's {positions} positions")
    teacher, _ = load_folder(teacher_dir)
    model.float()
    teacher.float()
    batches = calibration_batches(texts, tokenizer, samples=samples, seq_len=seq_len, seed=seed,
                                  batch_size=batch_size)
    report = recover(model, teacher, batches, **options)
    write_model_folder(dst, model, tokenizer, {REPORT: json.dumps(dataclasses.asdict(report), indent=1)},
                       overwrite=overwrite)
    return report
