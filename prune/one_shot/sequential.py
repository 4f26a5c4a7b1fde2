"""Layer-sequential calibration: run calibration data through a model one transformer block at a time.

One-shot methods (SparseGPT, Wanda) prune a pretrained model block by block. The inputs of block ``i`` are
computed by blocks ``0 .. i-1`` *after* they were pruned, so each block is pruned against the activations it will
actually see, and errors of earlier blocks are compensated rather than compounded. :func:`iter_blocks`:

1. runs the model's own forward on each calibration batch, stops it at block 0 (a forward pre-hook records the
   block's positional and keyword inputs, then raises) -- so the embeddings, position ids, rotary ``(cos, sin)``
   and attention masks are built by the model itself, exactly as in a normal forward;
2. yields one :class:`CalibrationBlock` per block, in order. The loop body attaches its hooks (e.g.
   :class:`prune.calibration.InputStats` on the block's linears), calls ``block.run()`` (which runs the block on
   every calibration input), prunes ``block.module`` in place, removes its hooks and calls ``block.advance()``:
   the pruned block runs once more on every input, and its outputs become the next block's inputs.

Memory: the activations of all calibration batches for one block (``batches x b x seq x hidden``) plus one block;
with ``device`` given, a model kept on the CPU is moved onto the device one block at a time (and, for step 1,
everything outside the blocks: embeddings, final norm, head), so a model much larger than the device can be
pruned.

Supported: Hugging Face models whose blocks form one ``nn.ModuleList`` below the base model -- Llama, Mistral,
Qwen2 (``model.layers``), GPT-2 (``transformer.h``), OPT (``model.decoder.layers``), Phi (``model.layers``) and
BERT-family encoders (``bert.encoder.layer``, or ``encoder.layer`` for a bare ``BertModel``), and models built like
them. Block 0's keyword inputs (per batch) are reused for every block; models whose layers get different inputs
(e.g. alternating sliding-window / full-attention masks, ``config.layer_types`` with more than one distinct value)
are not supported and raise ``NotImplementedError``. Key-value caches are never used: the model is called with
``use_cache=False`` where it accepts it, and a cache object found among the captured inputs is replaced by ``None``.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(config)
    >>> blocks = find_blocks(model)
    >>> blocks.path, len(blocks.layers), blocks.family
    ('model.layers', 2, 'llama')
    >>> sorted(block_linears(blocks.layers[0]))[:2]
    ['mlp.down_proj', 'mlp.gate_proj']
    >>> seen = []
    >>> for block in iter_blocks(model, [torch.randint(0, 64, (2, 8))], progress=False):
    ...     block.run()  # with hooks attached: collect statistics; then prune block.module in place
    ...     block.advance()  # its outputs are the next block's inputs
    ...     seen.append((block.index, block.name))
    >>> seen
    [(0, 'model.layers.0'), (1, 'model.layers.1')]
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from sparse_ops.errors import MisuseError, UnsupportedError, UserTypeError, UserValueError

__all__ = ["Blocks", "CalibrationBlock", "block_linears", "find_blocks", "iter_blocks"]

SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2, GPT-2, OPT, Phi, BERT-family encoders (and models built like them)"

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


@dataclass(frozen=True)
class Blocks:
    """The repeated transformer blocks of a model."""

    path: str  # qualified name of the ModuleList, e.g. "model.layers"
    layers: nn.ModuleList
    family: str  # model.config.model_type when available, e.g. "llama"


def _linear_types() -> tuple[type, ...]:
    """nn.Linear, and transformers' Conv1D (GPT-2) when transformers is loaded (a model using it implies it is)."""
    types: tuple[type, ...] = (nn.Linear,)
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    if isinstance(conv1d, type):
        types += (conv1d,)
    return types


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The nn.Linear and transformers Conv1D modules inside ``block``, by name relative to it (``"self_attn.q_proj"``)."""
    types = _linear_types()
    return {name: m for name, m in block.named_modules() if isinstance(m, types)}


def _family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else type(model).__name__.lower()


def find_blocks(model: nn.Module) -> Blocks:
    """The ModuleList of ``model``'s transformer blocks: the outermost, largest ``nn.ModuleList`` of modules of one
    class that each hold an nn.Linear (or Conv1D), looked for below the base model (``model.base_model``) first.

    Raises ValueError, naming the model's class, when there is none or when two such lists are equally large.
    """
    types = _linear_types()
    candidates: dict[str, nn.ModuleList] = {}
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        cls = type(mod[0])
        if all(type(m) is cls and any(isinstance(s, types) for s in m.modules()) for m in mod):
            candidates[name] = mod
    # lists nested in a block (e.g. the experts of a mixture-of-experts layer) are not the blocks
    outer = {n: m for n, m in candidates.items() if not any(n.startswith(o + ".") for o in candidates if o != n)}
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        prefix = next((n for n, m in model.named_modules() if m is base), None)
        if prefix:
            below = {n: m for n, m in outer.items() if n.startswith(prefix + ".")}
            outer = below or outer
    if not outer:
        raise UserValueError(
            f"find_blocks: {type(model).__name__} has no repeated transformer blocks (an nn.ModuleList of modules "
            f"of one class holding nn.Linear/Conv1D layers); supported: {SUPPORTED_FAMILIES}"
        )
    most = max(len(m) for m in outer.values())
    best = [n for n, m in outer.items() if len(m) == most]
    if len(best) > 1:
        raise UserValueError(
            f"find_blocks: the blocks of {type(model).__name__} are ambiguous: {', '.join(best)} are equally "
            f"likely; supported: {SUPPORTED_FAMILIES}"
        )
    return Blocks(path=best[0], layers=outer[best[0]], family=_family(model))


class _StopForward(Exception):
    """Raised by a pre-hook to end a forward there: the capture hook on block 0, ``run(until=...)``."""


def _stop(_module: nn.Module, _args: tuple) -> None:
    raise _StopForward


def _normalize(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


_Moved = list[tuple[nn.Module, str, bool, torch.device]]


def _move(units: Iterable[tuple[nn.Module, bool]], device: torch.device) -> _Moved:
    """Move the parameters and buffers of each ``(module, recurse)`` unit to ``device`` (parameters keep their
    identity, so tied weights stay tied); returns what :func:`_move_back` needs to undo it."""
    moved: _Moved = []
    for unit, recurse in units:
        for mod in unit.modules() if recurse else (unit,):
            for name, p in mod._parameters.items():
                if p is not None and p.device != device:
                    moved.append((mod, name, True, p.device))
                    p.data = p.data.to(device)
            for name, b in mod._buffers.items():
                if b is not None and b.device != device:
                    moved.append((mod, name, False, b.device))
                    mod._buffers[name] = b.to(device)
    return moved


def _move_back(moved: _Moved) -> None:
    for mod, name, is_param, device in reversed(moved):
        if is_param:
            p = mod._parameters[name]
            if p is not None:
                p.data = p.data.to(device)
        elif mod._buffers.get(name) is not None:
            mod._buffers[name] = mod._buffers[name].to(device)


def _outside(model: nn.Module, path: str) -> list[tuple[nn.Module, bool]]:
    """Units covering every module of ``model`` except the ModuleList at ``path``: its ancestors alone (their own
    tensors), every other subtree whole."""
    parts = path.split(".")
    ancestors = [model] + [model.get_submodule(".".join(parts[: k + 1])) for k in range(len(parts) - 1)]
    units: list[tuple[nn.Module, bool]] = []
    for depth, anc in enumerate(ancestors):
        units.append((anc, False))
        for name, child in anc.named_children():
            if name != parts[depth]:
                units.append((child, True))
    return units


def _is_cache(obj: object) -> bool:
    cache_utils = sys.modules.get("transformers.cache_utils")
    cache_cls = getattr(cache_utils, "Cache", None)
    return isinstance(cache_cls, type) and isinstance(obj, cache_cls)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _call_kwargs(model: nn.Module) -> dict[str, object]:
    """What the model's forward is called with besides the ids and mask: no cache, no attentions/hidden states."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    extra: dict[str, object] = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    config = getattr(model, "config", None)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for flag in ("output_attentions", "output_hidden_states"):  # override a config that asks for them
        if getattr(config, flag, False) and (flag in params or takes_any):
            extra[flag] = False
    return extra


