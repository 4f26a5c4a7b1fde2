"""``SparseLinear``: an ``nn.Linear`` whose weight is stored in a sparse format and multiplied by a fast kernel.

Example:
    >>> import torch
    >>> dense = torch.nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     dense.weight[:, 2:] = 0.0
    >>> layer = SparseLinear.from_dense(dense, format="csr")
    >>> x = torch.randn(2, 3, 8)
    >>> torch.allclose(layer(x), dense(x), atol=1e-6)
    True
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from sparse_ops import activations
from sparse_ops.dispatch import OURS, Kernel, candidates, torch_path_kernel
from sparse_ops.errors import UnsupportedError, UserTypeError, UserValueError
from sparse_ops.formats import SparseFormat
from sparse_ops.kernels import cpp, needs_grad, ours_cpu
from sparse_ops.kernels.ours_cpu import NativeWeight
from sparse_ops.plan import DENSE, TORCH_SUFFIX, Path, Planner, Route, Router, torch_path_formats
from sparse_ops.quantized import INPUT_BITS, DenseInt8
from sparse_ops.registry import AUTO, FORMATS, LOSSLESS, QUANTIZED, format_class

LAYER_FORMATS = (*FORMATS, *torch_path_formats())


class SparseLinear(nn.Module):
    """``y = act(x @ W^T + b)`` with W in one sparse format (parts kept as buffers ``weight_<part>``).

    Which kernel runs a call is its ``router``'s decision (``sparse_ops.plan.Router``): the layer's kernel from
    ``sparse_ops.dispatch`` for the weight's device, prepared once; moving the module (``.to``, ``.cuda``,
    ``.half``) or loading a state dict builds the router again. ``torch_kernel=True`` runs torch's own kernel
    where ours is the default (``dispatch.torch_path_kernel``); it is a runtime choice, not saved in the state
    dict. ``activation`` (None or a name in ``sparse_ops.activations.ACTIVATIONS``) is applied to the output,
    fused into the kernel where it supports that (ours on CPU); ``fusion.fuse_activations`` sets it from the
    model's own activation modules. It is not saved in the state dict either.

    ``input_bits`` (int8 weights: None or 8, ``sparse_ops.quantized.quantize_input``; from the weight, or set
    later) quantizes the layer's input per block of 32 columns on every path, so that one token multiplies int8
    by int8; not saved in the state dict either.

    ``planner`` (``sparse_ops.plan.Planner``; ``sparsify``'s default) makes the router choose the path per
    batch bucket, measured at the first call in each: dense, each of our kernel's variants, or torch's kernel,
    the fastest (``plan.choose``). Without one the layer always runs its kernel. ``name`` labels the layer in
    ``plan.plan_report`` and verbose messages.
    """

    def __init__(self, weight: SparseFormat, bias: torch.Tensor | None = None, *, torch_kernel: bool = False,
                 activation: str | None = None, planner: Planner | None = None, name: str = ""):
        super().__init__()
        weight.validate()
        out, inp = weight.shape
        if bias is not None and tuple(bias.shape) != (out,):
            raise UserValueError(f"bias must have shape ({out},), got {tuple(bias.shape)}")
        self.format, self.out_features, self.in_features = weight.format, out, inp
        self.torch_kernel = torch_kernel  # torch's kernel instead of ours where the registry lists one
        self.activation = activation
        self._part_names = tuple(weight.parts())
        for part, t in weight.parts().items():
            self.register_buffer(f"weight_{part}", t)
        self.register_buffer("bias", None if bias is None else bias.to(weight.dtype))
        self._planner, self._name = planner, name
        self.sparsity = 1.0 - int((weight.values != 0).sum()) / max(1, out * inp)  # fraction of zero weights
        self._input_bits = getattr(weight, "input_bits", None)
        self._prepare()

    @property
    def planner(self) -> Planner | None:
        """How the router plans this layer's paths (None: always the layer's kernel)."""
        return self._planner

    @planner.setter
    def planner(self, planner: Planner | None) -> None:
        self._planner = planner
        self.router.set_planner(planner)

    @property
    def name(self) -> str:
        """The layer's label in ``plan.plan_report`` and verbose messages ("": its place in the model)."""
        return self._name

    @name.setter
    def name(self, name: str) -> None:
        self._name = self.router.name = name

    @property
    def kernel(self) -> Kernel:
        """The layer's kernel (``dispatch.kernel_for``): what runs its calls unless its plan chose another path."""
        return self.router.kernel

    @property
    def choice(self) -> str:
        """The layer's own path as a string: the format, with ``":torch"`` where torch's kernel runs it."""
        return str(self.router.own)

    @property
    def activation(self) -> str | None:
        """The activation applied to the output (None: the plain product)."""
        return self._activation

    @activation.setter
    def activation(self, name: str | None) -> None:
        self._activation = activations.check(name)

    @property
    def input_bits(self) -> int | None:
        """How an int8 weight takes its input: None (as it comes) or 8 (``quantize_input``)."""
        return self._input_bits

    @input_bits.setter
    def input_bits(self, bits: int | None) -> None:
        if bits is not None and not format_class(self.format).QUANTIZED:
            raise UserValueError(f"input_bits={bits!r} needs an int8 weight ({', '.join(QUANTIZED)}); this layer's is "
                             f"{self.format}")
        if bits not in INPUT_BITS:
            raise UserValueError(f"unknown input_bits {bits!r}; allowed: {', '.join(map(str, INPUT_BITS))}")
        if bits != self._input_bits:
            self._input_bits = bits
            self._prepare()

    @property
    def weight(self) -> SparseFormat:
        """The stored format object (validated), with ``input_bits`` for an int8 weight."""
        parts = {k: getattr(self, f"weight_{k}") for k in self._part_names}
        w = format_class(self.format).from_parts(parts, (self.out_features, self.in_features))
        return w.with_input_bits(self._input_bits) if self._input_bits else w

    def _prepare(self) -> None:
        w = self.weight
        self.router = Router(w, self._buffers["bias"], torch_kernel=self.torch_kernel, planner=self._planner,
                             name=self._name, sparsity=self.sparsity)
        self._dtype = w.dtype
        _register(self, self.weight_buffer())

    def _apply(self, fn, recurse=True):  # .to / .cuda / .half move the buffers; the router follows
        super()._apply(fn, recurse)
        self._prepare()
        return self

    def __getstate__(self) -> dict:  # copy.deepcopy, pickle: the router (kernel state: pointers) is rebuilt
        return {k: v for k, v in self.__dict__.items() if k != "router"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._prepare()

    def _load_from_state_dict(self, *args, **kwargs):  # buffers are copied in place: the router follows
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()

    def weight_buffer(self) -> torch.Tensor:
        """The first stored part of the weight (the buffer the custom operator finds this layer by)."""
        return self._buffers[f"weight_{self._part_names[0]}"]

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError or TypeError unless x is (..., in_features) in the weight's dtype."""
        if x.shape[-1] != self.in_features:
            raise UserValueError(f"input's last dimension must be in_features={self.in_features}, got {tuple(x.shape)}")
        if x.dtype != self._dtype:
            raise UserTypeError(f"input dtype {x.dtype} does not match the weight's {self._dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out). Under ``torch.compile`` and ``torch.export``, the custom operator
        ``sparse_ops::linear`` (the end of this module), which runs this same path."""
        if torch.compiler.is_compiling():
            return _linear_op(x, [self._buffers[f"weight_{k}"] for k in self._part_names], ",".join(self._part_names),
                              self.format, self.out_features, self.in_features, self._buffers["bias"],
                              self._activation or "", self._input_bits or 0)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features or x.dtype != self._dtype:  # inline: this runs per layer and call
            self.check_input(x)
        bias = self._buffers["bias"]
        x2 = flatten(x)
        y = self.router.route(x2.shape[0], needs_grad(x, bias))(x2, bias, self._activation)
        return unflatten(y, x)

    def route(self, n: int, grad: bool = False) -> Route:
        """How a call of n tokens runs (``plan.Router.route``)."""
        return self.router.route(n, grad)

    def dense_weight(self) -> torch.Tensor:
        """The weight decompressed (an int8 weight dequantized): the dense path's, built once and kept while a
        bucket runs dense."""
        return self.router.kernel_state(Path(DENSE))[1][0]

    def native_weight(self, n: int = 1) -> NativeWeight:
        """The weight as our CPU kernels run it on the path planned for n tokens: this layer's kernel state, an
        int8 twin's, or a dense copy for our dense kernel where the plan chose dense. Where the plan chose torch's
        kernel (or the layer runs on it), our kernel of the same format: native code (the decoder step,
        ``sparse_ops.decode``) cannot call torch's. ValueError off the CPU or without native kernels."""
        if self.router.device.type != "cpu" or not cpp.available():
            raise UserValueError(f"native kernels run CPU weights in a process that built them; this layer is on "
                             f"{self.router.device} (native kernels available: {cpp.available()})")
        route = self.router.route(n)
        path = route.path
        if path.kind == DENSE and self._input_bits:  # int8 inputs: the dense int8 kernel gives the same numbers
            path = Path(OURS, DenseInt8.format)
        if path.kind == DENSE:
            return ours_cpu.prepare_dense(self.dense_weight())
        state = self.router.kernel_state(Path(OURS, path.format))[1]
        return ours_cpu.masked(state) if route.variant == "mask" else state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format!r}, " \
               f"kernel={self.kernel.name!r}" + (f", activation={self._activation!r}" if self._activation else "") \
               + (f", input_bits={self._input_bits}" if self._input_bits else "") \
               + (", planned" if self._planner is not None else "")

    @classmethod
    def from_dense(cls, linear: nn.Linear, format: str = "csr") -> SparseLinear:
        """A SparseLinear holding ``linear``'s weight in ``format`` ("csr", "2:4", an int8 format, "csr:torch":
        CSR on torch's kernel, or "auto": the smallest lossless format the weight fits, as ``prune convert
        --format auto`` stores it). Which path runs per batch is ``sparsify``'s plan (``planner``); this builds
        the layer alone.

        >>> layer = nn.Linear(8, 4)
        >>> with torch.no_grad():
        ...     _ = layer.weight.view(-1, 4)[:, :2].zero_()  # two zeros in every four inputs: 2:4
        >>> SparseLinear.from_dense(layer, format="auto").format
        '2:4'
        """
        if format == AUTO:
            format = smallest_lossless(linear.weight.detach())
        if format not in LAYER_FORMATS:
            raise UserValueError(f"unknown format {format!r}; allowed: {', '.join((*LAYER_FORMATS, AUTO))}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        fmt = format.removesuffix(TORCH_SUFFIX)
        return cls(format_class(fmt).from_dense(linear.weight.detach()), bias, torch_kernel=format != fmt)


def smallest_lossless(w: torch.Tensor) -> str:
    """The lossless sparse format (``registry.LOSSLESS``) that stores ``w`` in the fewest bytes among those whose
    pattern it fits."""
    nnz = int(torch.count_nonzero(w))
    fits = [name for name in LOSSLESS if FORMATS[name].eligible(w)]
    return min(fits, key=lambda name: FORMATS[name].estimate_nbytes(tuple(w.shape), nnz, w.dtype))


def flatten(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) as the (N, in) matrix the kernels take (a view where x is contiguous)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def unflatten(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y (N, out) as (..., out) for the input x (..., in) it came from."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def candidate_formats(w: torch.Tensor) -> list[str]:
    """Sparse layers worth timing for a weight on its device: lossless formats with a native kernel whose pattern
    fits, then torch's kernel for the formats where ours is the default ("csr:torch" on CPU)."""
    names, torch_names = [], []
    for name in LOSSLESS:  # int8 formats change the numbers: chosen by the user (prune convert --quantize)
        fmt = FORMATS[name]
        try:
            kernel = candidates(name, w.device)[0]
        except UnsupportedError:
            continue
        if kernel.native and fmt.eligible(w):
            names.append(name)
        if torch_path_kernel(name, w.device, w) is not None:
            torch_names.append(name + TORCH_SUFFIX)
    return names + torch_names


# -- the custom operator ``sparse_ops::linear`` ---------------------------------------------------------------
# Our sparse layers as a PyTorch custom operator, so ``torch.compile`` and ``torch.export`` see them.
#
# Our kernels are ctypes calls that ``torch.compile`` cannot trace (each one would break the graph) and
# ``torch.export`` cannot capture. Under either, ``SparseLinear.forward`` calls ``torch.ops.sparse_ops.linear``
# instead: an operator whose inputs are the layer's input, its stored weight parts (buffers: captured by export as
# the layer's state), its format and sizes; its fake implementation gives the output's shape, so the compiler never
# runs our code while tracing. When the operator runs, it finds the live ``SparseLinear`` that owns those parts and
# calls its eager forward: the same planned path per layer as without compilation. An exported program run where no
# such layer lives (loaded in another process) gets a layer built from the parts, once per weight.
#
# Inference only: the operator has no backward (a compiled training step raises; train uncompiled, as the Pruner
# does, then convert).

_LIVE: weakref.WeakValueDictionary[int, SparseLinear] = weakref.WeakValueDictionary()  # parts[0] pointer -> layer
# layers made from an exported program's parts (no live owner), with the parts (kept: their addresses stay theirs)
_BUILT: dict[tuple, tuple[SparseLinear, list[torch.Tensor]]] = {}
_LOCK = threading.Lock()


def _register(layer: SparseLinear, first_part: torch.Tensor) -> None:
    """Record ``layer`` as the owner of its weight parts (called whenever its buffers are (re)bound)."""
    _LIVE[first_part.data_ptr()] = layer


@torch.library.custom_op("sparse_ops::linear", mutates_args=())
def _linear_op(x: torch.Tensor, parts: list[torch.Tensor], names: str, format: str, out_features: int,
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


@_linear_op.register_fake
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
            from sparse_ops.registry import format_class

            weight = format_class(format).from_parts(dict(zip(names.split(","), parts)), (out_features, in_features))
            layer = SparseLinear(weight, bias, activation=activation or None)
            layer.input_bits = input_bits or None
            held = _BUILT[key] = (layer, list(parts))
        return held[0]
