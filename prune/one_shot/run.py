"""``oneshot``: prune a pretrained model in one shot from calibration data, block by block, no training.

The calibration windows run through the model one transformer block at a time (``sequential.iter_blocks``):
each block sees the inputs its pruned predecessors give it, forward pre-hooks collect its linears' input
statistics (``prune.calibration.InputStats``), and then each linear is pruned in place:

- ``"sparsegpt"``: the OBS reconstruction update from the layer's Gram matrix (``sparsegpt.py``);
- ``"wanda"``: ``|W| * ||X_j||`` compared within each output row (``prune.criteria.wanda``; ``scope="row"``);
- ``"magnitude"``: ``|W|``, across the layer by default (``scope="layer"``) or per row.

``pattern`` is ``"unstructured"`` or ``"N:M"`` along the input dimension. ``profile="owl"`` spreads the
sparsity over blocks by their outlier ratios (``owl.py``; one more calibration pass, over the dense model).
The model keeps its modules and state-dict keys: pruned weights are exact zeros, so ``save_pretrained`` gives
a folder ``prune convert`` and ``sparse_ops.from_pretrained`` take.

Peak memory is the model plus one block's calibration activations and, per linear of the block being pruned,
an (in, in) float64 Gram matrix (SparseGPT needs it; for the other methods it only gives the report's error,
``errors=False`` skips it).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    >>> calibration = torch.randint(0, 64, (8, 16))  # token ids: 8 windows of 16
    >>> model, report = oneshot(model, calibration, method="wanda", sparsity=0.5, progress=False)
    >>> len(report.layers), round(report.sparsity, 3)
    (14, 0.5)
    >>> float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean())
    0.5
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from prune.calibration import InputStats
from prune.criteria import CRITERIA, Evidence
from prune.masks import NMPattern, weight_mask
from prune.one_shot import owl
from prune.one_shot.config import OneShotConfig
from prune.one_shot.data import calibration_batches, check_activation_memory, check_window
from prune.one_shot.sequential import CalibrationBlock, block_linears, find_blocks, iter_blocks
from prune.one_shot.sparsegpt import relative_error, sparsegpt_prune
from prune.targets import find_targets, input_dim
from sparse_ops.errors import MisuseError, UserValueError
from sparse_ops.quantized import on_grid, row_scales
from sparse_ops.tables import text_table


@dataclass(frozen=True)
class LayerResult:
    """One pruned linear: its sparsity (reached and asked), the relative reconstruction error on the calibration
    inputs ``||W X - W' X|| / ||W X||`` (None without ``errors``), and the seconds its pruning took."""

    name: str
    shape: tuple[int, ...]
    sparsity: float
    target: float
    error: float | None
    seconds: float


@dataclass(frozen=True)
class OneShotReport:
    """What ``oneshot`` did: the settings, one ``LayerResult`` per pruned layer, the selected layers left dense
    (outside the transformer blocks), and the total seconds."""

    method: str
    pattern: str
    profile: str
    target: float
    layers: tuple[LayerResult, ...]
    left_dense: tuple[str, ...]
    seconds: float
    # with bits=8: weight name -> the (out,) scales of its rows' int8 grids (not in to_dict)
    scales: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def sparsity(self) -> float:
        """Zeros over all pruned weights (parameter-weighted)."""
        numel = [torch.Size(r.shape).numel() for r in self.layers]
        return sum(r.sparsity * n for r, n in zip(self.layers, numel)) / max(sum(numel), 1)

    def to_dict(self) -> dict:
        plain = dataclasses.replace(self, scales={})  # the scales are tensors: not JSON
        return {**{k: v for k, v in asdict(plain).items() if k != "scales"}, "sparsity": self.sparsity,
                "bits": 8 if self.scales else None}

    def __str__(self) -> str:
        rows = [(r.name, "x".join(map(str, r.shape)), f"{r.sparsity:.3f}",
                 "-" if r.error is None else f"{r.error:.4f}", f"{r.seconds:.2f}") for r in self.layers]
        lines = text_table(("layer", "shape", "sparsity", "rel. error", "s"), rows).splitlines()
        lines.append(f"{self.method}, {self.pattern}, {self.profile}: {len(self.layers)} layers at "
                     f"{self.sparsity:.4f} sparsity (asked {self.target}) in {self.seconds:.1f} s")
        if self.left_dense:
            lines.append(f"left dense (outside the blocks): {', '.join(self.left_dense)}")
        return "\n".join(lines)


