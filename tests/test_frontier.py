"""The frontier's engine (Pareto front, fastest at a bar: worked by hand, both quality directions, ties) and
benchmarks/frontier.py's head removal (equal to zeroing the removed heads' context, heads chosen by importance)."""
import pytest
import torch

from sparse_ops.bench.frontier import Panel, Variant, dominates, fastest_at, pareto, plot_frontier

V = [Variant("a", 1.0, 0.50), Variant("b", 2.0, 0.90), Variant("c", 2.0, 0.80), Variant("d", 3.0, 0.90),
     Variant("e", 4.0, 0.99), Variant("f", 0.5, 0.10)]


def test_pareto_front_by_hand():
    assert [v.name for v in pareto(V)] == ["f", "a", "b", "e"]  # c: b is as fast and better; d: b is faster
    assert dominates(V[1], V[2]) and dominates(V[1], V[3]) and not dominates(V[1], V[4])
    assert not dominates(V[1], V[1])  # equal is not better
    twins = [Variant("x", 1.0, 0.5), Variant("y", 1.0, 0.5)]
    assert [v.name for v in pareto(twins)] == ["x", "y"]  # neither beats the other


def test_lower_is_better_quality_and_fastest_at_a_bar():
    ppl = [Variant("fp32", 20.0, 35.3), Variant("q8", 10.0, 35.4), Variant("q4", 8.0, 44.4), Variant("s70", 7.0, 400.0)]
    assert [v.name for v in pareto(ppl, higher_quality=False)] == ["s70", "q4", "q8", "fp32"]
    assert fastest_at(ppl, 36.0, higher_quality=False).name == "q8"
    assert fastest_at(V, 0.9).name == "b" and fastest_at(V, 0.95).name == "e" and fastest_at(V, 0.999) is None
    assert fastest_at(V, 0.5).name == "a"  # the bar itself counts


def test_plot_writes_a_png(tmp_path):
    plot_frontier({"m": Panel(tuple(V), "ms", "cosine", bars={"bar": 0.95}),
                   "n": Panel(tuple(V), "ms", "ppl", higher_quality=False, log_y=True)}, tmp_path / "f.png", "t")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_drop_heads_equals_zeroing_their_context_and_keeps_the_most_important():
    transformers = pytest.importorskip("transformers")
    from benchmarks.frontier import drop_heads, head_importance

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=16)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batches = [torch.stack([ids, mask])]
    score = head_importance(model, batches)
    assert score.shape == (2, 4) and bool((score > 0).all())
    dropped = [set(s.argsort()[:2].tolist()) for s in score]  # the two least important heads per layer

    def zero_heads(layer_dropped):  # the reference: the full model with those heads' context zeroed
        def pre(module, args):
            ctx = args[0].clone().reshape(*args[0].shape[:-1], 4, 8)
            ctx[..., sorted(layer_dropped), :] = 0
            return (ctx.reshape(args[0].shape),)
        return pre

    hooks = [layer.attention.output.dense.register_forward_pre_hook(zero_heads(d))
             for layer, d in zip(model.encoder.layer, dropped)]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for h in hooks:
        h.remove()
    small = drop_heads(model, 2, batches)
    assert [layer.attention.self.query.out_features for layer in small.encoder.layer] == [16, 16]
    assert [layer.attention.output.dense.in_features for layer in small.encoder.layer] == [16, 16]
    with torch.no_grad():
        got = small(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
