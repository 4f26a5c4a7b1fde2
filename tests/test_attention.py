"""Our attention kernel (``ours_cpu.attention``) on every build this CPU runs, against a float64 reference, and
its Hugging Face integration (``sparse_ops.attention``) against SDPA on tiny models built from configs."""
from __future__ import annotations

import math

import pytest
import torch

from sparse_ops import attention as fast
from sparse_ops.kernels import ours_cpu
from tests.test_cpu_kernels import RUNNABLE_ISAS, isa, needs_native  # noqa: F401 (isa: the fixture)

# (B, H, Hk, S, L, D): tails of the 32-query blocks and of the key strips, one query / one key, grouped-query
# heads, head sizes on every output path (vectors of 4, 8, 16 floats on each ISA, and D a multiple of none)
SHAPES = [(1, 12, 12, 128, 128, 32), (2, 4, 2, 37, 45, 64), (1, 3, 1, 5, 70, 24), (1, 2, 2, 1, 17, 128),
          (3, 2, 2, 33, 33, 16), (1, 1, 1, 1, 1, 8), (1, 2, 1, 50, 50, 20), (1, 1, 1, 65, 300, 256),
          (1, 2, 2, 70, 9, 16)]  # causal with more queries than keys: the first 61 see none


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    """The kernel takes the tiny shapes here too (by default SDPA runs those: ``ATTENTION_MIN_WORK``)."""
    monkeypatch.setattr(ours_cpu, "ATTENTION_MIN_WORK", 0)


def reference(q, k, v, mask=None, scale=None, causal=False):
    """softmax(q k^T scale + mask) v in float64, (B, S, H, D); rows that see no key are zero."""
    B, H, S, D = q.shape
    groups = H // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = q.double() @ k.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    keep = torch.ones_like(s, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            s = s + mask.double()
    if causal:
        L = k.shape[2]
        keep = keep & (torch.arange(L)[None] <= torch.arange(S)[:, None] + L - S)
    s = s.masked_fill(~keep, -math.inf)
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    return (p @ v).transpose(1, 2).float()


def heads(B, H, Hk, S, L, D, gen):
    """q, k, v as the head split of linear outputs (non-contiguous views)."""
    q = torch.randn(B, S, H, D, generator=gen).transpose(1, 2)
    kv = torch.randn(B, L, 2, Hk, D, generator=gen)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("how", ["plain", "causal", "bool_keys", "float_full", "scale"])
def test_attention_kernel_matches_reference_on_every_build(shape, how, isa):  # noqa: F811 (the fixture)
    gen = torch.Generator().manual_seed(sum(shape))
    B, H, Hk, S, L, D = shape
    q, k, v = heads(*shape, gen)
    kw = {"causal": how == "causal", "scale": 0.3 if how == "scale" else None}
    if how == "bool_keys":
        kw["mask"] = torch.rand(B, 1, 1, L, generator=gen) > 0.3
    elif how == "float_full":
        kw["mask"] = torch.randn(B, H, S, L, generator=gen)
    with torch.inference_mode():
        out = ours_cpu.attention(q, k, v, **kw)
    assert out is not None and out.shape == (B, S, H, D)
    # fp32 logits summed over D (up to ~|q||k| scale ~ 5 here): their rounding error is ~1e-6 relative
    torch.testing.assert_close(out, reference(q, k, v, **kw), rtol=1e-4, atol=1e-5)


@needs_native
def test_a_row_that_sees_no_key_is_zero_and_the_others_are_exact():
    q, k, v = heads(1, 2, 2, 3, 5, 8, torch.Generator().manual_seed(0))
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[0, 0, 1] = False  # query 1 sees nothing
    with torch.inference_mode():
        out = ours_cpu.attention(q, k, v, mask)
    assert out[0, 1].abs().max() == 0
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=1e-5, atol=2e-6)


@needs_native
def test_attention_declines_what_it_does_not_run(monkeypatch):
    q, k, v = heads(1, 2, 2, 4, 4, 8, torch.Generator().manual_seed(0))
    assert ours_cpu.attention(q.double(), k.double(), v.double()) is None  # not fp32
    assert ours_cpu.attention(q, k[:, :1].expand(1, 3, 4, 8), v[:, :1].expand(1, 3, 4, 8)) is None  # 2 % 3
    assert ours_cpu.attention(q.requires_grad_(), k, v) is None  # a gradient is needed
    long = torch.randn(1, 1, ours_cpu.ATTENTION_MAX_KEYS + 1, 8)
    assert ours_cpu.attention(torch.randn(1, 1, 1, 8), long, long) is None
    monkeypatch.setattr(ours_cpu, "ATTENTION_MIN_WORK", 4 * 4 * 8 + 1)  # too little work to pay for the call
    assert ours_cpu.attention(q[:, :1], k[:, :1], v[:, :1]) is None


def _bert(**kw):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                        vocab_size=100, attn_implementation="sdpa", **kw)
    return BertModel(config, add_pooling_layer=False).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _calls(monkeypatch):
    """Counts the kernel's calls that ran (not declined)."""
    calls = []
    real = ours_cpu.attention

    def counted(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(ours_cpu, "attention", counted)
    return calls


@needs_native
def test_bert_with_padding_runs_our_kernel_and_matches_sdpa(monkeypatch):
    model = _bert()
    ids = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert fast.use_fast_attention(model) and model.config._attn_implementation == fast.NAME
        calls = _calls(monkeypatch)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls == [True, True]  # both layers, on our kernel
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_native
def test_llama_prefill_and_decode_run_our_kernel_and_match_sdpa(monkeypatch):
    model = _llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        logits = model(input_ids=ids).logits
        fast.use_fast_attention(model)
        calls = _calls(monkeypatch)
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, want)
    assert calls and all(calls)  # causal prefill, then one query over the cache, grouped heads


@needs_native
def test_training_and_long_sequences_go_to_sdpa(monkeypatch):
    model = _bert(max_position_embeddings=ours_cpu.ATTENTION_MAX_KEYS + 8)
    fast.use_fast_attention(model)
    calls = _calls(monkeypatch)
    model.train()
    model(input_ids=torch.randint(0, 100, (1, 8))).last_hidden_state.sum().backward()  # dropout, gradients
    model.eval()
    with torch.inference_mode():
        model(input_ids=torch.randint(0, 100, (1, ours_cpu.ATTENTION_MAX_KEYS + 1)))
    assert not any(calls)  # declined: SDPA ran


def test_a_model_without_the_attention_interface_is_left_alone():
    assert fast.use_fast_attention(torch.nn.Linear(2, 2)) is False
