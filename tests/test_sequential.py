"""The layer-sequential calibration runner (prune.one_shot.sequential) on tiny Hugging Face models of each family."""
import pytest
import torch
from torch import nn

from prune.one_shot.sequential import block_linears, find_blocks, iter_blocks

transformers = pytest.importorskip("transformers")

VOCAB = 100


def _config(family, **over):
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    configs = {
        "llama": lambda: t.LlamaConfig(**common, num_key_value_heads=2),
        "mistral": lambda: t.MistralConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: t.Qwen2Config(**common, num_key_value_heads=2),
        "gpt2": lambda: t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0),
        "opt": lambda: t.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
        "phi": lambda: t.PhiConfig(**common),
        "bert": lambda: t.BertConfig(**common),
    }
    config = configs[family]()
    for k, v in over.items():
        setattr(config, k, v)
    return config


# model name -> (family, model class, path of the blocks)
MODELS = {
    "LlamaForCausalLM": ("llama", "model.layers"),
    "MistralForCausalLM": ("mistral", "model.layers"),
    "Qwen2ForCausalLM": ("qwen2", "model.layers"),
    "GPT2LMHeadModel": ("gpt2", "transformer.h"),
    "OPTForCausalLM": ("opt", "model.decoder.layers"),
    "PhiForCausalLM": ("phi", "model.layers"),
    "BertModel": ("bert", "encoder.layer"),
    "BertForMaskedLM": ("bert", "bert.encoder.layer"),
}


def make(name, **over):
    family, _ = MODELS[name]
    torch.manual_seed(0)
    return getattr(transformers, name)(_config(family, **over)).eval()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 12), generator=g), torch.randint(0, VOCAB, (3, 8), generator=g)]


def reference(model, layer, ids, mask=None, pre=False):
    """``layer``'s input (pre) or output in a normal forward of ``model`` on ``ids``."""
    seen = []
    if pre:
        handle = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else
                                                                                      kwargs["hidden_states"]),
                                                 with_kwargs=True)
    else:
        handle = layer.register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple)
                                                                              else out))
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def last_outputs(model, data, **kw):
    """The last block's outputs for each batch, as the runner computes them (nothing pruned)."""
    n = len(find_blocks(model).layers)
    outs = []

    for block in iter_blocks(model, data, progress=False, **kw):
        if block.index == n - 1:
            h = block.module.register_forward_hook(
                lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
            try:
                block.run()
            finally:
                h.remove()
        block.advance()
    return outs


def hook_state(model):
    return {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}


# 1. finding the blocks

@pytest.mark.parametrize("name", list(MODELS))
def test_find_blocks(name):
    model = make(name)
    blocks = find_blocks(model)
    family, path = MODELS[name]
    assert blocks.path == path
    assert len(blocks.layers) == 2
    assert blocks.layers is model.get_submodule(path)
    assert blocks.family == family


def test_find_blocks_rejects_models_without_blocks():
    with pytest.raises(ValueError, match=r"Sequential has no repeated transformer blocks.*Llama"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))


def test_find_blocks_rejects_ambiguous_models():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([Block(), Block()])
            self.decoder = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match=r"TwoStacks are ambiguous: encoder, decoder"):
        find_blocks(TwoStacks())


def test_find_blocks_prefers_the_outer_list():
    """A ModuleList inside each block (experts) is longer than the list of blocks, but the blocks are the outer one."""
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(8)])

    model = nn.Module()
    model.layers = nn.ModuleList([Experts(), Experts()])
    blocks = find_blocks(model)
    assert (blocks.path, len(blocks.layers), blocks.family) == ("layers", 2, "module")


def test_block_linears():
    llama = find_blocks(make("LlamaForCausalLM")).layers[0]
    assert sorted(block_linears(llama)) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    gpt2 = find_blocks(make("GPT2LMHeadModel")).layers[1]
    assert sorted(block_linears(gpt2)) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert block_linears(gpt2)["mlp.c_fc"] is gpt2.mlp.c_fc


# 2. nothing pruned: the runner's last hidden states are the model's own

