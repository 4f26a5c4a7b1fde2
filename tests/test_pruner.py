"""Pruner: masks worked out by hand, exact counts, masks hold under optimizers, state, finalize, errors."""
import warnings

import pytest
import torch
from torch import nn

from prune import Constant, CubicRamp, LinearRamp, Pruner, sparsity_report

# A 4x8 weight whose |W| order is easy to follow by hand.
W = torch.tensor([
    [0.1, -0.9, 0.3, 0.0, -0.5, 0.8, -0.2, 0.6],
    [-0.7, 0.4, 0.05, -1.0, 0.25, -0.15, 0.9, -0.35],
    [0.2, 0.2, -0.2, 0.2, 0.95, -0.45, 0.55, 0.02],
    [-0.65, 0.75, -0.85, 0.12, -0.01, 0.33, -0.44, 0.5],
])


def linear_with(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def as_bool(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_magnitude_layer_mask_by_hand():
    model = nn.Sequential(linear_with(W))
    pruner = Pruner(model, sparsity=0.5)  # one-shot at step 0: the 16 smallest |W| (all <= 0.35) go
    assert torch.equal(pruner.masks["0"], as_bool([
        [0, 1, 0, 0, 1, 1, 0, 1],
        [1, 1, 0, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 1, 1],
    ]))
    assert torch.equal(model[0].weight, torch.where(pruner.masks["0"], W, 0))


def test_magnitude_ties_by_hand():
    # 10 of 32: the seven values below 0.2, then 3 of the five 0.2s (flat indices 6, 16, 17, 18, 19);
    # ties keep the lower flat index, so 17, 18 and 19 go.
    pruner = Pruner(nn.Sequential(linear_with(W)), sparsity=10 / 32)
    pruned = (~pruner.masks["0"]).flatten().nonzero().flatten().tolist()
    assert pruned == sorted([3, 28, 23, 10, 0, 27, 13, 17, 18, 19])


def test_two_four_by_hand():
    pruner = Pruner(nn.Sequential(linear_with(W)), sparsity=0.5, pattern="2:4")
    assert torch.equal(pruner.masks["0"], as_bool([
        [0, 1, 1, 0, 0, 1, 0, 1],
        [1, 0, 0, 1, 0, 0, 1, 1],
        [1, 1, 0, 0, 1, 0, 1, 0],  # four tied 0.2s: the first two stay
        [0, 1, 1, 0, 0, 0, 1, 1],
    ]))


B = torch.tensor([[0.3, 0.01, 2.0, -0.22], [0.05, -0.6, 0.18, 0.4]])


def test_global_mask_by_hand():
    # 20 of 40 go: everything with |w| <= 0.33 across both layers (15 in the 4x8, 5 in the 2x4)
    model = nn.Sequential(linear_with(W), linear_with(B))
    pruner = Pruner(model, sparsity=0.5, scope="global")
    assert torch.equal(pruner.masks["1"], as_bool([[0, 0, 1, 0], [0, 1, 0, 1]]))
    assert int((~pruner.masks["0"]).sum()) == 15 and bool(pruner.masks["0"][1, 7])  # 0.35 survives


def test_global_cap_by_hand():
    # capped at 4 of 8 zeros, the 2x4 keeps 0.3; the 4x8 takes the remaining 16 (its 0.35 now goes)
    model = nn.Sequential(linear_with(W), linear_with(B))
    pruner = Pruner(model, sparsity=0.5, scope="global", max_layer_sparsity=0.5)
    assert torch.equal(pruner.masks["1"], as_bool([[1, 0, 1, 0], [0, 1, 0, 1]]))
    assert int((~pruner.masks["0"]).sum()) == 16 and not bool(pruner.masks["0"][1, 7])


def _movement_step(model, grad, pruner):
    (model[0].weight * grad).sum().backward()  # dL/dW' = grad
    pruner.step()
    model.zero_grad()


def test_movement_by_hand_with_regrowth():
    w = torch.ones(4, 8)
    w[:, 1::2] = -1.0  # alternating signs
    model = nn.Sequential(linear_with(w))
    pruner = Pruner(model, sparsity=LinearRamp(0.5, 0.5, begin_step=1, end_step=2), criterion="movement")
    assert pruner.masks["0"].all()
    top, bottom = slice(0, 2), slice(2, 4)
    g1 = torch.empty(4, 8)
    # each step adds -W*G + 3|W*G| (the default saliency 3): +1 + 3 on top rows, -1 + 3 on bottom rows
    g1[top], g1[bottom] = -w[top], w[bottom]
    _movement_step(model, g1, pruner)
    assert pruner.masks["0"][top].all() and not pruner.masks["0"][bottom].any()
    assert (model[0].weight[bottom] == 0).all()
    g2 = torch.empty(4, 8)
    g2[top], g2[bottom] = 3 * w[top], -3 * w[bottom]  # scores now 4 - 3 + 9 = 10 (top), 2 + 3 + 9 = 14 (bottom)
    _movement_step(model, g2, pruner)
    assert not pruner.masks["0"][top].any() and pruner.masks["0"][bottom].all()  # bottom rows regrew
    assert torch.equal(model[0].weight[bottom], w[bottom])  # with their dense values intact
    scores = pruner.state_dict()["scores"]["0"]
    assert torch.equal(scores, torch.tensor([[10.0] * 8] * 2 + [[14.0] * 8] * 2))


def test_movement_cannot_prune_at_step_zero():
    with pytest.raises(ValueError, match="cannot prune at step 0"):
        Pruner(nn.Sequential(nn.Linear(8, 8)), sparsity=0.5, criterion="movement")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adamw_decay": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("criterion", ["magnitude", "movement"])
@pytest.mark.parametrize("clip", [False, True])
def test_masks_hold_under_optimizers(opt_name, criterion, clip):
    model = _mlp()
    pruner = Pruner(model, sparsity=CubicRamp(0.0, 0.8, begin_step=2, end_step=10, every=2), criterion=criterion)
    opt = OPTIMIZERS[opt_name](model.parameters())
    seen = []
    hook = lambda mod, inp, out: seen.append(bool((mod.weight[~pruner.masks[name_of[mod]]] == 0).all()))
    name_of = {model[i]: str(i) for i in (0, 2, 4)}
    for i in (0, 2, 4):
        model[i].register_forward_hook(hook)
    for step in range(14):
        x = torch.randn(8, 16)
        model(x).pow(2).mean().backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        pruner.step()
        opt.zero_grad()
        for i in (0, 2, 4):
            w, m = model[i].weight, pruner.masks[str(i)]
            assert (w[~m] == 0).all() and torch.equal(w[m], model[i].parametrizations.weight.original[m])
            assert int((~m).sum()) == round(pruner.target_sparsity * m.numel()) or step < 2
    assert all(seen) and len(seen) == 3 * 14
    assert pruner.report().sparsity == pytest.approx(0.8, abs=1e-3)


def test_exact_counts_per_layer_every_update():
    model = _mlp()
    pruner = Pruner(model, sparsity=LinearRamp(0.1, 0.9, begin_step=0, end_step=8, every=1))
    for _ in range(10):
        pruner.step()
        for t in pruner.targets:
            assert int((~pruner.masks[t.name]).sum()) == round(pruner.target_sparsity * t.module.weight.numel())


def test_magnitude_never_regrows():
    model = _mlp()
    pruner = Pruner(model, sparsity=LinearRamp(0.0, 0.9, begin_step=0, end_step=6, every=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in pruner.masks.items()}
    for _ in range(8):
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
        for k, m in pruner.masks.items():
            assert not (m & ~before[k]).any()
            before[k] = m.clone()


def test_finalize_keys_values_and_outputs():
    model = _mlp()
    keys = list(model.state_dict())
    pruner = Pruner(model, sparsity=0.6)
    x = torch.randn(5, 16)
    with torch.no_grad():
        masked_out = model(x)
    masks = {k: v.clone() for k, v in pruner.masks.items()}
    out_model = pruner.finalize()
    assert out_model is model and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), masked_out)
    for i in (0, 2, 4):
        assert torch.equal(model[i].weight == 0, ~masks[str(i)])
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    with pytest.raises(RuntimeError, match=r"step\(\) called after finalize\(\)"):
        pruner.step()
    with pytest.raises(RuntimeError, match="after finalize"):
        pruner.finalize()


def test_state_round_trip_in_process():
    def run(steps, state=None, model_state=None, opt_state=None):
        model = _mlp()
        pruner = Pruner(model, sparsity=CubicRamp(0.0, 0.9, begin_step=1, end_step=12, every=3), criterion="movement")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        start = 0
        if state is not None:
            model.load_state_dict(model_state)
            opt.load_state_dict(opt_state)
            pruner.load_state_dict(state)
            start = pruner.step_count
        for step in range(start, steps):
            g = torch.Generator().manual_seed(step)
            model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
            opt.step()
            pruner.step()
            opt.zero_grad()
        return model, pruner, opt

    ref_model, ref_pruner, _ = run(16)
    m1, p1, o1 = run(7)
    saved = (p1.state_dict(), m1.state_dict(), o1.state_dict())
    m2, p2, _ = run(16, *saved)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    for k, v in ref_pruner.state_dict()["scores"].items():
        assert torch.equal(v, p2.state_dict()["scores"][k])


def test_load_state_dict_mismatches():
    state = Pruner(_mlp(), sparsity=0.5).state_dict()
    with pytest.raises(ValueError, match="saved pruner has scope='layer', this one has 'global'"):
        Pruner(_mlp(), sparsity=0.5, scope="global").load_state_dict(state)
    with pytest.raises(ValueError, match="saved schedule"):
        Pruner(_mlp(), sparsity=0.6).load_state_dict(state)
    with pytest.raises(ValueError, match="saved masks are for"):
        Pruner(_mlp(), sparsity=0.5, exclude=["4"]).load_state_dict(state)
    state["masks"]["0"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"saved mask of 0 is \(3, 3\)"):
        Pruner(_mlp(), sparsity=0.5).load_state_dict(state)


def test_targets_types_include_exclude():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    assert [t.name for t in Pruner(model, sparsity=0.5).targets] == ["1", "3"]
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    assert [t.name for t in Pruner(model, sparsity=0.5, exclude=["3"]).targets] == ["1"]
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    p = Pruner(model, sparsity=0.5, types=(nn.Embedding, nn.Linear), include=["0", "1"])
    assert [t.name for t in p.targets] == ["0", "1"]
    assert int((model[0].weight == 0).sum()) == 40 and (model[1].bias != 0).all()


def test_tied_weights_are_skipped():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    model[2].weight = model[0].weight
    with pytest.warns(UserWarning, match=r"not pruning 2.weight: it is shared with \['0.weight'\]"):
        pruner = Pruner(model, sparsity=0.5)
    assert [t.name for t in pruner.targets] == ["1"]


def test_zero_targets_say_why():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"no weight to prune.*the model has no module of the types to prune"):
        Pruner(model, sparsity=0.5)
    with pytest.raises(ValueError, match="include pattern 'encoder' matches no module"):
        Pruner(nn.Sequential(nn.Linear(4, 4)), sparsity=0.5, include=["encoder"])
    with pytest.warns(UserWarning, match="exclude pattern 'classifier' matches no module"):
        Pruner(nn.Sequential(nn.Linear(4, 4)), sparsity=0.5, exclude=["classifier"])


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(sparsity=1.0), ValueError, r"final sparsity must be a sparsity in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.2), ValueError, "got -0.2"),
    (dict(criterion="random"), ValueError, r"unknown criterion 'random'; choose one of \['magnitude', 'movement', 'obert', 'taylor', 'wanda'\]"),
    (dict(pattern="2:3:4"), ValueError, "unknown pattern '2:3:4'"),
    (dict(scope="model"), ValueError, r"unknown scope 'model'; choose one of \['layer', 'row', 'global'\]"),
    (dict(pattern="2:4", scope="global"), ValueError, "does not apply to N:M pattern 2:4"),
    (dict(pattern="2:4", sparsity=0.9), ValueError, "pattern 2:4 means sparsity 0.5"),
    (dict(max_layer_sparsity=0.9), ValueError, "only applies to scope='global'"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        Pruner(_mlp(), **{"sparsity": 0.5, **kwargs})


def test_nm_shape_error_names_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"layer '2' with weight shape \(4, 6\): its input size 6 is not a multiple of M=4"):
        Pruner(model, sparsity=0.5, pattern="2:4")


