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

import functools
import sys
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sparse_ops import activations, busy, plan
from sparse_ops.dispatch import OURS, candidates, kernel_for, torch_path_formats, torch_path_kernel
from sparse_ops.errors import UserTypeError, UserValueError
from sparse_ops.formats import SparseFormat
from sparse_ops.kernels import cpp, ours_cpu
from sparse_ops.kernels.ours_cpu import NativeWeight
from sparse_ops.plan import DENSE, TORCH_SUFFIX, Planner
from sparse_ops.quantized import INPUT_BITS, DenseInt8, quantize_input
from sparse_ops.registry import AUTO, FORMATS, LOSSLESS, QUANTIZED, format_class
from sparse_ops.timing import Timer, Timing, time_candidates

LAYER_FORMATS = (*FORMATS, *torch_path_formats())
_PLAN_LOCK = threading.Lock()  # one measurement at a time in the process: concurrent timings would be wrong


class SparseLinear(nn.Module):
    """``y = act(x @ W^T + b)`` with W in one sparse format (parts kept as buffers ``weight_<part>``).

    The kernel is taken from ``sparse_ops.dispatch`` for the weight's device and prepared once; moving the
    module (``.to``, ``.cuda``, ``.half``) or loading a state dict prepares it again. ``torch_kernel=True``
    runs torch's own kernel where ours is the default (``dispatch.torch_path_kernel``); it is a runtime choice,
    not saved in the state dict. ``activation`` (None or a
    name in ``sparse_ops.activations.ACTIVATIONS``) is applied to the output, fused into the kernel where it
    supports that (ours on CPU); ``fusion.fuse_activations`` sets it from the model's own activation
    modules. It is not saved in the state dict either.

    ``input_bits`` (int8 weights: None or 8, ``sparse_ops.quantized.quantize_input``; from the weight, or set
    later) quantizes the layer's input per block of 32 columns on every path, so that one token multiplies int8
    by int8; not saved in the state dict either.

    ``planner`` (``sparse_ops.plan.Planner``; ``sparsify``'s default) makes the layer choose its path per batch
    bucket, measured at the first call in each: dense, each of our kernel's variants, or torch's kernel, the
    fastest (``plan.choose``, ``route``). Without one the layer always runs its kernel. ``name`` labels the
    layer in ``plan.plan_report`` and verbose messages.
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
        self.planner, self.name = planner, name
        self.sparsity = 1.0 - int((weight.values != 0).sum()) / max(1, out * inp)  # fraction of zero weights
        self._input_bits = getattr(weight, "input_bits", None)
        self._prepare()

    @property
    def choice(self) -> str:
        """The format, with ``TORCH_SUFFIX`` when torch's kernel runs it ("csr", "2:4", "csr:torch")."""
        on_torch_path = self.torch_kernel and torch_path_kernel(self.format, self.kernel_device,
                                                                 self.weight) is self.kernel
        return self.format + (TORCH_SUFFIX if on_torch_path else "")

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
        self.kernel = kernel_for(w.format, w.device, torch_kernel=self.torch_kernel, weight=w)
        self._state = self.kernel.prepare(w)
        self._dtype = w.dtype
        _register(self, self.weight_buffer())
        # an int8 weight's other int8 layouts (same numbers, other kernels): paths of its plan
        self._twins = tuple(f for f in QUANTIZED
                            if w.QUANTIZED and f != w.format and candidates(f, w.device)[0].native)
        # the planned paths' state, rebuilt lazily after a move or load: bucket -> plan entry, the dense
        # weight (when a bucket chose dense), path -> (kernel, state) of torch's kernel or a twin (when chosen)
        self._routes: dict[int, dict] = {}
        self._last: tuple[int, str] = (-1, "")  # (tokens, path) of the latest routed call
        self._dense: torch.Tensor | None = None
        self._others: dict[str, tuple] = {}

    def _apply(self, fn, recurse=True):  # .to / .cuda / .half move the buffers; the kernel state follows
        super()._apply(fn, recurse)
        self._prepare()
        return self

    def __getstate__(self) -> dict:  # copy.deepcopy, pickle: the kernel and its state (pointers) are rebuilt
        return {k: v for k, v in self.__dict__.items() if k not in ("kernel", "_state", "_dense", "_others")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._prepare()

    def _load_from_state_dict(self, *args, **kwargs):  # buffers are copied in place: the kernel state follows
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
        path = None if self.planner is None or ours_cpu.needs_grad(x, bias) else \
            self.route(x.numel() // max(1, self.in_features))
        if path == DENSE:  # F.linear takes (..., in) as it is: no reshapes on the path dense-chosen layers run
            return self._call(path, x, bias, self._activation)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self._call(path, x2, bias, self._activation)  # (N, out)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _call(self, path: str | None, x2: torch.Tensor, bias: torch.Tensor | None,
              act: str | None) -> torch.Tensor:
        """act(x2 W^T + bias) by ``path`` (``paths``; None: the kernel's own choice).  x2: (N, in) -> (N, out);
        the dense path takes any (..., in)."""
        if path == DENSE:
            x2 = quantize_input(x2) if self._input_bits else x2
            return activations.apply(F.linear(x2, self.dense_weight(), bias), act)
        if path is None or not self._off_kernel(path):
            return self.kernel.matmul(self._state, x2, bias, act, **_variant_kw(path))
        kernel, state = self._other_kernel(path)
        return kernel.matmul(state, x2, bias, act)

    # ---- planned paths (sparse_ops.plan) ----------------------------------------------------------------

    def _off_kernel(self, path: str) -> bool:
        """Whether ``path`` runs elsewhere than this layer's kernel (dense, an int8 twin, or torch's kernel when
        ours is it)."""
        return (path == DENSE or path in self._twins
                or (path.endswith(TORCH_SUFFIX) and self.kernel.backend != "torch"))

    @property
    def prepared(self) -> object:
        """The weight as this layer's kernel prepared it (``kernel.prepare``): what the kernel's ``matmul`` and
        ``ffn`` paths take (the fused modules call them with it)."""
        return self._state

    def runs_own_kernel(self, n: int) -> bool:
        """Whether a call with n tokens runs this layer's kernel (the fused modules' one-call paths need that)."""
        return self.planner is None or not self._off_kernel(self.route(n))

    def kernel_kwargs(self, n: int) -> dict[str, str]:
        """The extra arguments of ``kernel.matmul`` for n tokens: the planned ``variant``, where there is one."""
        return {} if self.planner is None else _variant_kw(self.route(n))

    def native_weight(self, n: int = 1) -> NativeWeight:
        """The weight as our CPU kernels run it on the path planned for n tokens (``route``): this layer's kernel
        state, an int8 twin's, or a dense copy for our dense kernel where the plan chose dense. Where the plan
        chose torch's kernel (or the layer runs on it), our kernel of the same format: native code (the decoder
        step, ``sparse_ops.decode``) cannot call torch's. ValueError off the CPU or without native kernels."""
        if self.kernel_device.type != "cpu" or not cpp.available():
            raise UserValueError(f"native kernels run CPU weights in a process that built them; this layer is on "
                             f"{self.kernel_device} (native kernels available: {cpp.available()})")
        path = self.route(n) if self.planner is not None else self.choice
        if path == DENSE and self._input_bits:  # int8 inputs: the dense int8 kernel gives the same numbers
            path = DenseInt8.format
        if path == DENSE:
            return ours_cpu.prepare_dense(self.dense_weight())
        if path in self._twins:
            return self._other_kernel(path)[1]
        if self.kernel.backend == OURS:
            return ours_cpu.masked(self._state) if path.endswith(".mask") else self._state
        if ("ours", self.format) not in self._others:
            ours = next(k for k in candidates(self.format, "cpu") if k.backend == OURS)
            self._others[("ours", self.format)] = (ours, ours.prepare(self.weight))
        return self._others[("ours", self.format)][1]

    def dense_weight(self) -> torch.Tensor:
        """The weight decompressed (built once, kept while the layer stays where it is: the dense path)."""
        if self._dense is None:
            self._dense = self.weight.to_dense()
        return self._dense

    def _other_kernel(self, path: str) -> tuple:
        """(kernel, prepared state) of torch's path or an int8 twin (the weight in another int8 layout), built at
        its first use."""
        if path not in self._others:
            if path in self._twins:
                weight = format_class(path).from_quantized(*self.weight.quantized(), self._input_bits)
                kernel = kernel_for(path, self.kernel_device, weight=weight)
            else:
                weight, kernel = self.weight, torch_path_kernel(self.format, self.kernel_device, self.weight)
            self._others[path] = (kernel, kernel.prepare(weight))
        return self._others[path]

    @property
    def kernel_device(self) -> torch.device:
        return self._buffers[f"weight_{self._part_names[0]}"].device

    def paths(self, n: int) -> list[str]:
        """The paths a plan chooses among for n tokens: dense, our kernel (each variant), torch's kernel, and for
        an int8 weight its other int8 layouts (``dense-int8`` among them: never slower than dense int8)."""
        variants = self.kernel.variants(n) if self.kernel.variants else ()
        ours = [f"{self.format}.{v}" for v in variants] or [self.choice]
        torch_path = self.format + TORCH_SUFFIX
        has_torch = (self.kernel.backend != "torch"
                     and torch_path_kernel(self.format, self.kernel_device, self.weight) is not None)
        return [DENSE, *ours, *([torch_path] if has_torch else []), *self._twins]

    def planned(self, batch: int) -> dict | None:
        """The plan entry ``{"choice": path, "speedup": {path: x}}`` of a bucket, if a call has reached it."""
        return self._routes.get(batch)

    def route(self, n: int) -> str:
        """The path a call with n tokens takes (``paths``): measured at the first call in n's bucket
        (``plan.bucket``) or read from the planner's cache. Unplanned layers: ``choice``."""
        if self.planner is None:
            return self.choice
        if self._last[0] == n:  # the usual case: the same batch as the call before (a few us per layer else)
            return self._last[1]
        b = plan.bucket(n)
        entry = self._routes.get(b)
        if entry is None:
            entry = self._plan(b)
        self._last = (n, entry["choice"])
        return entry["choice"]

    def _plan(self, b: int) -> dict:
        with _PLAN_LOCK:
            if b in self._routes:
                return self._routes[b]
            planner, device = self.planner, self.kernel_device
            store, machine = planner.store(), plan.machine_key(device)
            cold = planner.cold_at(b, device, self.weight.nbytes)
            fmt = self.format + (f" in{self._input_bits}" if self._input_bits else "") + (" cold" if cold else "")
            key = plan.layer_key(fmt, (self.out_features, self.in_features), self._dtype, self.sparsity, device, b)
            paths = self.paths(b)
            entry = store.get(machine, key)
            if entry is None or entry["choice"] not in paths or "busy" in entry:  # busy: measured again
                entry = self._measure(paths, b, planner, cold)
                store.put(machine, key, entry)
                measured = "measured" + (f" while busy ({entry['busy']})" if "busy" in entry else "")
            else:
                measured = "cached"
            if planner.verbose:
                x = entry["speedup"].get(entry["choice"])
                print(f"sparse_ops: {self.name or key}: {b} token{'s' * (b > 1)} -> {entry['choice']}"
                      + ("" if x is None else f" ({x:.2f}x of dense)") + f", {measured}", file=sys.stderr)
            self._routes[b] = entry
            chosen = {e["choice"] for e in self._routes.values()}
            if DENSE not in chosen:
                self._dense = None  # the copy built for the timing: only kept where a bucket runs dense
            self._others = {p: v for p, v in self._others.items() if p in chosen}  # likewise twins, torch's
            return entry

    def _measure(self, paths: list[str], b: int, planner: Planner, cold: bool) -> dict:
        """A plan entry for bucket b: the choice and each path's speedup over dense, timed once more when the
        machine was busy (``sparse_ops.busy``) and marked ``busy`` if it still was."""
        for _ in range(2):
            with busy.Watch() as watch:
                times = self._time_paths(paths, b, planner.timer, cold)
            if not watch.load.busy:
                break
        medians = {p: t.median_s if isinstance(t, Timing) else t for p, t in times.items()}
        worst = {p: t.p90_s for p, t in times.items()} if all(isinstance(t, Timing) for t in times.values()) \
            else None
        entry = {"choice": plan.choose(medians, planner.prefer_within, worst),
                 "speedup": {p: round(medians[DENSE] / max(t, 1e-12), 3) for p, t in medians.items()}}
        if watch.load.busy:
            entry["busy"] = watch.load.describe()
        return entry

    def _time_paths(self, paths: list[str], b: int, timer: Timer | None,
                    cold: bool) -> dict[str, float] | dict[str, Timing]:
        """Seconds per call of each path at b tokens on this layer's weight (no activation); ``cold``: each call
        after ``plan.flush_caches``."""
        gen = torch.Generator(device=self.kernel_device).manual_seed(0)
        x = torch.randn(b, self.in_features, generator=gen, device=self.kernel_device).to(self._dtype)
        fns = {p: functools.partial(self._call, p, x, self._buffers["bias"], None) for p in paths}
        with torch.inference_mode():
            if timer is not None:
                return timer(fns, self.kernel_device)
            if cold:
                return time_candidates(fns, self.kernel_device, repeats=plan.COLD_REPEATS, before=plan.flush_caches)
            return time_candidates(fns, self.kernel_device, repeats=plan.PLAN_REPEATS,
                                   min_sample_s=plan.PLAN_SAMPLE_S)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format!r}, " \
               f"kernel={self.kernel.name!r}" + (f", activation={self._activation!r}" if self._activation else "") \
               + (f", input_bits={self._input_bits}" if self._input_bits else "") \
               + (", planned" if self.planner is not None else "")

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


def _variant_kw(path: str | None) -> dict[str, str]:
    """``variant=`` of our kernel's matmul for a path: "csr.panels" -> {"variant": "panels"}, "csr" -> {}."""
    variant = "" if path is None else path.partition(".")[2]
    return {"variant": variant} if variant else {}


def candidate_formats(w: torch.Tensor) -> list[str]:
    """Sparse layers worth timing for a weight on its device: lossless formats with a native kernel whose pattern
    fits, then torch's kernel for the formats where ours is the default ("csr:torch" on CPU)."""
    names, torch_names = [], []
    for name in LOSSLESS:  # int8 formats change the numbers: chosen by the user (prune convert --quantize)
        fmt = FORMATS[name]
        try:
            kernel = candidates(name, w.device)[0]
        except NotImplementedError:
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
