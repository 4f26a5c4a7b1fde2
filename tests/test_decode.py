"""The decoder step (``sparse_ops.decode``, ``csrc/decode_step.h``) against transformers' own forward.

Each supported architecture from a tiny config (grouped-query attention, rotary scaling, biases, a sliding
window shorter than the sequence): the prompt in one step, then one token per step so the KV cache grows past
the prompt (and past the window), every position's logits compared with the model's forward over the whole
sequence. Then sparse and int8 layers from ``convert_checkpoint`` + ``from_pretrained``, each layer on the path
its plan chose, and greedy tokens against ``model.generate``.
"""
import pytest
import torch
import torch.nn.functional as F

from sparse_ops.kernels import cpp, ours_cpu

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not cpp.available(), reason="native CPU kernels unavailable")

from sparse_ops.checkpoint.convert import convert_checkpoint  # noqa: E402
from sparse_ops.decode import SLOTS, Decoder, generate  # noqa: E402
from sparse_ops.linear import SparseLinear  # noqa: E402
from sparse_ops.plan import DENSE  # noqa: E402
from sparse_ops.pretrained import from_pretrained  # noqa: E402

SMALL = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
CONFIGS = {
    "llama-gqa-llama3-rope-biases": lambda: transformers.LlamaConfig(
        **SMALL, attention_bias=True, mlp_bias=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}),
    "llama-linear-rope-mha": lambda: transformers.LlamaConfig(
        **{**SMALL, "num_key_value_heads": 4}, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-sliding-window": lambda: transformers.MistralConfig(**SMALL, sliding_window=5, head_dim=16),
    "qwen2-qkv-bias": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def model_for(name, seed=0):
    torch.manual_seed(seed)
    cfg = CONFIGS[name]()
    cfg._attn_implementation = "eager"
    model = getattr(transformers, CLASSES[name.split("-")[0]])(cfg).eval()
    with torch.no_grad():  # biases and norms away from their init (zeros, ones) so a missed one shows
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def check_steps(decoder, model, ids, prompt, atol):
    """Prefill ``prompt`` tokens in one step, then the rest one at a time; every position's logits vs transformers."""
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    decoder.reset()
    got = [decoder.step(ids[:prompt], all_logits=True)]
    got += [decoder.step(ids[i:i + 1])[None] for i in range(prompt, len(ids))]
    got = torch.cat(got)
    scale = ref.abs().max()
    torch.testing.assert_close(got, ref, atol=atol * scale, rtol=0)
    assert decoder.position == len(ids)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_as_the_cache_grows(name):
    model = model_for(name)
    ids = torch.randint(0, SMALL["vocab_size"], (14,), generator=torch.Generator().manual_seed(1))
    decoder = Decoder(model, max_len=32)
    assert set(decoder.layouts().values()) == {"dense_f32"}
    check_steps(decoder, model, ids, prompt=4, atol=1e-5)
    check_steps(decoder, model, ids, prompt=11, atol=1e-5)  # reset, a longer prompt: the same numbers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_match_transformers_generate(name):
    model = model_for(name)
    ids = torch.tensor([[3, 17, 42, 8]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(model, ids, max_new_tokens=12, eos_token_id=-1), ref)


def pruned_llama(sparsity, seed=0):
    model = model_for("llama-gqa-llama3-rope-biases", seed)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and n != "lm_head":
                w = m.weight
                keep = w.abs() >= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
                w.mul_(keep)
    return model


@pytest.mark.parametrize(("fmt", "quantize", "sparsity", "layouts"), [
    ("csr", None, 0.7, {"csr_f32_i16"}),
    ("2:4", None, 0.5, {"two_four_f32"}),
    ("auto", "int8", 0.5, {"csr_i8_i16", "bitmap_i8", "dense_i8"}),
])
@pytest.mark.parametrize("fuse", [False, True])
def test_sparse_and_int8_layers_run_their_planned_path(tmp_path, fmt, quantize, sparsity, layouts, fuse):
    model = pruned_llama(sparsity)
    if fmt == "2:4":
        with torch.no_grad():
            for n, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and n != "lm_head":
                    w = m.weight.view(-1, 4)
                    w.mul_(torch.zeros_like(w).scatter_(1, w.abs().topk(2, dim=1).indices, 1.0))
    model.save_pretrained(tmp_path / "dense")
    convert_checkpoint(tmp_path / "dense", tmp_path / "sparse", format=fmt, quantize=quantize)
    sparse = from_pretrained(tmp_path / "sparse", fuse=fuse)
    decoder = Decoder(sparse, max_len=32)
    got = decoder.layouts()
    for name, layout in got.items():
        layer = sparse.get_submodule(name)
        if isinstance(layer, SparseLinear) and str(layer.route(1).path) == DENSE:
            assert layout == "dense_f32", name  # the plan chose dense: our dense kernel
        elif name != "lm_head":
            assert layout in layouts, (name, layout)
    # the reference: transformers with the same numbers (int8: the weights as dequantized at load)
    with torch.no_grad():
        for name in got:
            layer = sparse.get_submodule(name)
            if isinstance(layer, SparseLinear):
                model.get_submodule(name).weight.copy_(layer.dense_weight())
    ids = torch.randint(0, SMALL["vocab_size"], (10,), generator=torch.Generator().manual_seed(2))
    check_steps(decoder, model, ids, prompt=3, atol=1e-5)


@pytest.mark.parametrize("lm_head", ["int8", "bf16"])
def test_a_cheaper_lm_head_is_its_weight_rounded(lm_head):
    model = model_for("qwen2-qkv-bias")  # tied: the head is the embedding
    decoder = Decoder(model, max_len=16, lm_head=lm_head)
    assert decoder.layouts()["lm_head"] == {"int8": "dense_i8", "bf16": "dense_bf16"}[lm_head]
    head = decoder.weights["lm_head"]
    rounded = head.source.to_dense().float()
    assert not torch.equal(rounded, model.lm_head.weight)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(rounded.clone())  # untie: the embedding keeps fp32
    ids = torch.tensor([5, 9, 11, 2])
    check_steps(decoder, model, ids, prompt=2, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_kernel_matches_f_linear(n, dtype):
    g = torch.Generator().manual_seed(n)
    w = torch.randn(45, 101, generator=g).to(dtype)  # odd sizes: every vector loop's tail
    x, bias = torch.randn(n, 101, generator=g), torch.randn(45, generator=g)
    got = ours_cpu.dense_matmul(ours_cpu.prepare_dense(w), x, bias, "silu")
    ref = F.silu(F.linear(x, w.float(), bias)).to(dtype)  # the output in the weight's dtype
    torch.testing.assert_close(got, ref, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}))


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = model_for("llama-linear-rope-mha")
    ids = torch.tensor([[3, 4, 5]])
    greedy = generate(model, ids, max_new_tokens=8)
    assert torch.equal(generate(model, ids, max_new_tokens=8, do_sample=True, top_k=1), greedy)
    assert torch.equal(generate(model, ids, max_new_tokens=8, do_sample=True, top_p=1e-6), greedy)
    a, b = (generate(model, ids, max_new_tokens=8, do_sample=True, temperature=5.0,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_generation_stops_at_eos_and_the_decoder_is_kept():
    model = model_for("llama-linear-rope-mha")
    ids = torch.tensor([[3, 4, 5]])
    greedy = generate(model, ids, max_new_tokens=8)
    kept = model.__dict__["_sparse_decoder"][1]
    first = int(greedy[0, 3])
    assert generate(model, ids, max_new_tokens=8, eos_token_id=first).tolist() == [[3, 4, 5, first]]
    assert model.__dict__["_sparse_decoder"][1] is kept
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)  # a changed parameter: the decoder is rebuilt
    generate(model, ids, max_new_tokens=2)
    assert model.__dict__["_sparse_decoder"][1] is not kept


def test_errors_name_the_bad_value():
    model = model_for("llama-linear-rope-mha")
    d = Decoder(model, max_len=4)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\), got 96"):
        d.step(torch.tensor([96]))
    with pytest.raises(ValueError, match="exceed max_len=4"):
        d.step(torch.arange(5))
    with pytest.raises(ValueError, match="1-D integer"):
        d.step(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="unknown lm_head 'fp8'"):
        Decoder(model, lm_head="fp8")
    with pytest.raises(ValueError, match=r"input_ids must be \(B, L\)"):
        generate(model, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"seq must be a sequence index in \[0, 1\), got 1"):
        d.step(torch.tensor([1]), seq=1)
    with pytest.raises(ValueError, match=r"one token per sequence \(1\), got 2"):
        d.step_batch(torch.tensor([1, 2]))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="runs LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; got GPT2"):
        Decoder(gpt2)
    cfg = transformers.LlamaConfig(**SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rotary scaling 'dynamic'"):
        Decoder(transformers.LlamaForCausalLM(cfg))


def test_every_slot_is_set_from_the_model():
    model = model_for("mistral-sliding-window")
    names = Decoder(model, max_len=8).layouts()
    assert len(names) == SMALL["num_hidden_layers"] * len(SLOTS) + 1 and "lm_head" in names


def test_the_plan_decides_per_layer(tmp_path, monkeypatch):
    """A layer planned dense runs our dense kernel; one planned on torch's CSR runs ours (native code cannot call
    torch's); the rest their own kernel; the numbers stay transformers'."""
    import sparse_ops.plan

    def timer(fns, device, **timing):  # the path in choice[0] fastest
        return {k: 0.5 if k == choice[0] else 1.0 for k in fns}

    choice = ["dense"]
    monkeypatch.setattr(sparse_ops.plan, "time_candidates", timer)
    model = pruned_llama(0.7)
    model.save_pretrained(tmp_path / "dense")
    convert_checkpoint(tmp_path / "dense", tmp_path / "sparse", format="csr")
    sparse = from_pretrained(tmp_path / "sparse")
    layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    for i, layer in enumerate(layers):  # plan each layer at one token (layers of one shape share a plan entry)
        choice[0] = ["dense", "csr:torch", "csr"][i % 3]
        layer.route(1)
    names = [n for n, m in sparse.named_modules() if isinstance(m, SparseLinear)]
    routes = {n: str(sparse.get_submodule(n).route(1).path) for n in names}
    assert set(routes.values()) >= {"dense", "csr:torch"}
    got = Decoder(sparse, max_len=16).layouts()
    assert {n: got[n] for n in names} == {n: "dense_f32" if r == "dense" else "csr_f32_i16" for n, r in routes.items()}
    with torch.no_grad():
        for name in names:
            assert torch.equal(model.get_submodule(name).weight, sparse.get_submodule(name).dense_weight())
    check_steps(Decoder(sparse, max_len=16), model, torch.tensor([4, 8, 15, 16, 23, 42]), prompt=2, atol=1e-5)


def test_reset_keeps_a_prefix_of_the_cache():
    model = model_for("llama-gqa-llama3-rope-biases")
    ids = torch.tensor([4, 8, 15, 16, 23, 42, 7])
    d = Decoder(model, max_len=16)
    full = d.step(ids, all_logits=True)
    d.reset(3)  # keep the first three positions, decode the rest again
    torch.testing.assert_close(d.step(ids[3:], all_logits=True), full[3:], atol=1e-5, rtol=0)
    d.reset(3)
    d.step(torch.tensor([9, 9]))  # a different continuation overwrites positions 3 and 4
    with pytest.raises(ValueError, match=r"position must be in \[0, 5\]"):
        d.reset(6)


def test_batched_generation_matches_transformers():
    model = model_for("qwen2-qkv-bias")
    ids = torch.randint(0, SMALL["vocab_size"], (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(model, ids, max_new_tokens=10, eos_token_id=-1), ref)


def test_a_batched_step_is_each_sequence_on_its_own():
    """Sequences at different positions (prompts of 2, 5 and 3 tokens), one token each in one call: each row's
    logits are those of that sequence decoded alone."""
    model = model_for("mistral-sliding-window")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, SMALL["vocab_size"], (n,), generator=g) for n in (2, 5, 3)]
    nxt = torch.randint(0, SMALL["vocab_size"], (3, 4), generator=g)
    batched = Decoder(model, max_len=16, batch=3)
    for b, p in enumerate(prompts):
        batched.step(p, seq=b)
    got = torch.stack([batched.step_batch(nxt[:, j]) for j in range(4)], dim=1)  # (3, 4, vocab)
    assert batched.positions == [6, 9, 7]
    for b, p in enumerate(prompts):
        alone = Decoder(model, max_len=16)
        alone.step(p)
        want = torch.stack([alone.step(nxt[b, j:j + 1]) for j in range(4)])
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


def test_finished_sequences_are_padded():
    model = model_for("llama-linear-rope-mha")
    ids = torch.tensor([[3, 4, 5], [7, 8, 9]])
    greedy = generate(model, ids, max_new_tokens=6, eos_token_id=-1)
    stop = int(greedy[0, 4])  # sequence 0's second new token ends it
    out = generate(model, ids, max_new_tokens=6, eos_token_id=stop, pad_token_id=0)
    first = greedy[0, 3:].tolist().index(stop)
    assert out[0, 3:3 + first + 1].tolist() == greedy[0, 3:3 + first + 1].tolist()
    assert set(out[0, 3 + first + 1:].tolist()) <= {0}
    row1 = greedy[1, 3:].tolist()
    if stop not in row1:
        assert out[1].tolist() == greedy[1].tolist()[:out.shape[1]]