@pytest.mark.parametrize("name", list(MODELS))
def test_unpruned_run_matches_the_model(name):
    model = make(name)
    data = batches()
    outs = last_outputs(model, data)
    last = find_blocks(model).layers[-1]
    assert [o.shape for o in outs] == [(2, 12, 32), (3, 8, 32)]
    for ids, out in zip(data, outs):
        torch.testing.assert_close(out, reference(model, last, ids), rtol=1e-6, atol=1e-6)


# 3. sequential semantics: block 1 sees the outputs of the modified block 0

@pytest.mark.parametrize("name", ["LlamaForCausalLM", "GPT2LMHeadModel", "BertForMaskedLM"])
def test_block_inputs_follow_earlier_pruning(name):
    model = make(name)
    data = batches()
    layers = find_blocks(model).layers
    before = [reference(model, layers[1], ids, pre=True) for ids in data]
    seen = []

    for block in iter_blocks(model, data, progress=False):
        if block.index == 0:
            with torch.no_grad():
                for lin in block_linears(block.module).values():
                    lin.weight.zero_()
        else:
            h = block.module.register_forward_pre_hook(
                lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]), with_kwargs=True)
            try:
                block.run()
            finally:
                h.remove()
        # no advance(): the iterator advances the block when the body did not
    assert all(bool((lin.weight == 0).all()) for lin in block_linears(layers[0]).values())
    assert len(seen) == 2
    for ids, got, old in zip(data, seen, before):
        want = reference(model, layers[1], ids, pre=True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert (want - old).abs().max() > 1e-3  # zeroing block 0 did change block 1's inputs


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, hidden_states, scale=1.0):
        return torch.tanh(self.fc(hidden_states)) * scale, None  # a tuple, as older transformers blocks return


