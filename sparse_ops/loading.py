"""Loading a sparse checkpoint into a model: ``sparsify`` swaps each linear layer stored sparse for a
``SparseLinear`` (nn.Linear as stored; transformers' Conv1D, whose weight is (in, out), transposed at load, or
taken as it is where the checkpoint stores its transpose: ``checkpoint.schema.Transposed``),
loads the rest as a state dict (tied weights and non-persistent buffers handled), plans each layer's path per
batch bucket (``sparse_ops.plan``) and runs the proven fusions on request. Reading, converting and inspecting
checkpoints is ``sparse_ops.checkpoint``; building the model from a folder's config is ``sparse_ops.pretrained``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sparse_ops.checkpoint.schema import Transposed, load_sparse_state_dict
from sparse_ops.errors import UserValueError
from sparse_ops.formats import CSR, SparseFormat, csr_col_dtype
from sparse_ops.kernels import cpp
from sparse_ops.quantized import INPUT_BITS, DenseInt8, Int8Weight
from sparse_ops.registry import format_class


def transpose_csr(w: CSR) -> CSR:
    """The CSR of ``w``'s transpose, without a dense copy: (rows, cols) -> (cols, rows), entries re-sorted by
    column (a stable sort keeps the rows increasing within each new row). Scratch: a few int64 (nnz,) tensors.

    Example:
        >>> w = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0]])
        >>> t = transpose_csr(CSR.from_dense(w))
        >>> t.shape, torch.equal(t.to_dense(), w.t()), t.crow_indices.tolist(), t.col_indices.tolist()
        ((3, 2), True, [0, 1, 2, 4], [1, 0, 0, 1])
    """
    rows, cols = w.shape
    counts = (w.crow_indices[1:] - w.crow_indices[:-1]).to(torch.int64)
    row_of = torch.repeat_interleave(torch.arange(rows, device=w.device), counts)  # (nnz,) row of each entry
    col_of = w.col_indices.to(torch.int64)  # (nnz,)
    order = torch.argsort(col_of, stable=True)  # (nnz,) entries in (column, row) order
    crow = torch.zeros(cols + 1, dtype=torch.int64, device=w.device)
    crow[1:] = torch.cumsum(torch.bincount(col_of, minlength=cols), 0)
    return CSR(crow.to(torch.int32), row_of[order].to(csr_col_dtype(rows)), w.values[order], (cols, rows))


def transpose_sparse(w: SparseFormat | Transposed) -> tuple[SparseFormat, str | None]:
    """(w^T, None) in ``w``'s format; a ``Transposed`` (w stored as its transpose) its stored format object as
    it is, CSR directly, others through dense once. Where w^T breaks the format (the transpose of a 2:4 weight
    is rarely 2:4), w^T as CSR and a note saying why."""
    if isinstance(w, Transposed):
        return w.inner, None
    if isinstance(w, CSR):
        return transpose_csr(w), None
    t = w.to_dense().t().contiguous()  # (cols, rows)
    try:
        return format_class(w.format).from_dense(t), None
    except ValueError:
        return CSR.from_dense(t), f"loads as csr: its (out, in) transpose is not {w.format}"


def _as_is(w: SparseFormat | Transposed) -> tuple[SparseFormat, str | None]:
    """An (out, in) weight as it is; one stored transposed (an nn.Linear's, which conversion does only where
    its pattern holds down the columns) turned back, as CSR with a note where that breaks its format."""
    return transpose_sparse(w.inner) if isinstance(w, Transposed) else (w, None)


def _with_dtype(w: SparseFormat | Transposed, dtype: torch.dtype) -> SparseFormat | Transposed:
    """``w`` computing in ``dtype``: its values cast, or an int8 weight's scales (``Int8Weight.with_dtype``)."""
    if isinstance(w, Int8Weight):
        return w.with_dtype(dtype)
    values = w.values.to(dtype)
    return w.with_values(values) if isinstance(w, Transposed) else dataclasses.replace(w, values=values)