class OneShotResult(NamedTuple):
    model: nn.Module
    report: OneShotReport


def oneshot(model: nn.Module, calibration: Tensor | Sequence[str] | str | os.PathLike,
            config: OneShotConfig | None = None, *, tokenizer=None, device: torch.device | str | None = None,
            progress: bool = True, **options: object) -> OneShotResult:
    """Prune ``model`` (a Hugging Face decoder or BERT-family encoder) in place; returns ``(model, report)``.

    What to prune and how is a :class:`~prune.one_shot.config.OneShotConfig` (``config``), whose fields may also
    be given as keyword ``options`` (they override ``config``'s); every option is checked before any work.
    ``calibration``: token ids ((n, seq) windows or a 1-D stream), or texts / a .txt or .jsonl path with
    ``tokenizer`` (``data.calibration_batches``: ``samples`` windows of ``seq_len`` tokens, ``seed``).
    ``sparsity``: per layer (default 0.5; with an N:M ``pattern``, 1 - N/M and nothing else). ``include`` /
    ``exclude``: module name patterns (``prune.targets``); only linears inside the blocks are pruned.
    ``scope``: ``"row"`` or ``"layer"`` for wanda / magnitude (defaults: row, layer). ``block_size`` and
    ``damp``: SparseGPT's column block and relative dampening. ``profile="owl"``: per-block sparsities from
    outlier ratios (``owl_threshold`` = M, ``owl_lambda``), mean ``sparsity``. ``sequential``: within a block,
    prune its linears stage by stage in call order (q/k/v, then o, then gate/up, then down), each stage's
    statistics collected from the block with the earlier stages already pruned (about 25% more forward work);
    the default collects every linear's statistics in one pass over the dense block, as SparseGPT's and
    Wanda's reference codes do. ``bits=8``: the pruned weights are left on their rows' symmetric int8 grids
    (float32 ``nn.Linear`` weights): SparseGPT quantizes jointly, compensating each weight's rounding like a pruned
    weight's (``sparsegpt_prune``); Wanda and magnitude quantize after pruning (absmax per row). The result's
    report's ``scales`` give each grid, so that ``convert_checkpoint(..., quantize="int8", scales=...)`` stores exactly
    these weights (``oneshot_folder`` does). Whether ``sequential`` pays depends on the model and pattern: compare
    both with ``benchmarks/oneshot_quality.py`` (its ``-seq`` configurations). ``device``: where blocks compute
    (a CPU model is moved there one block at a time). Example: the module docstring.
    """
    c = OneShotConfig(**options) if config is None else dataclasses.replace(config, **options)
    nm, sparsity, scope = c.resolved()
    start = time.perf_counter()
    batches = _calibration(model, calibration, tokenizer, c.samples, c.seq_len, c.seed, c.batch_size, device)
    blocks = find_blocks(model)
    selected, in_blocks = _targets_in_blocks(model, blocks.path, c.include, c.exclude)
    if c.bits:
        _check_int8_targets({n: model.get_submodule(n) for n in in_blocks})
    per_block = [sparsity] * len(blocks.layers)
    if c.profile == "owl":
        ratios = _outlier_ratios(model, batches, in_blocks, c.owl_threshold, device, progress)
        per_block = owl.block_sparsities(ratios, sparsity, lam=c.owl_lambda)
    results, scales = _prune_blocks(model, batches, in_blocks, per_block, c, nm, scope, device, progress)
    report = OneShotReport(c.method, str(nm) if nm else "unstructured", c.profile, sparsity, tuple(results),
                           tuple(sorted(set(selected) - in_blocks)), time.perf_counter() - start, scales)
    return OneShotResult(model, report)


