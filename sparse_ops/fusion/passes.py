"""Fusions for sparse transformer inference, each proven from ``torch.fx`` graphs before a module is swapped.

``fuse(model)`` runs all of them: the activations into their layers (``fuse_activations``), then ``fuse_ffn``,
``fuse_gated_ffn`` and ``fuse_add_norm``; ``loading.sparsify(..., fuse=True)`` calls it. The modules they swap
in are in ``sparse_ops.fusion.modules``; this module holds only the passes.

**Activations into their layers** (``fuse_activations``): each ``SparseLinear`` whose only consumer is an
activation module, both children of the same parent, takes the activation into its kernel (the activation
module becomes ``nn.Identity``). The pattern is proven from the parent's fx graph, not guessed from names: a
parent whose forward fx cannot trace, or that uses the layer's output anywhere else, is left alone.

**Feed-forward blocks in one call** (``SparseFFN``, ``fuse_ffn``). A transformer's FFN is ``down(act(up(x)))``.
Run as two layers, the hidden activations (tokens x hidden, 6 MB for a batch of 8 BERT sequences) are written
out by ``up`` and packed again by ``down``. ``SparseFFN`` hands the pair to its kernel's ``ffn`` path where it
has one (ours on CPU): per tile of tokens, ``up``'s sums go through the activation straight into the packed
layout ``down`` reads, in cache (``benchmarks/ffn.py`` measures the pair against the two calls). Elsewhere (CUDA, torch's
kernels, training, few tokens) it runs the two layers. ``fuse_ffn`` finds each sparse ``up`` whose output,
through ``nn.Identity`` modules only, is the only input of a sparse ``down`` and swaps the pair for
``nn.Identity`` (in ``up``'s place) and ``SparseFFN(up, down)`` (in ``down``'s). The wiring is proven from the
graphs of the parent (children as leaves) and, where the layers are wrapped, of the wrappers, e.g.
transformers' ``BertIntermediate`` (``dense`` then the activation) and ``BertOutput`` (whose first input goes
only to ``dense``). transformers' BERT-family layers cannot be traced; for those (``feed_forward_chunk``, whose
``forward`` does not touch the two children itself) that method's graph is used. The fused pair's state dict
keys move under ``down``'s place (``...output.dense.up.*``, ``...output.dense.down.*``): save checkpoints
before fusing.

**Gated feed-forward blocks** (``SparseGatedFFN``, ``fuse_gated_ffn``): LLaMA's MLP, ``down(act(gate(x)) *
up(x))``, in the same kernel, the hidden tile being the gate's activated sums times the up layer's. The module
whose forward is exactly that (transformers' ``LlamaMLP``, its activation fused into ``gate_proj``) is swapped
for a ``SparseGatedFFN`` holding the same three layers under the same names: the state dict keys stay.

**Residual add and LayerNorm in the kernel** (``SparseAddNorm``, ``fuse_add_norm``). A post-LN sublayer ends
with ``norm(dropout(layer(x)) + residual)`` (BERT's ``BertSelfOutput`` and ``BertOutput``): two more passes
over a fresh (tokens, hidden) tensor each. ``SparseAddNorm`` has the kernel apply both to each tile of output
rows as soon as the tile is written (``sparse_ops.post.AddNorm``). ``fuse_add_norm`` swaps each module whose
forward is exactly that (a sparse layer or ``SparseFFN`` on its first input, an optional dropout, the add of
its second input, a LayerNorm) for a ``SparseAddNorm`` holding the same children under the same names: the
state dict keys do not change.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparse_ops.formats import CSR
    >>> from sparse_ops.linear import SparseLinear
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> mlp = nn.Sequential(SparseLinear(CSR.from_dense(torch.randn(16, 8))), nn.GELU(),
    ...                     SparseLinear(CSR.from_dense(torch.randn(8, 16))))
    >>> x = torch.randn(32, 8)
    >>> before = mlp(x)
    >>> fuse(mlp)
    {'activations': ['0'], 'ffn': ['2'], 'gated_ffn': [], 'add_norm': []}
    >>> [type(m).__name__ for m in mlp], torch.allclose(mlp(x), before, atol=1e-5)
    (['Identity', 'Identity', 'SparseFFN'], True)
"""
from __future__ import annotations

import inspect
import operator
from collections.abc import Callable

import torch
from torch import fx, nn

