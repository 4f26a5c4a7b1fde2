"""Activations fused into ``SparseLinear``: ``y = act(x W^T + b)`` in one pass, and ``fuse_activations``.

Our CPU kernels apply the activation while each output tile is still in cache, instead of a separate
elementwise pass over a fresh (tokens, out) tensor; other kernels apply it after the product with torch.
In a BERT-style encoder the FFN's GELU is then nearly free: on the 2-core test VM it was ~10% of a 90%-sparse
model's forward time as a separate op (``benchmarks/bert_e2e.py``).

``fuse_activations(model)`` finds each ``SparseLinear`` whose only consumer is an activation module, both
children of the same parent, and moves the activation into the layer (the module becomes ``nn.Identity``).
The pattern is proven from the parent's ``torch.fx`` graph, not guessed from names: a parent whose forward fx
cannot trace, or that uses the layer's output anywhere else, is left alone.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparse_ops.formats import CSR
    >>> from sparse_ops.linear import SparseLinear
    >>> ffn = nn.Sequential(SparseLinear(CSR.from_dense(torch.eye(4))), nn.GELU(), nn.Linear(4, 2))
    >>> x = torch.randn(3, 4)
    >>> before = ffn(x)
    >>> fuse_activations(ffn)
    ['0']
    >>> ffn[0].activation, type(ffn[1]).__name__, torch.allclose(ffn(x), before, atol=1e-6)
    ('gelu', 'Identity', True)
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

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
        raise ValueError(f"unknown activation {name!r}; allowed: None, {', '.join(ACTIVATIONS)}")
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


def _use_counts(model: nn.Module) -> dict[int, int]:
    """id(module) -> how many places of ``model`` hold it (a module held twice is shared: never fused)."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return uses


class _ChildrenAreLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _consumed_by(parent: nn.Module, layers: set[str], acts: set[str]) -> list[tuple[str, str]]:
    """(layer, activation) children where the parent's forward calls each once and feeds the layer's output
    only to that activation, as its only argument."""
    try:
        graph = _ChildrenAreLeaves().trace(parent)
    except Exception:  # noqa: BLE001  untraceable forward (data-dependent control flow, ...): nothing fused
        return []
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs = []
    for name in layers & set(calls):
        if len(calls[name]) != 1 or len(calls[name][0].users) != 1:
            continue
        (user,) = calls[name][0].users
        if user.op == "call_module" and user.target in acts and len(calls[user.target]) == 1 \
                and user.args == (calls[name][0],) and not user.kwargs:
            pairs.append((name, user.target))
    return pairs


def fuse_activations(model: nn.Module) -> list[str]:
    """Fuse each activation module that is the only consumer of a ``SparseLinear`` into that layer (see the
    module doc); returns the qualified names of the layers that took one. Layers already fused, or shared by
    several parents, are skipped. Only parents holding both a candidate layer and an activation child are
    traced. The model's outputs are unchanged (to the kernels' rounding), and so are its state dict keys.

    >>> fuse_activations(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))  # a dense nn.Linear is not touched
    []
    """
    from sparse_ops.linear import SparseLinear

    uses = _use_counts(model)
    fused = []
    for parent_name, parent in list(model.named_modules()):
        children = dict(parent.named_children())
        layers = {n for n, c in children.items()
                  if isinstance(c, SparseLinear) and c.activation is None and uses[id(c)] == 1}
        kinds = {n: k for n, c in children.items() if layers and (k := activation_of(c))}
        if not kinds:
            continue
        for layer_name, act_name in _consumed_by(parent, layers, set(kinds)):
            children[layer_name].activation = kinds[act_name]
            setattr(parent, act_name, nn.Identity())
            fused.append(f"{parent_name}.{layer_name}" if parent_name else layer_name)
    return fused