def test_nan_weights_raise_naming_the_layer():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '2': magnitude scores contain NaN"):
        Pruner(model, sparsity=0.5)


def test_inf_weight_is_kept_by_magnitude():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[3, 3] = float("inf")
    pruner = Pruner(model, sparsity=0.99)
    assert pruner.masks["0"][3, 3] and model[0].weight[3, 3] == float("inf")
    assert (model[0].weight[~pruner.masks["0"]] == 0).all()  # masked entries exactly 0, not inf*0


def test_report_and_standalone_report():
    model = _mlp()
    pruner = Pruner(model, sparsity=0.75, pattern="unstructured")
    rep = pruner.report()
    assert [r.name for r in rep.rows] == ["0", "2", "4"]
    assert [r.nnz for r in rep.rows] == [128, 256, 32]
    assert rep.sparsity == pytest.approx(0.75) and rep.numel == 512 + 1024 + 128
    text = str(rep)
    assert "layer" in text.splitlines()[0] and "total" in text.splitlines()[-1] and "0.7500" in text
    standalone = sparsity_report(pruner.finalize())
    assert [(r.name, r.nnz) for r in standalone.rows] == [(r.name, r.nnz) for r in rep.rows]


def test_standalone_report_detects_two_four():
    model = _mlp()
    Pruner(model, sparsity=0.5, pattern="2:4").finalize()
    assert {r.pattern for r in sparsity_report(model).rows} == {"2:4"}