def _prune_blocks(model: nn.Module, batches: list[Tensor], in_blocks: set[str], per_block: list[float],
                  c: OneShotConfig, nm: NMPattern | None, scope: str | None, device: torch.device | str | None,
                  progress: bool) -> tuple[list[LayerResult], dict[str, Tensor]]:
    """Prune each block's selected linears from the statistics of its inputs (stage by stage when
    ``c.sequential``); each layer's result and, with ``c.bits``, the int8 grid of each pruned weight."""
    results: list[LayerResult] = []
    scales: dict[str, Tensor] = {}
    gram = c.errors or c.method == "sparsegpt"
    for block in iter_blocks(model, batches, device=device, progress=progress):
        layers = _selected(block.name, block.module, in_blocks)
        stages = _stages(layers, block) if c.sequential else [list(layers)]
        for k, stage in enumerate(stages):
            until = layers[stages[k + 1][0]] if k + 1 < len(stages) else None
            stats = _collect({n: layers[n] for n in stage}, block, until=until, gram=gram)
            for name in stage:
                result, grid = _prune_layer(name, layers[name], stats[name], c.method, per_block[block.index], nm,
                                            scope, c.block_size, c.damp, c.bits)
                results.append(result)
                if grid is not None:
                    scales[f"{name}.weight"] = grid
                del stats[name]  # its Gram matrix: (in, in) float64
        block.advance()
    return results, scales


def _calibration(model: nn.Module, calibration: object, tokenizer, samples: int, seq_len: int, seed: int,
                 batch_size: int, device: torch.device | str | None) -> list[Tensor]:
    """The calibration batches, once it is known that their windows fit the model's positions and that the
    activations kept between blocks fit in memory (UserValueError otherwise, before any work)."""
    batches = calibration_batches(calibration, tokenizer, samples=samples, seq_len=seq_len, seed=seed,
                                  batch_size=batch_size)
    check_window(model, batches[0].shape[1])
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    on_cpu = torch.device(device or next(model.parameters()).device).type == "cpu"
    if isinstance(hidden, int) and on_cpu:
        itemsize = next(model.parameters()).element_size()
        check_activation_memory(sum(len(b) for b in batches), batches[0].shape[1], hidden, itemsize)
    return batches


def _targets_in_blocks(model: nn.Module, path: str, include, exclude) -> tuple[dict[str, object], set[str]]:
    """The selected targets by name and the names of those inside the blocks at ``path`` (what one-shot prunes;
    tied output layers outside them are left alone without a warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selected = {t.name: t for t in find_targets(model, include=include, exclude=exclude)}
    for w in caught:
        if f" {path}." in str(w.message) or "shared with" not in str(w.message):
            warnings.warn(w.message, stacklevel=3)
    in_blocks = {n for n in selected if n.startswith(path + ".")}
    if not in_blocks:
        raise UserValueError(f"no selected linear layer lies inside the blocks ({path}.*); check include/exclude")
    return selected, in_blocks


def _check_int8_targets(layers: dict[str, nn.Module]) -> None:
    """ValueError naming the first layer ``bits=8`` cannot keep on an int8 grid: not float32, or a Conv1D (its
    rows are inputs, not the outputs the int8 formats scale)."""
    for name, m in layers.items():
        if m.weight.dtype != torch.float32 or input_dim(m) != 1:
            raise UserValueError(f"bits=8 needs float32 nn.Linear-style weights (out, in); {name} is "
                             f"{m.weight.dtype} with its input on dim {input_dim(m)}")


def _selected(name: str, block: nn.Module, in_blocks: set[str]) -> dict[str, nn.Module]:
    """The block's linears to prune, by qualified name."""
    return {f"{name}.{k}": m for k, m in block_linears(block).items() if f"{name}.{k}" in in_blocks}


def _stages(layers: dict[str, nn.Module], block: CalibrationBlock) -> list[list[str]]:
    """The block's layers in the order its forward calls them, grouped into stages: consecutive layers that read
    one input tensor (q, k and v; gate and up) form a stage. Found on the first calibration input; layers the
    forward never reached come last (pruning them then fails with a clear error)."""
    order: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            order.setdefault(name, args[0])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        block.run(count=1)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    previous = None
    for name, x in order.items():
        if stages and x is previous:
            stages[-1].append(name)
        else:
            stages.append([name])
        previous = x
    unseen = [n for n in layers if n not in order]
    return stages + ([unseen] if unseen else [])