# stored weight -> ((out, in) weight, note)
ToLinear = Callable[[SparseFormat | Transposed], tuple[SparseFormat, str | None]]


def _sparse_layers() -> dict[type, ToLinear]:
    """Module type -> how its stored sparse weight becomes a SparseLinear's (out, in) weight: nn.Linear's as it
    is; transformers' Conv1D (GPT-2: y = x @ W + b, W stored (in, out)) transposed. Conv1D is looked up among
    the imported modules: a model holding one has imported it, and no model needs transformers imported."""
    table: dict[type, ToLinear] = {nn.Linear: _as_is}
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if isinstance(conv1d, type):
        table[conv1d] = transpose_sparse
    return table


def _to_linear_for(module: nn.Module, table: dict[type, ToLinear]) -> ToLinear | None:
    return next((table[c] for c in type(module).__mro__ if c in table), None)


@dataclass(frozen=True)
class _Split:
    """A checkpoint sorted for one model."""

    dense: dict[str, torch.Tensor]  # for load_state_dict (sparse weights of other modules densified)
    # module name -> its stored sparse weight, and how it becomes a SparseLinear's
    swap: dict[str, tuple[SparseFormat | Transposed, ToLinear]]
    buffers: dict[str, torch.Tensor]  # keys naming a non-persistent buffer (not in the model's state_dict)
    left_dense: dict[str, str]  # key of a sparse weight loaded dense -> why


def _split_state(state: Mapping[str, torch.Tensor | SparseFormat | Transposed], model: nn.Module) -> _Split:
    table = _sparse_layers()
    modules = dict(model.named_modules())
    persistent = set(model.state_dict(keep_vars=True))
    loose = {n for n, _ in model.named_buffers(remove_duplicate=False)} - persistent
    split = _Split({}, {}, {}, {})
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        module = modules.get(name)
        to_linear = _to_linear_for(module, table) if module is not None and leaf == "weight" else None
        if key in loose:
            split.buffers[key] = value if isinstance(value, torch.Tensor) else value.to_dense()
        elif isinstance(value, torch.Tensor):
            split.dense[key] = value
        elif to_linear is not None:
            split.swap[name] = (value, to_linear)
        else:
            split.dense[key] = value.to_dense()
            if key in persistent:  # else: not the model's, reported as unexpected
                why = (f"{type(module).__name__} has no sparse layer" if leaf == "weight"
                       else "not a layer's weight")
                split.left_dense[key] = why
    return split


def _load_buffers(model: nn.Module, buffers: Mapping[str, torch.Tensor]) -> None:
    """Copy each tensor into the non-persistent buffer it names where the shapes agree; skip it otherwise (the
    model computes such buffers itself, e.g. BERT's ``position_ids``, saved by older transformers)."""
    with torch.no_grad():
        for key, value in buffers.items():
            buffer = model.get_buffer(key)
            if tuple(buffer.shape) == tuple(value.shape):
                buffer.copy_(value)


KERNEL_CHOICES = ("auto", "ours", "torch")  # sparsify(kernel=...)


