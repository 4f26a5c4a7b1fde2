"""The fused sparse modules the passes (``sparse_ops.fusion.passes``) swap in: ``SparseFFN`` (a feed-forward
pair in one kernel call), ``SparseGatedFFN`` (LLaMA's gated MLP) and ``SparseAddNorm`` (the residual add and
LayerNorm in the kernel). They decide nothing about kernels: each asks its layers' routers how a call of n tokens
runs (``SparseLinear.route``) and takes the one-call path where the routes' kernel has it
(``dispatch.Kernel.ffn``), else the layers in turn; the post-op goes to whichever kernel runs (``Route``
applies it inside the kernel or after it).
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_ops.errors import UserTypeError, UserValueError
from sparse_ops.kernels import needs_grad
from sparse_ops.linear import SparseLinear, flatten, unflatten
from sparse_ops.post import AddNorm


class SparseFFN(nn.Module):
    """``down(up(x))`` for two ``SparseLinear`` layers, ``up``'s activation in between, in one kernel call where
    both run on a kernel with an ``ffn`` path (``dispatch.Kernel.ffn``), else the two layers in turn.

    >>> from sparse_ops.formats import CSR
    >>> up = SparseLinear(CSR.from_dense(torch.tensor([[1.0, 0.0], [0.0, -1.0]])), activation="relu")
    >>> down = SparseLinear(CSR.from_dense(torch.tensor([[1.0, 1.0]])))
    >>> SparseFFN(up, down)(torch.tensor([[2.0, 3.0], [-2.0, -3.0]])).tolist()
    [[2.0], [3.0]]
    """

    def __init__(self, up: SparseLinear, down: SparseLinear):
        super().__init__()
        if not isinstance(up, SparseLinear) or not isinstance(down, SparseLinear):
            raise UserTypeError(f"SparseFFN takes two SparseLinear layers, got {type(up).__name__} and "
                            f"{type(down).__name__}")
        if up.out_features != down.in_features:
            raise UserValueError(f"up gives {up.out_features} features, down takes {down.in_features}")
        self.up, self.down = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., up.in_features) -> (..., down.out_features)."""
        up, down = self._modules["up"], self._modules["down"]  # direct lookups: this runs per forward
        if torch.compiler.is_compiling():  # each layer a custom operator (sparse_ops::linear), no fused call
            return down(up(x))
        up.check_input(x)
        y = _ffn(up, down, flatten(x), up.activation)
        if y is not None:
            return unflatten(y, x)
        return down(up(x))


