"""Decode LLaMA-family models (Llama, Mistral, Qwen2) in one native call per step: ``generate`` and ``Decoder``.

transformers' generate loop runs a dozen PyTorch ops per block per token, each a Python call; on a CPU a small
model spends most of each token there, not in its matmuls. ``Decoder`` hands the whole model to our C++ step
(``csrc/decode_step.h``) once: each block's norms, q/k/v/o projections, rotary, attention over a KV cache it
owns, gated MLP, then the final norm and the LM head, for any number of new tokens (the prompt in one call,
then one token per call), with no Python per layer. Each linear layer runs the kernel its plan chose for that
many tokens (``SparseLinear.native_weight``: CSR, 2:4, the int8 layouts, or our dense kernel where the plan chose
dense); plain ``nn.Linear`` layers run our dense kernel. ``lm_head="int8"`` or ``"bf16"`` stores the LM head
(a fifth of SmolLM2-135M's weights) in four times or half fewer bytes; an int8 head quantizes its input as the
model's int8 layers do (``input_bits``).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> ids = torch.tensor([[1, 5, 9]])
    >>> out = generate(model, ids, max_new_tokens=4)
    >>> ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    >>> torch.equal(out, ref)
    True
"""
from __future__ import annotations

import ctypes
import threading

import torch
from torch import nn

from sparse_ops.activations import CODES
from sparse_ops.errors import UnavailableError, UserTypeError, UserValueError
from sparse_ops.kernels import cpp, ours_cpu
from sparse_ops.kernels.ours_cpu import NativeWeight
from sparse_ops.linear import SparseLinear
from sparse_ops.quantized import DenseInt8

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SLOTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # decode_step.h's order
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos / sin depend on the position alone
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
LM_HEADS = (None, "int8", "bf16")