def test_target_sparsity_property_and_constant():
    pruner = Pruner(_mlp(), sparsity=Constant(0.5, begin_step=3))
    assert pruner.target_sparsity == 0.0 and all(m.all() for m in pruner.masks.values())
    for _ in range(3):
        pruner.step()
    assert pruner.step_count == 3 and pruner.target_sparsity == 0.5
    assert pruner.report().sparsity == pytest.approx(0.5)


def test_warning_free_on_plain_model():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = Pruner(_mlp(), sparsity=0.5)
    assert [str(w.message) for w in caught] == [] and pruner.report().sparsity == pytest.approx(0.5)


def test_dtype_and_device_moves_keep_mask_and_score_types():
    model = _mlp()
    pruner = Pruner(model, sparsity=Constant(0.5, begin_step=1), criterion="movement")
    model.double()
    model(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
    pruner.step()
    state = pruner.state_dict()
    assert all(m.dtype == torch.bool for m in state["masks"].values())
    assert all(s.dtype == torch.float32 and s.abs().sum() > 0 for s in state["scores"].values())
    assert model[0].weight.dtype == torch.float64 and int((model[0].weight == 0).sum()) == 256


def _bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100)
    return BertForSequenceClassification(config)


def _pruned(pruner):
    return {t.name for t in pruner.targets}