from sparse_ops.activations import activation_of
from sparse_ops.fusion.modules import SparseAddNorm, SparseFFN, SparseGatedFFN
from sparse_ops.linear import SparseLinear


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


def _trace(module: nn.Module, method: str = "forward") -> fx.Graph | None:
    """fx graph of ``module.<method>`` with its children as leaves, or None where fx cannot trace it. A method
    other than forward must take one input (its children then appear as ``m.<name>``)."""
    root = module
    if method != "forward":
        class _Method(nn.Module):  # fx traces a module's forward: wrap the method
            def __init__(self):
                super().__init__()
                self.m = module

            def forward(self, x):
                return getattr(self.m, method)(x)

        root = _Method()
    try:
        return _ChildrenAreLeaves().trace(root)
    except Exception:  # noqa: BLE001  untraceable code raises many kinds: then nothing is proven
        return None


def _calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _through_identities(node: fx.Node, lookup: Callable[[str], nn.Module]) -> fx.Node:
    """The last node of the chain node -> Identity -> ... where each link is the previous one's only user
    (``lookup``: a call_module target to its module)."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_module" or not isinstance(lookup(user.target), nn.Identity) or user.args != (node,) \
                or user.kwargs:
            break
        node = user
    return node


def _producer(child: nn.Module) -> str | None:
    """Name within ``child`` of the SparseLinear whose output (through Identities) ``child`` returns for its
    only input ("" for the child itself), or None."""
    if isinstance(child, SparseLinear):
        return ""
    graph = _trace(child)
    if graph is None:
        return None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or len(inputs[0].users) != 1:
        return None
    (layer,) = inputs[0].users
    if layer.op != "call_module" or layer.args != (inputs[0],) or layer.kwargs \
            or not isinstance(child.get_submodule(layer.target), SparseLinear):
        return None
    last = _through_identities(layer, child.get_submodule)
    (output,) = [n for n in graph.nodes if n.op == "output"]
    return layer.target if last.users.keys() == {output} and output.args == (last,) else None


def _consumer(child: nn.Module) -> str | None:
    """Name within ``child`` of the SparseLinear that is the only user of ``child``'s first input ("" for the
    child itself), or None."""
    if isinstance(child, SparseLinear):
        return ""
    graph = _trace(child)
    if graph is None:
        return None
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    if first is None or len(first.users) != 1:
        return None
    (layer,) = first.users
    if layer.op == "call_module" and layer.args == (first,) and not layer.kwargs \
            and isinstance(child.get_submodule(layer.target), SparseLinear) and len(_calls(graph)[layer.target]) == 1:
        return layer.target
    return None


def _wiring(parent: nn.Module) -> tuple[fx.Graph, str] | None:
    """The graph that wires ``parent``'s children, and the prefix of their targets in it: its forward's, or for
    a transformers layer whose forward fx cannot trace, ``feed_forward_chunk``'s where forward never names the
    children it calls (BERT-family layers: forward calls it through ``apply_chunking_to_forward``)."""
    graph = _trace(parent)
    if graph is not None:
        return graph, ""
    if not type(parent).__module__.startswith("transformers.") or not hasattr(parent, "feed_forward_chunk"):
        return None
    graph = _trace(parent, "feed_forward_chunk")
    if graph is None:
        return None
    try:
        forward = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return None
    named = {n.target.removeprefix("m.") for n in graph.nodes if n.op == "call_module"}
    return None if any(f"self.{name}" in forward for name in named) else (graph, "m.")


def _pairs(parent: nn.Module, producers: set[str], consumers: set[str]) -> list[tuple[str, str]]:
    """(producer, consumer) children where the wiring calls each once and the producer's output, through
    Identity children only, is the consumer's first argument and used nowhere else."""
    wiring = _wiring(parent)
    if wiring is None:
        return []
    graph, prefix = wiring
    calls = {k.removeprefix(prefix): v for k, v in _calls(graph).items()}
    pairs = []
    for a in producers & set(calls):
        if len(calls[a]) != 1:
            continue
        last = _through_identities(calls[a][0], lambda target: parent.get_submodule(target.removeprefix(prefix)))
        if len(last.users) != 1:
            continue
        (user,) = last.users
        b = str(user.target).removeprefix(prefix) if user.op == "call_module" else None
        if b in consumers and len(calls[b]) == 1 and user.args[:1] == (last,) and last not in user.args[1:] \
                and last not in user.kwargs.values():
            pairs.append((a, b))
    return pairs