class ToyModel(nn.Module):
    """Not a transformers model: blocks called with the hidden states as a keyword, returning tuples."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList([ToyBlock() for _ in range(3)])

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(hidden_states=h, scale=0.5)[0]
        return h


def test_generic_model_with_keyword_hidden_states():
    model = ToyModel()
    blocks = find_blocks(model)
    assert (blocks.path, len(blocks.layers), blocks.family) == ("layers", 3, "toymodel")
    data = batches()
    outs = last_outputs(model, data)
    for ids, out in zip(data, outs):
        with torch.no_grad():
            torch.testing.assert_close(out, model(ids), rtol=1e-6, atol=1e-6)


def test_embedding_stage_covers_everything_but_the_blocks():
    """What ``device`` moves for the capture: every tensor of the model outside the blocks, each once."""
    from prune.one_shot.sequential import _outside

    model = make("OPTForCausalLM")
    blocks = find_blocks(model)
    inside = {id(t) for t in [*blocks.layers.parameters(), *blocks.layers.buffers()]}
    outside = []
    for unit, recurse in _outside(model, blocks.path):
        outside += [*unit.parameters(recurse=recurse), *unit.buffers(recurse=recurse)]
    every = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert {id(t) for t in outside} == every - inside
    assert not inside & {id(t) for t in outside}


# 4. order, names, repeated run(), run(until=, count=), advance()

def test_blocks_in_order_and_run_repeats():
    model = make("OPTForCausalLM", num_hidden_layers=3)
    data = batches()
    calls, rows = [], {}

    for block in iter_blocks(model, data, progress=False):
        name = block.name
        calls.append((block.index, name, block.module))
        q = block.module.self_attn.q_proj
        h = q.register_forward_pre_hook(lambda m, a: rows.__setitem__(name, rows.get(name, 0) + a[0][..., 0].numel()))
        try:
            block.run()
            block.run()
        finally:
            h.remove()
        block.advance()
    layers = model.model.decoder.layers
    assert [(i, n) for i, n, _ in calls] == [(i, f"model.decoder.layers.{i}") for i in range(3)]
    assert all(b is layers[i] for i, _, b in calls)
    assert rows == {f"model.decoder.layers.{i}": 2 * (2 * 12 + 3 * 8) for i in range(3)}


def test_run_until_and_count_then_advance_once():
    model = make("LlamaForCausalLM")
    reached = {"q": 0, "gate": 0, "down": 0}
    block = next(iter_blocks(model, batches(), progress=False))
    attn, mlp = block.module.self_attn, block.module.mlp
    hooks = [m.register_forward_pre_hook(lambda m_, a, key=key: reached.__setitem__(key, reached[key] + 1))
             for key, m in (("q", attn.q_proj), ("gate", mlp.gate_proj), ("down", mlp.down_proj))]
    block.run(until=attn.o_proj)  # each input's pass stops before o_proj
    assert reached == {"q": 2, "gate": 0, "down": 0}
    assert not attn.o_proj._forward_pre_hooks  # run's stop hook is gone
    block.run(count=1)
    assert reached == {"q": 3, "gate": 1, "down": 1}
    for h in hooks:
        h.remove()
    block.advance()
    block.advance()  # once only
    with pytest.raises(RuntimeError, match="was advanced"):
        block.run()


def test_progress_bar(capsys):
    model = make("LlamaForCausalLM")
    for _ in iter_blocks(model, batches()[:1], progress=True):
        pass
    assert "2/2" in capsys.readouterr().err


# 5. no hooks left behind, training flags restored

def test_no_hooks_left_and_training_restored():
    model = make("LlamaForCausalLM")
    model.train()
    model.model.embed_tokens.eval()  # a mixed state, restored as it was
    flags = {n: m.training for n, m in model.named_modules()}
    state = hook_state(model)
    modes = []

    for block in iter_blocks(model, batches(), progress=False):
        modes.append(block.module.training)
        block.run()
        block.advance()
    assert modes == [False, False]  # eval during the run
    assert hook_state(model) == state
    assert {n: m.training for n, m in model.named_modules()} == flags

    with pytest.raises(RuntimeError, match="boom"):
        for block in iter_blocks(model, batches(), progress=False):
            if block.index == 1:
                block.module.mlp.register_forward_hook(lambda *a: None)  # left behind by the failing loop body
                block.run()
                raise RuntimeError("boom")
    assert hook_state(model) == state
    assert {n: m.training for n, m in model.named_modules()} == flags

    for block in iter_blocks(model, batches(), progress=False):  # a loop broken off: the same clean-up
        block.module.mlp.register_forward_hook(lambda *a: None)
        break
    assert hook_state(model) == state
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_mixed_layer_types_are_not_supported():
    model = make("Qwen2ForCausalLM")
    model.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        next(iter_blocks(model, batches(), progress=False))


def test_forward_that_never_reaches_the_blocks():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, ids):
            return ids

    model = Skips()
    state = hook_state(model)
    with pytest.raises(RuntimeError, match="did not reach its first block layers.0"):
        next(iter_blocks(model, [torch.zeros(1, 4, dtype=torch.long)], progress=False))
    assert hook_state(model) == state


# 6. padded batches

@pytest.mark.parametrize("name,left", [("LlamaForCausalLM", True), ("BertModel", False)])
def test_padded_batches(name, left):
    model = make(name)
    data = batches()
    masks = [torch.ones_like(ids) for ids in data]
    for mask in masks:
        pad = torch.arange(mask.shape[1])
        pad = pad < 3 if left else pad >= mask.shape[1] - 3
        mask[0, pad] = 0  # the first sequence of each batch is padded by 3
    outs = last_outputs(model, data, attention_mask=masks)
    last = find_blocks(model).layers[-1]
    for ids, mask, out in zip(data, masks, outs):
        want = reference(model, last, ids, mask)
        keep = mask.bool()
        torch.testing.assert_close(out[keep], want[keep], rtol=1e-6, atol=1e-6)
        unmasked = reference(model, last, ids)
        assert (unmasked[0][keep[0]] - want[0][keep[0]]).abs().max() > 1e-4  # the mask mattered


# device: a CPU model computed block by block on the GPU

@pytest.mark.cuda
def test_cpu_model_on_cuda():
    model = make("LlamaForCausalLM")
    data = batches()
    last = find_blocks(model).layers[-1]
    want = [reference(model, last, ids) for ids in data]
    devices = []

    outs = []
    for block in iter_blocks(model, data, device="cuda", progress=False):
        devices.append(next(block.module.parameters()).device.type)
        if block.index == 1:
            h = block.module.register_forward_hook(lambda m, a, out: outs.append(out))
            block.run()
            h.remove()
        block.advance()
    assert devices == ["cuda", "cuda"]
    assert all(o.device.type == "cuda" for o in outs)
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    for got, w in zip(outs, want):
        torch.testing.assert_close(got.cpu(), w, rtol=1e-4, atol=1e-4)
