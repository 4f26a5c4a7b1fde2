"""Activations fused into ``SparseLinear``: ``y = act(x W^T + b)`` in one pass; the codes the C++ kernels use.

Our CPU kernels apply the activation while each output tile is still in cache, instead of a separate
elementwise pass over a fresh (tokens, out) tensor; other kernels apply it after the product with torch.
In a BERT-style encoder the FFN's GELU is then nearly free: on the 2-core test VM it was ~10% of a 90%-sparse
model's forward time as a separate op (``benchmarks/bert_e2e.py``). ``activation_of`` recognises an activation
module from its fx graph; the pass that moves one into its layer is ``sparse_ops.fusion.fuse_activations``.

Example:
    >>> import torch
    >>> apply(torch.tensor([-1.0, 2.0]), "relu").tolist(), CODES["gelu"] > 0
    ([0.0, 2.0], True)
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from sparse_ops.errors import UserValueError

# name -> torch function; CODES: the C++ kernels' Act codes (sparse_cpu.cpp), 0 = none
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}
CODES: dict[str | None, int] = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


def check(name: str | None) -> str | None:
    """``name`` if it is None or in ``ACTIVATIONS``; ValueError naming the allowed ones otherwise.

    >>> check("gelu"), check(None)
    ('gelu', None)
    """
    if name is not None and name not in ACTIVATIONS:
        raise UserValueError(f"unknown activation {name!r}; allowed: None, {', '.join(ACTIVATIONS)}")
    return name


def apply(y: torch.Tensor, name: str | None) -> torch.Tensor:
    """``ACTIVATIONS[name](y)``, or ``y`` when ``name`` is None.

    >>> apply(torch.tensor([-1.0, 2.0]), "relu").tolist()
    [0.0, 2.0]
    """
    return y if name is None else ACTIVATIONS[name](y)


def _function_kind(node: fx.Node, arg: fx.Node) -> str | None:
    """The activation a call_function node computes of ``arg`` (its only tensor input), or None."""
    if node.op != "call_function" or node.args != (arg,):
        return None
    kwargs = dict(node.kwargs)
    kwargs.pop("inplace", None)  # in place or not, the value is the same and the kernel's output is private
    if node.target in (F.relu, torch.relu) and not kwargs:
        return "relu"
    if node.target is F.silu and not kwargs:
        return "silu"
    if node.target is F.gelu and set(kwargs) <= {"approximate"}:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(kwargs.get("approximate", "none"))
    return None


def activation_of(module: nn.Module) -> str | None:
    """The name in ``ACTIVATIONS`` of the function a stateless module's forward computes, or None: its fx graph
    must be one call of relu, gelu (exact or tanh) or silu on its only input (``nn.GELU``, transformers'
    ``GELUActivation``, ...).

    >>> activation_of(nn.GELU(approximate="tanh")), activation_of(nn.ReLU()), activation_of(nn.Tanh())
    ('gelu_tanh', 'relu', None)
    """
    if next(module.children(), None) is not None or next(module.parameters(), None) is not None \
            or next(module.buffers(), None) is not None:
        return None
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001  fx raises many kinds on untraceable code: then it is not an activation
        return None
    nodes = list(graph.nodes)
    if [n.op for n in nodes] != ["placeholder", "call_function", "output"] or nodes[2].args[0] is not nodes[1]:
        return None
    return _function_kind(nodes[1], nodes[0])
