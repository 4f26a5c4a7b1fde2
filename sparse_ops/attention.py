"""Our CPU attention kernel (``kernels.ours_cpu.attention``) as a Hugging Face attention implementation.

Once a model's linears are sparse, attention is what is left: in a 6-layer BERT (hidden 384, sequence 128) at 90%
sparsity it took about a quarter of the sparse model's time under torch's SDPA. ``use_fast_attention(model)``
switches a ``transformers`` model that dispatches through ``AttentionInterface`` (BERT, Llama, Qwen2, ...) to
``attention_forward``: our kernel where it applies and is measured faster than SDPA, SDPA otherwise (training,
dropout, attention weights asked for, soft-capping, sinks, position bias, another device or dtype, or more than
``ours_cpu.ATTENTION_MAX_KEYS`` keys, beyond which SDPA is faster). ``sparsify(..., fuse=True)`` calls it.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=50)).eval()
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> before = model(input_ids=ids).last_hidden_state
    >>> use_fast_attention(model)
    True
    >>> torch.allclose(model(input_ids=ids).last_hidden_state, before, atol=1e-5)
    True
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_ops.kernels import ours_cpu

NAME = "sparse_ops"  # the implementation's name in transformers' AttentionInterface
# keyword arguments of an attention call that our kernel does not implement when set
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias", "head_mask")


def _fast(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: torch.Tensor | None, dropout: float, scaling: float | None, is_causal: bool | None,
          kwargs: dict) -> torch.Tensor | None:
    """Our kernel's output (B, S, H, D), or None where SDPA must run (under torch.compile and export too: the
    compiler traces SDPA)."""
    if torch.compiler.is_compiling() or dropout or module.training or kwargs.get("output_attentions") \
            or any(kwargs.get(k) is not None for k in _UNSUPPORTED):
        return None
    q_len, kv_len = query.shape[2], key.shape[2]
    # SDPA's rule (transformers' sdpa_attention_forward): causal only without a mask, for more than one query
    causal = q_len > 1 and attention_mask is None and (getattr(module, "is_causal", True)
                                                       if is_causal is None else is_causal)
    if causal and q_len != kv_len:  # SDPA aligns the triangle top-left and crops the keys: leave it to SDPA
        return None
    return ours_cpu.attention(query, key, value, attention_mask, scaling, causal)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, S, D), key and value (B, Hk, L, D) -> ((B, S, H, D), None),
    as ``sdpa_attention_forward`` returns, which runs wherever ours does not apply."""
    out = _fast(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if out is not None:
        return out, None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_fast_attention(model: nn.Module) -> bool:
    """Make a ``transformers`` model run ``attention_forward`` (in place); True when it now does. False, with the
    model unchanged, for a model that is not a ``transformers`` model, does not dispatch through
    ``AttentionInterface``, or runs another implementation than SDPA or eager (flash, flex, paged: kept)."""
    config = getattr(model, "config", None)
    if not hasattr(model, "set_attn_implementation") or getattr(config, "_attn_implementation", None) not in (
            "sdpa", "eager", NAME) or not model._can_set_attn_implementation():
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean masks, or None where SDPA needs none
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