def test_a_module_name_covers_its_subtree_as_users_write_it():
    model = _bert_classifier()
    everything = _pruned(Pruner(_bert_classifier(), sparsity=0.5))
    assert "bert.pooler.dense" in everything
    assert not any("pooler" in n for n in _pruned(Pruner(model, sparsity=0.5, exclude=["pooler"])))
    no_attention = _pruned(Pruner(_bert_classifier(), sparsity=0.5, exclude=["attention"]))
    assert no_attention and not any(".attention." in n for n in no_attention)
    encoder = _pruned(Pruner(_bert_classifier(), sparsity=0.5, include=["encoder"]))
    assert encoder == {n for n in everything if n.startswith("bert.encoder.")} and len(encoder) == 12


def test_a_string_is_one_pattern():
    kept = _pruned(Pruner(_bert_classifier(), sparsity=0.5, exclude="classifier"))  # not c, l, a, s, ...
    assert "classifier" not in kept and "bert.pooler.dense" in kept
    assert _pruned(Pruner(_bert_classifier(), sparsity=0.5, include="pooler")) == {"bert.pooler.dense"}


def test_an_empty_selection_is_a_short_error_with_the_fix():
    with pytest.raises(ValueError) as e:
        Pruner(_bert_classifier(), sparsity=0.5, include=["encoder"], exclude=["layer"])
    msg = str(e.value)
    assert len(msg) < 600 and "covers the module's subtree" in msg and "bert.encoder.layer.0.attention.self.query" in msg
    with pytest.raises(TypeError, match="include must be a module name pattern or a list of them"):
        Pruner(_bert_classifier(), sparsity=0.5, include=[3])


def test_save_pretrained_under_a_pruner_saves_the_masked_weights_under_their_keys(tmp_path):
    from transformers import BertModel

    model = _bert_classifier()
    pruner = Pruner(model, sparsity=0.75, include=["encoder"])
    masked = {k: v.clone() for k, v in pruner.masked_state_dict().items()}
    model.save_pretrained(tmp_path / "mid")
    loaded = BertModel.from_pretrained(tmp_path / "mid")  # a plain model: no parametrizations, no lost masks
    q = loaded.encoder.layer[0].attention.self.query.weight
    assert torch.equal(q, masked["bert.encoder.layer.0.attention.self.query.weight"])
    assert float((q == 0).float().mean()) == 0.75
    pruner.finalize()
    assert "save_pretrained" not in vars(model)  # the class's method again
    assert all(torch.equal(v, masked[k]) for k, v in model.state_dict().items())