def _collect(layers: dict[str, nn.Module], block: CalibrationBlock, *, until: nn.Module | None = None,
             gram: bool) -> dict[str, InputStats]:
    """Every layer's input statistics over one pass of the calibration inputs through ``block`` (each input's
    pass ending where ``until`` is about to run, when given: ``CalibrationBlock.run``). Layers that
    read the very same input tensor (q, k and v; gate and up) share one ``InputStats``: the Gram matrices are
    most of the pass's cost beyond the forward itself."""
    stats: dict[str, InputStats] = {}
    owner: dict[str, str] = {}  # layer -> the layer whose statistics it shares (itself, mostly): set at first sight
    last: list = [None, None]  # the latest input tensor counted, and by whom

    def hook_for(name: str, module: nn.Module):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in owner:
                owner[name] = last[1] if last[0] is x else name
                if owner[name] == name:
                    stats[name] = InputStats(module.weight.shape[input_dim(module)], gram=gram,
                                             device=module.weight.device)
            if owner[name] != name:
                if last[0] is not x:
                    raise MisuseError(f"layer {name!r} read {owner[name]!r}'s input on one batch and not on "
                                       "another; their statistics cannot be shared")
                return  # counted by its owner
            stats[name].update(x)
            last[0], last[1] = x, name
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in layers.items()]
    try:
        block.run(until=until)
    finally:
        for h in handles:
            h.remove()
        last.clear()
    return {n: stats[owner[n]] if n in owner else InputStats(m.weight.shape[input_dim(m)], gram=gram)
            for n, m in layers.items()}  # a layer no input reached: 0 rows, refused when pruned


@torch.no_grad()
def _prune_layer(name: str, module: nn.Module, stats: InputStats, method: str, sparsity: float,
                 nm: NMPattern | None, scope: str | None, block_size: int, damp: float,
                 bits: int | None = None) -> tuple[LayerResult, Tensor | None]:
    """Prune one layer in place; its result and, with ``bits``, the scales of its rows' int8 grids."""
    t0 = time.perf_counter()
    w, in_dim = module.weight, input_dim(module)
    if stats.rows == 0:
        raise MisuseError(f"no calibration input reached layer {name!r}; it cannot be pruned from data")
    grid = None
    if method == "sparsegpt":
        result = sparsegpt_prune(w, stats.gram, sparsity, nm=nm, block_size=block_size, damp=damp, in_dim=in_dim,
                                 bits=bits)
        new, error, grid = result.weight, result.error, result.scales
    else:
        scores = CRITERIA[method].score(w, Evidence(in_dim=in_dim, inputs=stats))
        new = torch.where(weight_mask(scores, sparsity, scope=scope, nm=nm, in_dim=in_dim), w, 0)
        if bits:  # quantize after pruning
            grid = row_scales(new)
            new = on_grid(new, grid)
        error = None if stats.gram is None else relative_error(w, new, stats.gram, in_dim)
    w.copy_(new)
    zeros = int((w == 0).sum()) / max(w.numel(), 1)
    return LayerResult(name, tuple(w.shape), zeros, sparsity, error, time.perf_counter() - t0), grid


def _outlier_ratios(model: nn.Module, batches: list[Tensor], in_blocks: set[str], threshold: float,
                    device: torch.device | str | None, progress: bool) -> list[float]:
    """Each block's OWL outlier ratio, from a pass over the dense model (nothing pruned)."""
    ratios: list[float] = []
    for block in iter_blocks(model, batches, device=device, progress=progress):
        layers = _selected(block.name, block.module, in_blocks)
        stats = _collect(layers, block, gram=False)
        scores = [CRITERIA["wanda"].score(m.weight, Evidence(in_dim=input_dim(m), inputs=stats[n]))
                  for n, m in layers.items()]
        ratios.append(owl.outlier_ratio(scores, threshold) if scores else 0.0)
        block.advance()
    return ratios