class Decoder:
    """A LLaMA-family ``*ForCausalLM`` prepared for our decoder step, with a KV cache of ``max_len`` positions for
    each of ``batch`` sequences.

    ``step(tokens, seq=i)`` appends tokens to sequence i (a prompt, or its next token) and returns the logits of
    the last (or, with ``all_logits``, of each); ``step_batch(tokens)`` appends one token to every sequence in one
    call (the weights read once for all of them); ``reset()`` empties the caches. The model's weights are read in
    place (keep the model alive and unchanged while the decoder is used); one step runs at a time.

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> d = Decoder(model, max_len=16)
    >>> logits = d.step(torch.tensor([1, 5, 9]), all_logits=True)
    >>> torch.allclose(logits, model(torch.tensor([[1, 5, 9]])).logits[0], atol=1e-4), d.positions
    (True, [3])
    """

    def __init__(self, model: nn.Module, *, max_len: int = 2048, lm_head: str | None = None, batch: int = 1):
        if lm_head not in LM_HEADS:
            raise UserValueError(f"unknown lm_head {lm_head!r}; allowed: {', '.join(map(str, LM_HEADS))}")
        for name, value in (("max_len", max_len), ("batch", batch)):
            if not isinstance(value, int) or value < 1:
                raise UserValueError(f"{name} must be a positive int, got {value!r}")
        lib = cpp.library()
        if lib is None:
            raise UnavailableError("the decoder step needs the native CPU kernels, unavailable in this process (see "
                               "the log)")
        cfg, body = _check_model(model)
        attn0 = body.layers[0].self_attn
        self.layers, self.hidden = cfg.num_hidden_layers, cfg.hidden_size
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = attn0.head_dim
        self.vocab, self.max_len, self.batch, self.positions = cfg.vocab_size, max_len, batch, [0] * batch
        self.intermediate = body.layers[0].mlp.gate_proj.out_features
        window = getattr(cfg, "sliding_window", None) if type(model).__name__ == "MistralForCausalLM" else None
        self.window = int(window or 0)
        with torch.no_grad():
            positions = torch.arange(max_len)[None]
            cos, sin = body.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        keep = [cos[0].float().contiguous(), sin[0].float().contiguous(),
                body.embed_tokens.weight.detach().float().contiguous(), _fp32(body.norm.weight)]
        shape = (batch, self.layers, self.kv_heads, max_len, self.head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape), torch.zeros(shape)
        dims = (ctypes.c_int64 * 10)(self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim,
                                     self.intermediate, self.vocab, max_len, self.window, batch)
        single = (ctypes.c_int64 * 3)(ours_cpu.SINGLE_THREAD_WORK[True], ours_cpu.SINGLE_THREAD_WORK[False],
                                      ours_cpu.ATTENTION_SINGLE_THREAD_WORK)
        act = _gate_activation(cfg, body.layers[0].mlp)
        handle = lib.decoder_new(ctypes.addressof(dims), float(cfg.rms_norm_eps), float(attn0.scaling), CODES[act],
                                 ctypes.addressof(single),
                                 *(t.data_ptr() for t in keep), self.k_cache.data_ptr(), self.v_cache.data_ptr())
        if not handle:
            raise UserValueError(f"the decoder step cannot run this configuration: {dict(zip(_DIMS, dims))}")
        self._lib, self._handle, self._lock = lib, handle, threading.Lock()
        self.weights: dict[str, NativeWeight] = {}  # qualified name -> what the step runs (kept alive here)
        for i, block in enumerate(body.layers):
            for slot, name in enumerate(SLOTS):
                parent = block.self_attn if slot < 4 else block.mlp
                self._set(i, slot, f"model.layers.{i}.{'self_attn' if slot < 4 else 'mlp'}.{name}",
                          getattr(parent, name), keep)
            norms = (_fp32(block.input_layernorm.weight), _fp32(block.post_attention_layernorm.weight))
            keep.extend(norms)
            lib.decoder_norms(handle, i, *(t.data_ptr() for t in norms))
        bits = max((m.input_bits or 0 for m in model.modules() if isinstance(m, SparseLinear)), default=0) or None
        self._set(-1, 0, "lm_head", model.lm_head, keep, lm_head, bits)
        self._keep = keep

    def _set(self, layer: int, slot: int, name: str, module: nn.Module, keep: list, lm_head: str | None = None,
             input_bits: int | None = None) -> None:
        w, bias = _native_weight(module, lm_head, input_bits)
        out, inp = w.source.shape
        parts = (ctypes.c_void_p * 6)(*(t.data_ptr() for t in w.tensors))
        if bias is not None:
            bias = _fp32(bias)
            keep.append(bias)
        self._lib.decoder_linear(self._handle, layer, slot, w.layout.encode(), ctypes.addressof(parts), out, inp,
                                 w.extra, w.nnz, None if bias is None else bias.data_ptr())
        self.weights[name] = w

    def layouts(self) -> dict[str, str]:
        """Each linear layer's layout in the step (qualified name -> "csr_f32_i16", "dense_f32", ...)."""
        return {name: w.layout for name, w in self.weights.items()}

    @property
    def position(self) -> int:
        """Cached positions of sequence 0 (the only one of a decoder with batch 1)."""
        return self.positions[0]

    def reset(self, position: int = 0, seq: int | None = None) -> None:
        """Keep the first ``position`` cached positions of sequence ``seq`` (None: of every sequence; default
        none: the next step starts a new sequence); the next step continues from there (a shared prompt decoded
        again, a rejected draft dropped)."""
        for s in range(self.batch) if seq is None else [self._check_seq(seq)]:
            if not 0 <= position <= self.positions[s]:
                raise UserValueError(f"position must be in [0, {self.positions[s]}] (the cached positions of sequence "
                                 f"{s}), got {position}")
            self.positions[s] = position

    def _check_seq(self, seq: int) -> int:
        if not isinstance(seq, int) or not 0 <= seq < self.batch:
            raise UserValueError(f"seq must be a sequence index in [0, {self.batch}), got {seq!r}")
        return seq

    def time_split(self) -> dict[str, float]:
        """Seconds this decoder's steps spent in their linear layers (LM head included) and in all, and the steps
        run: what is left outside the kernels (norms, rotary, attention, the cache) is the difference.

        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> d = Decoder(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval(), max_len=8)
        >>> _ = d.step(torch.tensor([1, 2]))
        >>> t = d.time_split(); t["steps"], 0 < t["linear_s"] <= t["step_s"]
        (1, True)
        """
        times = (ctypes.c_int64 * 3)()
        self._lib.decoder_time(self._handle, ctypes.addressof(times))
        return {"linear_s": times[0] / 1e9, "step_s": times[1] / 1e9, "steps": int(times[2])}

    def step(self, tokens: torch.Tensor, all_logits: bool = False, seq: int = 0) -> torch.Tensor:
        """Run ``tokens`` (a 1-D int tensor: the prompt, or the last token) at the end of sequence ``seq``'s cache;
        return the fp32 logits of the last token (vocab,), or of each (n, vocab) with ``all_logits``.

        Errors: tokens not 1-D or empty, ids outside the vocabulary, a sequence index out of range, or more
        positions than ``max_len`` (ValueError naming the value)."""
        ids = self._ids(tokens)
        n, start = ids.numel(), self.positions[self._check_seq(seq)]
        if start + n > self.max_len:
            raise UserValueError(f"{start} cached + {n} new positions exceed max_len={self.max_len}; build the "
                             f"Decoder with a larger max_len")
        logits = self._run(ids, [seq] * n, list(range(start, start + n)), n if all_logits else 1)
        self.positions[seq] += n
        return logits if all_logits else logits[0]

    def step_batch(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token of each sequence (``tokens`` (batch,)) in one call, each at its own position: the logits
        (batch, vocab). Same errors as ``step``."""
        ids = self._ids(tokens)
        if ids.numel() != self.batch:
            raise UserValueError(f"step_batch takes one token per sequence ({self.batch}), got {ids.numel()}")
        full = [s for s, p in enumerate(self.positions) if p >= self.max_len]
        if full:
            raise UserValueError(f"sequence {full[0]} holds max_len={self.max_len} positions; build the Decoder with a "
                             f"larger max_len")
        logits = self._run(ids, list(range(self.batch)), list(self.positions), self.batch)
        self.positions = [p + 1 for p in self.positions]
        return logits

    def _ids(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(tokens)
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point:
            raise UserValueError(f"tokens must be a non-empty 1-D integer tensor, got {tuple(ids.shape)} {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab:
            raise UserValueError(f"token ids must be in [0, {self.vocab}), got {low if low < 0 else high}")
        return ids.to(torch.int64).contiguous()

    def _run(self, ids: torch.Tensor, seqs: list[int], positions: list[int], rows: int) -> torch.Tensor:
        """One native step over rows (token, sequence, position); the logits of the last ``rows`` rows."""
        seq, pos = torch.tensor(seqs, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64)
        logits = torch.empty(rows, self.vocab)
        with self._lock:
            self._lib.decoder_step(self._handle, ids.data_ptr(), ids.numel(), seq.data_ptr(), pos.data_ptr(),
                                   logits.data_ptr(), int(rows > 1), cpp.num_threads())
        return logits

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self._lib.decoder_free(handle)
            self._handle = None


_DIMS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "max_len", "window")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return ours_cpu._fp32(t.detach())


def _check_model(model: nn.Module) -> tuple[object, nn.Module]:
    """(config, decoder body) of a supported model; ValueError naming what is not."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise UserValueError(f"the decoder step runs {', '.join(ARCHITECTURES)}; got {name}")
    cfg, body = model.config, model.model
    rope = (getattr(cfg, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope not in ROPE_TYPES:
        raise UserValueError(f"rotary scaling {rope!r} depends on the sequence length; the decoder step supports "
                         f"{', '.join(ROPE_TYPES)}")
    if name == "Qwen2ForCausalLM" and getattr(cfg, "use_sliding_window", False):
        raise UserValueError("Qwen2 with use_sliding_window=True (windows on some layers) is not supported by the "
                         "decoder step")
    for p in model.parameters():
        if p.device.type != "cpu":
            raise UserValueError(f"the decoder step runs on the CPU; the model has parameters on {p.device}")
    return cfg, body


def _gate_activation(cfg: object, mlp: nn.Module) -> str:
    """The activation of the MLP's gate: fused into ``gate_proj`` (``fuse=True``), else the config's."""
    gate = mlp.gate_proj
    if isinstance(gate, SparseLinear) and gate.activation is not None:
        return gate.activation
    act = getattr(cfg, "hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise UserValueError(f"activation {act!r} is not supported by the decoder step; allowed: "
                         f"{', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[act]


def _native_weight(module: nn.Module, lm_head: str | None,
                   input_bits: int | None = None) -> tuple[NativeWeight, torch.Tensor | None]:
    """(what the step runs, bias) for a linear layer: a SparseLinear's planned path at one token, an
    ``nn.Linear``'s weight on our dense kernel; ``lm_head`` "int8" (taking ``input_bits``) / "bf16" requantizes
    the weight."""
    if isinstance(module, SparseLinear):
        weight, bias = (module.dense_weight() if lm_head else None), module.bias
    elif isinstance(module, nn.Linear):
        weight, bias = module.weight.detach(), module.bias
    else:
        raise UserTypeError(f"the decoder step runs nn.Linear and SparseLinear layers, got {type(module).__name__}")
    if lm_head == "int8":
        return ours_cpu.prepare_dense_int8(DenseInt8.from_dense(weight.float()).with_input_bits(input_bits)), bias
    if lm_head == "bf16":
        return ours_cpu.prepare_dense(weight.to(torch.bfloat16)), bias
    if isinstance(module, SparseLinear):
        return module.native_weight(1), bias
    return ours_cpu.prepare_dense(weight), bias


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             lm_head: str | None = None) -> torch.Tensor:
    """``input_ids`` (B, L): B prompts of L tokens (no padding), each followed by up to ``max_new_tokens``
    generated tokens: (B, L + new), through our decoder step (each prompt in one call, then one call per step for
    all B sequences). Greedy by default (the tokens of transformers' ``generate(do_sample=False)`` on the same
    weights, up to near-ties of the logits); ``do_sample``: sampling with ``temperature``, ``top_k`` (0: all)
    and ``top_p``. A sequence stops after ``eos_token_id`` (default the config's), the rest of its row then
    ``pad_token_id`` (default the config's, else the EOS); generation ends when every sequence has. The
    prepared decoder is kept on the model for the next call (rebuilt when it needs more positions or sequences,
    another ``lm_head``, or the model's parameters changed).

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> generate(model, torch.tensor([[1, 5, 9], [2, 6, 10]]), max_new_tokens=3).shape
    torch.Size([2, 6])
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise UserValueError(f"input_ids must be (B, L) with B, L >= 1 (prompts of one length, no padding), got "
                         f"{tuple(ids.shape)}")
    if max_new_tokens < 0:
        raise UserValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and (temperature <= 0 or top_k < 0 or not 0 < top_p <= 1):
        raise UserValueError(f"sampling needs temperature > 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, "
                         f"{top_k}, {top_p}")
    if max_new_tokens == 0:
        return ids.clone()
    cfg = model.config
    if eos_token_id is None:
        eos_token_id = getattr(cfg, "eos_token_id", None)
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
    if pad_token_id is None:
        pad_token_id = getattr(cfg, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else min(eos, default=0)
    batch = ids.shape[0]
    decoder = _decoder_for(model, ids.shape[1] + max_new_tokens, lm_head, batch)
    decoder.reset()
    logits = torch.stack([decoder.step(ids[b], seq=b) for b in range(batch)])
    out, done = [], [False] * batch
    for i in range(max_new_tokens):
        tokens = [pad_token_id if done[b] else _pick(logits[b], do_sample, temperature, top_k, top_p, generator)
                  for b in range(batch)]
        out.append(tokens)
        done = [d or t in eos for d, t in zip(done, tokens)]
        if all(done) or i == max_new_tokens - 1:
            break
        logits = decoder.step_batch(torch.tensor(tokens))
    return torch.cat([ids, torch.tensor(out, dtype=ids.dtype).T], dim=1)


def _decoder_for(model: nn.Module, length: int, lm_head: str | None, batch: int) -> Decoder:
    """The decoder kept on the model, rebuilt when too short, for another ``lm_head`` or batch, or after the
    parameters changed (their storage or version)."""
    key = (lm_head, batch, tuple((p.data_ptr(), p._version) for p in model.parameters()),
           tuple((b.data_ptr(), b._version) for b in model.buffers()))
    cached = model.__dict__.get("_sparse_decoder")
    if cached is None or cached[0] != key or cached[1].max_len < length:
        size = max(256, -(-length // 256) * 256)
        model.__dict__["_sparse_decoder"] = (key, Decoder(model, max_len=size, lm_head=lm_head, batch=batch))
    return model.__dict__["_sparse_decoder"][1]


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> int:
    """The next token: argmax, or a sample from the temperature-scaled logits kept by top-k and top-p."""
    if not do_sample:
        return int(torch.argmax(logits))
    scores = logits / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, -1) >= top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