def _replace(parent: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, name, module)


def fuse_ffn(model: nn.Module) -> list[str]:
    """Swap each proven (up, down) pair of sparse layers for ``SparseFFN`` (see the module doc); returns the
    qualified names of the new ``SparseFFN`` modules. Only pairs whose kernel has an ``ffn`` path are fused;
    layers shared by several parents are skipped. The model's outputs are unchanged (to the kernels' rounding).

    >>> fuse_ffn(nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2)))  # dense nn.Linear layers are not touched
    []
    """
    uses = _use_counts(model)
    fused = []
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, (SparseLinear, SparseFFN)):
            continue
        children = {n: c for n, c in parent.named_children() if uses.get(id(c)) == 1}  # not new ones
        if not any(isinstance(m, SparseLinear) for c in children.values() for m in c.modules()):
            continue
        producers = {n: p for n, c in children.items() if (p := _producer(c)) is not None}
        consumers = {n: p for n, c in children.items() if (p := _consumer(c)) is not None}
        if not producers or not consumers:
            continue
        for a, b in _pairs(parent, set(producers), set(consumers)):
            up_path = f"{a}.{producers[a]}".rstrip(".")
            down_path = f"{b}.{consumers[b]}".rstrip(".")
            up, down = parent.get_submodule(up_path), parent.get_submodule(down_path)
            if uses[id(up)] != 1 or uses[id(down)] != 1 or up.kernel.ffn is None or down.kernel is not up.kernel \
                    or up.out_features != down.in_features:
                continue
            _replace(parent, up_path, nn.Identity())
            _replace(parent, down_path, SparseFFN(up, down))
            fused.append(f"{parent_name}.{down_path}" if parent_name else down_path)
    return fused


def _gated_parts(module: nn.Module) -> tuple[str, str, str] | None:
    """(a, b, down) child names where ``module.forward`` is exactly ``down(a(x) * b(x))`` with three sparse
    layers, Identity modules allowed after ``a`` (an activation fused into it), else None."""
    if isinstance(module, (SparseLinear, SparseFFN, SparseGatedFFN, SparseAddNorm)) or sum(
            isinstance(c, SparseLinear) for c in module.children()) != 3:
        return None
    graph = _trace(module)
    if graph is None:
        return None
    nodes = list(graph.nodes)
    x, output, get = nodes[0], nodes[-1], module.get_submodule
    if x.op != "placeholder" or len(x.users) != 2 or any(
            n.op != "call_module" or n.args != (x,) or n.kwargs or not isinstance(get(n.target), SparseLinear)
            for n in x.users):
        return None
    for a, b in (tuple(x.users), tuple(reversed(x.users))):
        chain, end = [a], _through_identities(a, get)  # a, then the Identity modules after it
        while chain[-1] is not end:
            chain.append(next(iter(chain[-1].users)))
        if len(chain[-1].users) != 1 or len(b.users) != 1 or next(iter(b.users)) is not next(iter(chain[-1].users)):
            continue
        (mul,) = b.users
        if mul.op != "call_function" or mul.target not in (operator.mul, torch.mul) or mul.kwargs \
                or set(mul.args) != {chain[-1], b} or len(mul.args) != 2 or len(mul.users) != 1:
            return None
        (down,) = mul.users
        if down.op != "call_module" or down.args != (mul,) or down.kwargs \
                or not isinstance(get(down.target), SparseLinear) or output.args != (down,) \
                or len(nodes) != len({x, *chain, b, mul, down, output}):
            return None
        return a.target, b.target, down.target
    return None


def _swap_modules(model: nn.Module, build: Callable[[nn.Module, dict[int, int]], nn.Module | None]) -> list[str]:
    """Replace each module of ``model`` held in one place only (not the model itself) by ``build(module, use
    counts)`` where that returns one; returns the qualified names replaced."""
    uses = _use_counts(model)
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = build(child, uses) if uses.get(id(child)) == 1 else None
            if new is not None:
                setattr(parent, name, new)
                swapped.append(f"{parent_name}.{name}" if parent_name else name)
    return swapped