def _hook_keys(module: nn.Module) -> dict[nn.Module, set[int]]:
    return {m: set(m._forward_pre_hooks) | set(m._forward_hooks) for m in module.modules()}


def _remove_new_hooks(before: dict[nn.Module, set[int]]) -> None:
    for m, keys in before.items():
        new = (set(m._forward_pre_hooks) | set(m._forward_hooks)) - keys
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if isinstance(hooks, dict):
                for k in new:
                    hooks.pop(k, None)


def _check_layer_types(model: nn.Module) -> None:
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        raise UnsupportedError(
            f"iter_blocks: {type(model).__name__} has layers of different types {sorted(set(layer_types))} "
            "(e.g. sliding-window and full attention), whose inputs differ from block 0's; not supported"
        )


@dataclass(eq=False)
class CalibrationBlock:
    """One transformer block of a layer-sequential pass (what :func:`iter_blocks` yields): its position
    ``index``, qualified ``name`` (``"model.layers.3"``), the block ``module`` itself, and the calibration
    ``inputs`` it sees -- ``(args, kwargs)`` per batch, computed by the blocks before it (as they are now)."""

    index: int
    name: str
    module: nn.Module
    inputs: list[tuple[tuple, dict]] = field(repr=False)
    advanced: bool = False

    def run(self, until: nn.Module | None = None, count: int | None = None) -> None:
        """Run the block on its calibration inputs (no grad, outputs discarded), e.g. for the forward hooks
        attached to its modules; as often as needed. ``until``: end each input's pass where that module (inside
        the block) is about to run. ``count``: the first ``count`` inputs only (default: all)."""
        if self.advanced:
            raise MisuseError(f"block {self.name} was advanced: its inputs are now the next block's")
        handle = until.register_forward_pre_hook(_stop) if until is not None else None
        try:
            with torch.no_grad():
                for args, kwargs in self.inputs[:count]:
                    try:
                        self.module(*args, **kwargs)
                    except _StopForward:
                        pass
        finally:
            if handle is not None:
                handle.remove()

    def advance(self) -> None:
        """Run the block (as it is now: pruned, say) once more on every input; its outputs replace the hidden
        states of ``inputs`` (in place), so they become the next block's inputs. Once only: later calls do
        nothing, and ``run`` is refused afterwards."""
        if self.advanced:
            return
        with torch.no_grad():
            for j, (args, kwargs) in enumerate(self.inputs):
                out = self.module(*args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                if not isinstance(hidden, Tensor):
                    raise UserTypeError(
                        f"iter_blocks: block {self.name} returned {type(out).__name__}, "
                        "not hidden states (a tensor or a tuple starting with one)"
                    )
                self.inputs[j] = _with_hidden(args, kwargs, hidden)
        self.advanced = True


def iter_blocks(
    model: nn.Module,
    batches: Sequence[Tensor],
    *,
    attention_mask: Sequence[Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Iterator[CalibrationBlock]:
    """Run the calibration ``batches`` (token ids, each (b, seq) int64) through ``model`` block by block: yields
    one :class:`CalibrationBlock` per transformer block, in order. In the loop body, attach hooks, call
    ``block.run()`` (as often as needed), prune ``block.module`` in place, then ``block.advance()``: the block's
    outputs become the next block's inputs, so each block sees the effect of every earlier pruning. A body that
    does not advance its block has it advanced when the loop goes on.

    ``attention_mask``: one mask per batch (padded batches), passed to the model's forward. ``device``: where the
    blocks compute and the activations live (default: the model's device); a model elsewhere is moved onto it one
    block at a time (and its embedding stage for the capture) and back afterwards. The model runs in eval mode;
    the training flags of its modules are restored afterwards. The iterator's hooks are always removed, and when
    the loop ends early (an exception, ``break``), the forward hooks left on the current block's modules are
    removed too. Nothing runs before the first iteration.

    Block 0's keyword inputs of each batch (masks, position ids, rotary embeddings ...) are reused for every block:
    models whose layers take different keyword inputs are correct only in so far as they are identical, and a
    config with ``layer_types`` of more than one kind raises NotImplementedError.
    """
    _check_layer_types(model)
    if attention_mask is not None and len(attention_mask) != len(batches):
        raise UserValueError(f"iter_blocks: {len(attention_mask)} attention masks for {len(batches)} batches")
    if len(batches) == 0:
        raise UserValueError("iter_blocks: no calibration batches")
    blocks = find_blocks(model)
    moving = device is not None
    target = _normalize(device) if device is not None else _model_device(model)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        inputs = _capture(model, blocks, batches, attention_mask, target, moving)
        with tqdm(range(len(blocks.layers)), desc="blocks", disable=not progress) as bar:
            for i in bar:
                yield from _visit(i, blocks, inputs, target if moving else None)
    finally:
        for m, flag in training.items():
            m.training = flag


def _visit(i: int, blocks: Blocks, inputs: list[tuple[tuple, dict]],
           device: torch.device | None) -> Iterator[CalibrationBlock]:
    """Block ``i``'s turn: on ``device`` (when given) while the loop body runs and until it is advanced."""
    module = blocks.layers[i]
    moved = _move([(module, True)], device) if device is not None else []
    try:
        block = CalibrationBlock(i, f"{blocks.path}.{i}", module, inputs)
        before = _hook_keys(module)
        try:
            yield block
        except BaseException:  # GeneratorExit: the loop body raised or broke off
            _remove_new_hooks(before)
            raise
        block.advance()
    finally:
        _move_back(moved)


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _capture(
    model: nn.Module,
    blocks: Blocks,
    batches: Sequence[Tensor],
    attention_mask: Sequence[Tensor] | None,
    device: torch.device,
    moving: bool,
) -> list[tuple[tuple, dict]]:
    """Block 0's (args, kwargs) for each batch, from the model's forward stopped there; on ``device``."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    extra = _call_kwargs(model)
    handle = blocks.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    moved = _move(_outside(model, blocks.path), device) if moving else []
    try:
        with torch.no_grad():
            for k, ids in enumerate(batches):
                call: dict[str, object] = dict(extra)
                if attention_mask is not None:
                    call["attention_mask"] = attention_mask[k].to(device)
                before = len(captured)
                try:
                    model(ids.to(device), **call)
                except _StopForward:
                    pass
                if len(captured) != before + 1:
                    raise UnsupportedError(
                        f"iter_blocks: the forward of {type(model).__name__} did not reach its first block "
                        f"{blocks.path}.0"
                    )
    finally:
        handle.remove()
        _move_back(moved)

    inputs: list[tuple[tuple, dict]] = []
    for args, kwargs in captured:
        args = tuple(None if _is_cache(a) else a for a in args)
        kwargs = {k: None if _is_cache(v) else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if not (args and isinstance(args[0], Tensor)) and not isinstance(kwargs.get("hidden_states"), Tensor):
            raise UserValueError(
                f"iter_blocks: block {blocks.path}.0 of {type(model).__name__} got its hidden states neither as "
                "its first positional argument nor as the keyword hidden_states"
            )
        inputs.append((_to(args, device), _to(kwargs, device)))
    return inputs
