"""Our sparse layers as a PyTorch custom operator, so ``torch.compile`` and ``torch.export`` see them.

Our kernels are ctypes calls that ``torch.compile`` cannot trace (each one would break the graph) and
``torch.export`` cannot capture. Under either, ``SparseLinear.forward`` calls ``torch.ops.sparse_ops.linear``
instead: an operator whose inputs are the layer's input, its stored weight parts (buffers: captured by export as
the layer's state), its format and sizes; its fake implementation gives the output's shape, so the compiler never
runs our code while tracing. When the operator runs, it finds the live ``SparseLinear`` that owns those parts and
calls its eager forward: the same planned path per layer as without compilation. An exported program run where no
such layer lives (loaded in another process) gets a layer built from the parts, once per weight.

Inference only: the operator has no backward (a compiled training step raises; train uncompiled, as the Pruner
does, then convert).

Example:
    >>> import torch
    >>> from sparse_ops.formats import CSR
    >>> from sparse_ops.linear import SparseLinear
    >>> layer = SparseLinear(CSR.from_dense(torch.tensor([[1.0, 0.0], [0.0, 2.0]])))
    >>> compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    >>> compiled(torch.tensor([[3.0, 4.0]])).tolist()
    [[3.0, 8.0]]
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sparse_ops.linear import SparseLinear

_LIVE: weakref.WeakValueDictionary[int, SparseLinear] = weakref.WeakValueDictionary()  # parts[0] pointer -> layer
# layers made from an exported program's parts (no live owner), with the parts (kept: their addresses stay theirs)
_BUILT: dict[tuple, tuple[SparseLinear, list[torch.Tensor]]] = {}
_LOCK = threading.Lock()


def register(layer: SparseLinear, first_part: torch.Tensor) -> None:
    """Record ``layer`` as the owner of its weight parts (called whenever its buffers are (re)bound)."""
    _LIVE[first_part.data_ptr()] = layer


@torch.library.custom_op("sparse_ops::linear", mutates_args=())
def linear(x: torch.Tensor, parts: list[torch.Tensor], names: str, format: str, out_features: int,
           in_features: int, bias: torch.Tensor | None, activation: str, input_bits: int) -> torch.Tensor:
    """activation(x W^T + bias) (..., out_features) for W stored as ``format`` in ``parts`` (named by the
    comma-separated ``names``), by the layer that owns them (its planned path). ``activation``: "" for none;
    ``input_bits``: the layer's (0 for None)."""
    layer = _LIVE.get(parts[0].data_ptr())
    if layer is None or layer.format != format or layer.out_features != out_features \
            or (layer.input_bits or 0) != input_bits \
            or layer.weight_buffer().data_ptr() != parts[0].data_ptr():  # the layer has rebound its buffers since
        layer = _built(parts, names, format, out_features, in_features, bias, activation, input_bits)
    y = layer._forward(x)
    return y.clone() if y.data_ptr() == x.data_ptr() else y  # a custom op's output must not alias its input


@linear.register_fake
def _(x: torch.Tensor, parts: list[torch.Tensor], names: str, format: str, out_features: int,
      in_features: int, bias: torch.Tensor | None, activation: str, input_bits: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _built(parts: list[torch.Tensor], names: str, format: str, out_features: int, in_features: int,
           bias: torch.Tensor | None, activation: str, input_bits: int) -> SparseLinear:
    """A layer made from an exported program's parts (no live layer owns them), once per weight."""
    key = (format, out_features, in_features, activation, input_bits, *(p.data_ptr() for p in parts),
           None if bias is None else bias.data_ptr())
    with _LOCK:
        held = _BUILT.get(key)
        if held is None or any(a is not b for a, b in zip(held[1], parts)):  # the same tensors, not a reused address
            from sparse_ops.linear import SparseLinear
            from sparse_ops.registry import format_class

            weight = format_class(format).from_parts(dict(zip(names.split(","), parts)), (out_features, in_features))
            layer = SparseLinear(weight, bias, activation=activation or None)
            layer.input_bits = input_bits or None
            held = _BUILT[key] = (layer, list(parts))
        return held[0]