def sparsify(model: nn.Module,
             source: str | os.PathLike | Mapping[str, torch.Tensor | SparseFormat | Transposed],
             device: torch.device | str = "cpu", *, kernel: str = "auto", batches: tuple[int, ...] = (),
             timer=None, cache=None, verbose: bool = False, fuse_activations: bool = False,
             fuse: bool = False, input_bits: int | None = None) -> nn.Module:
    """Load a checkpoint into ``model`` (in place) and swap each ``nn.Linear`` (and transformers' ``Conv1D``,
    its weight transposed) whose weight is stored sparse for a ``SparseLinear`` on ``device``; returns the model.
    A Conv1D weight stored transposed (``checkpoint.schema.Transposed``: 2:4 of its (out, in) transpose) becomes the
    layer's weight as stored, with no dense copy; an nn.Linear weight stored so is turned back (as CSR, with a
    warning, where its (out, in) form breaks the format).

    A sparse weight of any other module (an embedding converted with ``embeddings=True``) loads dense, with a
    warning naming it and why. A checkpoint key naming a non-persistent buffer of the model (not in its
    ``state_dict``) is copied into it where the shapes agree, and skipped otherwise.

    ``kernel="auto"`` (the default): each layer picks, per batch bucket, the fastest of dense, our kernels and
    torch's, measured on this machine at the first call in the bucket (or at load for ``batches``) and cached
    on disk, so that no layer runs slower than dense (``sparse_ops.plan``; ``plan.plan_report(model)`` shows
    the choices, ``verbose=True`` prints them as they are made; ``timer`` and ``cache`` replace the timer and
    the on-disk cache). ``kernel="ours"`` pins our kernels, ``"torch"`` torch's (where it has one) for every
    sparse layer at every batch, measuring nothing.
    ``fuse_activations=True`` then moves each activation module that only consumes a sparse layer's output into
    that layer's kernel (``sparse_ops.fusion.fuse_activations``: e.g. the GELU of a BERT FFN).
    ``fuse=True`` runs every proven fusion (``sparse_ops.fusion.fuse``): the activations, each feed-forward
    block of two sparse layers as one kernel call (the pair's state dict keys move under the second), and the
    residual add and LayerNorm after a sparse layer in its kernel; and a ``transformers`` model's attention goes
    to our kernel where it is faster than SDPA (``sparse_ops.attention.use_fast_attention``).
    ``input_bits=8`` quantizes the input of every int8 layer per block of 32 columns (``SparseLinear.input_bits``):
    one token then multiplies int8 by int8, as llama.cpp's Q8_0 does (ValueError without int8 layers).
    """
    from sparse_ops.plan import Planner

    if kernel not in KERNEL_CHOICES:
        raise UserValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNEL_CHOICES)}")
    if any(not isinstance(b, int) or b < 1 for b in batches):
        raise UserValueError(f"batches must be positive token counts, got {batches!r}")
    if input_bits not in INPUT_BITS:
        raise UserValueError(f"unknown input_bits {input_bits!r}; allowed: {', '.join(map(str, INPUT_BITS))}")
    planner = Planner(timer=timer, cache=cache, verbose=verbose) if kernel == "auto" else None
    state = source if isinstance(source, Mapping) else load_sparse_state_dict(source)
    split = _load_dense(model, state)
    model.to(device)
    swap = dict(split.swap)
    int8 = any(isinstance(w, Int8Weight) for w in state.values())
    if int8:  # int8 was asked for: the tied output head too
        swap.update(_tied_head_int8(model))
    if input_bits is not None and not int8:
        raise UserValueError(f"input_bits={input_bits} quantizes the inputs of int8 layers, and this checkpoint has "
                             f"none (convert it with prune convert --quantize int8)")
    if planner is not None and cpp.available():  # larger than the L3: one token reads its weights from memory
        planner.cold = _weight_bytes(model, swap) > cpp.caches()["L3"]
    notes = _swap_layers(model, swap, device, kernel, planner, batches, input_bits)
    _warn_layers(split.left_dense, "sparse weight(s) load dense")
    _warn_layers(notes, "sparse weight(s) change format")
    _fuse(model, fuse, fuse_activations)
    return model


def _fuse(model: nn.Module, everything: bool, activations: bool) -> None:
    """Every proven fusion and our attention (``everything``), or the activations into their layers only."""
    if everything:
        from sparse_ops.attention import use_fast_attention
        from sparse_ops.fusion import fuse

        fuse(model)
        use_fast_attention(model)
    elif activations:
        from sparse_ops.fusion import fuse_activations

        fuse_activations(model)