class SparseGatedFFN(nn.Module):
    """``down(gate(x) * up(x))`` for three ``SparseLinear`` layers, the activation in ``gate``: LLaMA's MLP,
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. One kernel call where the three run on a kernel with an
    ``ffn`` path (per token tile, the gate's activated sums times the up layer's go straight into the packed
    tile the down layer reads), else the layers in turn. Its children keep the names given (those of the
    module it replaces, so the state dict keys stay).

    >>> from sparse_ops.formats import CSR
    >>> gate = SparseLinear(CSR.from_dense(torch.tensor([[1.0, 0.0]])), activation="relu")
    >>> up, down = (SparseLinear(CSR.from_dense(torch.tensor(w))) for w in ([[0.0, 2.0]], [[3.0]]))
    >>> SparseGatedFFN(gate, up, down)(torch.tensor([[1.0, 5.0], [-1.0, 5.0]])).tolist()  # 3 * relu(a) * 2b
    [[30.0], [0.0]]
    """

    def __init__(self, gate: SparseLinear, up: SparseLinear, down: SparseLinear,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        if not all(isinstance(m, SparseLinear) for m in (gate, up, down)):
            raise UserTypeError("SparseGatedFFN takes three SparseLinear layers, got "
                            + ", ".join(type(m).__name__ for m in (gate, up, down)))
        if (gate.in_features, gate.out_features) != (up.in_features, up.out_features) \
                or up.out_features != down.in_features:
            raise UserValueError(f"gate ({gate.out_features}x{gate.in_features}) and up ({up.out_features}x"
                             f"{up.in_features}) must have one shape, whose outputs down takes ({down.in_features})")
        if up.activation is not None:
            raise UserValueError(f"the up layer must have no activation (the gate's is applied), got {up.activation!r}")
        self._names = names
        for name, layer in zip(names, (gate, up, down)):
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., down.out_features)."""
        gate, up, down = (self._modules[n] for n in self._names)
        if torch.compiler.is_compiling():  # each layer a custom operator (sparse_ops::linear), no fused call
            return down(gate(x) * up(x))
        up.check_input(x)
        y = _ffn(up, down, flatten(x), gate.activation, gate=gate)
        if y is not None:
            return unflatten(y, x)
        return down(gate(x) * up(x))


class SparseAddNorm(nn.Module):
    """``norm(dropout(layer(x)) + residual)`` for a ``SparseLinear`` or ``SparseFFN`` layer and an
    ``nn.LayerNorm`` over its output features: the residual add and the LayerNorm run in the kernel, on each tile
    of output rows while it is in cache, where the route's kernel has that post-op (``Kernel.fuses``: ours on
    CPU; other kernels apply it after the product), the dropout is inactive (eval mode or p = 0) and no gradient
    is needed; else the ops in turn. Its children
    keep the names given (those of the module it replaces, so the state dict keys stay); it is called as that
    module was, ``(x, residual)`` by position or by ``arg_names``.

    >>> from sparse_ops.formats import CSR
    >>> block = SparseAddNorm(SparseLinear(CSR.from_dense(torch.eye(2))), nn.LayerNorm(2))
    >>> block(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])).tolist()  # layer_norm([2, 2]): zeros
    [[0.0, 0.0]]
    """

    def __init__(self, layer: nn.Module, norm: nn.LayerNorm, dropout: nn.Module | None = None,
                 names: tuple[str, str, str] = ("dense", "LayerNorm", "dropout"),
                 arg_names: tuple[str, str] = ("hidden_states", "input_tensor")):
        super().__init__()
        if not isinstance(layer, (SparseLinear, SparseFFN)):
            raise UserTypeError(f"SparseAddNorm takes a SparseLinear or SparseFFN layer, got {type(layer).__name__}")
        out = layer.down.out_features if isinstance(layer, SparseFFN) else layer.out_features
        if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (out,):
            raise UserValueError(f"norm must be an nn.LayerNorm over the layer's {out} output features, got {norm}")
        self._names, self._arg_names = names, arg_names
        self.add_module(names[0], layer)
        self.add_module(names[1], norm)
        if dropout is not None:
            self.add_module(names[2], dropout)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """(x (..., in), residual (..., out)) -> (..., out)."""
        if len(args) == 2 and not kwargs:  # the usual call, checked first: this runs per sublayer and forward
            x, residual = args
        elif len(args) + len(kwargs) == 2 and set(kwargs) <= set(self._arg_names[len(args):]):
            x, residual = (*args, *(kwargs[k] for k in self._arg_names[len(args):]))
        else:
            raise UserTypeError(f"SparseAddNorm takes ({', '.join(self._arg_names)}), got {len(args)} positional "
                            f"and {sorted(kwargs)} keyword arguments")
        modules = self._modules
        layer, norm, dropout = modules[self._names[0]], modules[self._names[1]], modules.get(self._names[2])
        live = dropout is not None and dropout.training and getattr(dropout, "p", 0.0) > 0.0
        grads = torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad
                                             or any(p.requires_grad for p in norm.parameters()))
        if not live and not grads and not torch.compiler.is_compiling() and residual.shape[:-1] == x.shape[:-1] \
                and residual.shape[-1] == norm.normalized_shape[0] \
                and residual.dtype == x.dtype:  # else torch broadcasts, promotes, or raises
            y = _with_post(layer, x, AddNorm(flatten(residual), norm.weight, norm.bias, norm.eps))
            return y if y.shape == residual.shape else y.reshape(residual.shape)
        h = layer(x)
        return norm((h if dropout is None else dropout(h)) + residual)


def _ffn(up: SparseLinear, down: SparseLinear, x2: torch.Tensor, activation: str | None, *,
         gate: SparseLinear | None = None, post: AddNorm | None = None) -> torch.Tensor | None:
    """The block's output for x2 (N, in) in one kernel call, (N, out): where every layer's route for these N
    tokens runs one kernel that has an ``ffn`` path and that path applies (it returns None where it does not:
    few tokens, mixed value types); else None."""
    layers = (up, down) if gate is None else (gate, up, down)
    grad = needs_grad(x2, *(m.bias for m in layers))
    routes = [m.route(x2.shape[0], grad) for m in layers]
    kernel = routes[0].kernel
    if kernel.ffn is None or any(r.kernel is not kernel for r in routes):
        return None
    ru, rd = routes[-2], routes[-1]
    return kernel.ffn(ru.state, rd.state, x2, up.bias, down.bias, activation, post=post,
                      **({} if gate is None else {"gate": routes[0].state, "gate_bias": gate.bias}))


def _with_post(layer: SparseLinear | SparseFFN, x: torch.Tensor, post: AddNorm) -> torch.Tensor:
    """The layer's output for x (..., in) with the post-op applied, (N, out): inside the kernel where the route's
    kernel fuses it, else after it (``Route``); no gradient is needed here (the caller checks)."""
    first = layer.up if isinstance(layer, SparseFFN) else layer
    first.check_input(x)
    x2 = flatten(x)
    if isinstance(layer, SparseFFN):
        y = _ffn(layer.up, layer.down, x2, layer.up.activation, post=post)
        if y is not None:
            return y
        up, layer = layer.up, layer.down
        x2 = up.route(x2.shape[0])(x2, up.bias, up.activation)
    return layer.route(x2.shape[0])(x2, layer.bias, layer.activation, post)