def fuse_gated_ffn(model: nn.Module) -> list[str]:
    """Swap each module computing exactly ``down(gate(x) * up(x))`` with three sparse layers on a kernel with
    an ``ffn`` path (LLaMA's ``LlamaMLP`` once its activation is fused into ``gate_proj``) for a
    ``SparseGatedFFN`` holding the same layers under the same names; returns the qualified names swapped.

    >>> fuse_gated_ffn(nn.Sequential(nn.Linear(2, 2)))
    []
    """
    def build(child: nn.Module, uses: dict[int, int]) -> nn.Module | None:
        parts = _gated_parts(child)
        if parts is None:
            return None
        gate, up, down = (child.get_submodule(p) for p in parts)
        if up.activation is not None and gate.activation is None:  # the product is symmetric: the gate is
            gate, up, parts = up, gate, (parts[1], parts[0], parts[2])  # the layer holding the activation
        if up.activation is not None or any(uses.get(id(m)) != 1 for m in (gate, up, down)) \
                or up.kernel.ffn is None or not (gate.kernel is up.kernel is down.kernel):
            return None
        return SparseGatedFFN(gate, up, down, parts)

    return _swap_modules(model, build)


def _add_norm_parts(module: nn.Module) -> tuple[tuple[str, str, str | None], tuple[str, str]] | None:
    """((layer, norm, dropout or None) child names, (x, residual) argument names) where ``module.forward`` is
    exactly ``norm(dropout(layer(x)) + residual)`` (the dropout optional), else None."""
    if isinstance(module, (SparseLinear, SparseFFN, SparseAddNorm)) or not any(
            isinstance(c, (SparseLinear, SparseFFN)) for c in module.children()):
        return None
    graph = _trace(module)
    if graph is None:
        return None
    nodes = list(graph.nodes)
    if len(nodes) not in (6, 7) or [n.op for n in nodes[:2]] != ["placeholder", "placeholder"]:
        return None
    x, r, layer, *middle, add, norm, output = nodes
    get = module.get_submodule
    if layer.op != "call_module" or layer.args != (x,) or layer.kwargs \
            or not isinstance(get(layer.target), (SparseLinear, SparseFFN)):
        return None
    last, dropout = layer, None
    if middle:
        (d,) = middle
        if d.op != "call_module" or d.args != (layer,) or d.kwargs or not isinstance(get(d.target), (nn.Dropout,
                                                                                                     nn.Identity)):
            return None
        last, dropout = d, d.target
    if add.op != "call_function" or add.target not in (operator.add, torch.add) or add.kwargs \
            or set(add.args) != {last, r} or len(add.args) != 2:
        return None
    out = get(layer.target)
    out = out.down.out_features if isinstance(out, SparseFFN) else out.out_features
    if norm.op != "call_module" or norm.args != (add,) or norm.kwargs \
            or not isinstance(get(norm.target), nn.LayerNorm) or tuple(get(norm.target).normalized_shape) != (out,) \
            or output.op != "output" or output.args != (norm,):
        return None
    if any(len(n.users) != 1 for n in (x, r, layer, *middle, add, norm)):
        return None
    return (layer.target, norm.target, dropout), (x.target, r.target)


def fuse_add_norm(model: nn.Module) -> list[str]:
    """Swap each module computing ``norm(dropout(layer(x)) + residual)`` with a sparse ``layer`` whose kernel
    has the post-op for a ``SparseAddNorm`` (see the module doc); returns the qualified names swapped. Modules
    shared by several parents, and the model itself, are left as they are.

    >>> fuse_add_norm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))  # nothing sparse: nothing swapped
    []
    """
    def build(child: nn.Module, _uses: dict[int, int]) -> nn.Module | None:
        parts = _add_norm_parts(child)
        if parts is None:
            return None
        (layer, norm, dropout), args = parts
        first = child.get_submodule(layer)
        if not (first.up if isinstance(first, SparseFFN) else first).kernel.fuses:
            return None
        drop = None if dropout is None else child.get_submodule(dropout)
        return SparseAddNorm(first, child.get_submodule(norm), drop, (layer, norm, dropout or "dropout"), args)

    return _swap_modules(model, build)


def fuse(model: nn.Module) -> dict[str, list[str]]:
    """Every fusion of this module, in order: activations into their layers, FFN pairs, gated FFNs, residual +
    LayerNorm; returns the qualified names each one changed.

    >>> fuse(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    {'activations': [], 'ffn': [], 'gated_ffn': [], 'add_norm': []}
    """
    return {"activations": fuse_activations(model), "ffn": fuse_ffn(model), "gated_ffn": fuse_gated_ffn(model),
            "add_norm": fuse_add_norm(model)}