def _load_dense(model: nn.Module, state: Mapping[str, object]):
    """Load what the checkpoint stores dense (and the buffers) into ``model``; the split of ``state``, whose
    ``swap`` holds the layers to become sparse. ValueError when the checkpoint does not fit the model."""
    split = _split_state(state, model)
    result = model.load_state_dict(split.dense, strict=False)
    missing = _untied(model, set(result.missing_keys) - {f"{m}.weight" for m in split.swap}, set(split.dense))
    if result.unexpected_keys or missing:
        bad = sorted(result.unexpected_keys)[:1] or sorted(missing)[:1]
        raise UserValueError(f"checkpoint does not fit the model: {len(result.unexpected_keys)} unexpected and "
                             f"{len(missing)} missing tensors, e.g. {bad[0]!r}")
    _load_buffers(model, split.buffers)
    return split


def _swap_layers(model: nn.Module, swap: Mapping[str, tuple], device: torch.device | str, kernel: str,
                 planner, batches: tuple[int, ...], input_bits: int | None) -> dict[str, str]:
    """Put a ``SparseLinear`` in each swapped layer's place; the notes of the weights that changed format."""
    from sparse_ops.linear import SparseLinear

    notes = {}
    for name, (weight, to_linear) in swap.items():
        module = model.get_submodule(name)
        if tuple(module.weight.shape) != weight.shape:
            raise UserValueError(f"{name}.weight is {weight.shape} in the checkpoint, {tuple(module.weight.shape)} "
                                 f"in the model")
        weight, note = to_linear(_with_dtype(weight, module.weight.dtype))
        if isinstance(weight, Int8Weight):
            weight = weight.with_input_bits(input_bits)
        if note:
            notes[f"{name}.weight"] = note
        layer = SparseLinear(weight.to(device), module.bias.detach() if module.bias is not None else None,
                             torch_kernel=kernel == "torch", planner=planner, name=name)
        for b in batches:
            layer.route(b)  # measured (or read from the cache) now rather than at the first call
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return notes


def _weight_bytes(model: nn.Module, swap: Mapping[str, tuple]) -> int:
    """Bytes of the model's weights once loaded: each swapped layer's stored format, every other parameter."""
    swapped = {f"{name}.weight" for name in swap}
    kept = sum(p.nbytes for n, p in model.named_parameters() if n not in swapped)
    return kept + sum(weight.nbytes for weight, _ in swap.values())


def _tied_head_int8(model: nn.Module) -> dict[str, tuple[SparseFormat, ToLinear]]:
    """{name: (dense-int8 weight, _as_is)} for a Hugging Face model's output projection tied to its input
    embedding (``lm_head`` of SmolLM2, Llama 3.2, GPT-2): a checkpoint stores the embedding only, which
    conversion keeps in floating point (a lookup table), so the head is quantized here from it (per row, absmax)
    and untied; the embedding keeps its weights. Nothing for a model without a tied head."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head, emb = (get_out() if callable(get_out) else None), (get_in() if callable(get_in) else None)
    if not isinstance(head, nn.Linear) or emb is None or head.weight is not getattr(emb, "weight", None):
        return {}
    name = next(n for n, m in model.named_modules() if m is head)
    return {name: (DenseInt8.from_dense(head.weight.detach()), _as_is)}


def _warn_layers(reasons: Mapping[str, str], what: str) -> None:
    if reasons:
        named = "; ".join(f"{key}: {why}" for key, why in sorted(reasons.items()))
        warnings.warn(f"sparsify: {len(reasons)} {what}: {named}", UserWarning, stacklevel=3)


def _untied(model: nn.Module, missing: set[str], loaded: set[str]) -> set[str]:
    """Missing keys that are not tied to (the same tensor as) a loaded one; HF files omit tied copies."""
    tensors = model.state_dict(keep_vars=True)
    names_of: dict[int, set[str]] = {}
    for name, t in tensors.items():
        names_of.setdefault(id(t), set()).add(name)
    return {k for k in missing if not names_of[id(tensors[k])] & loaded}


# --- inspection ---
