"""One-shot pruning end to end on tiny Hugging Face models built here: exact sparsities and patterns, masks
worked out from the inputs the pruned predecessors give each block, OWL's profile, errors, the CLI's folders,
and the way to speed: one-shot -> convert -> sparse load -> generate() gives the pruned model's tokens."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from prune import oneshot
from prune.calibration import InputStats
from prune.criteria import CRITERIA, Evidence
from prune.masks import row_mask
from tests.test_oneshot_data import VOCAB, word_tokenizer, words

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 2, vocab: int = 64):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2))
    if family == "opt":
        return transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64,
                                                                 num_hidden_layers=2, num_attention_heads=2,
                                                                 word_embed_proj_dim=32))
    if family == "bert":
        return transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=2, intermediate_size=64))
    return tiny_llama()


CALIB = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))


def block_weights(model):
    return {n: m.weight for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_method_reaches_its_sparsity_and_pattern(method, pattern):
    model, report = oneshot(tiny_llama(), CALIB, method=method, sparsity=0.5 if pattern == "unstructured" else None,
                            pattern=pattern, progress=False)
    weights = block_weights(model)
    assert len(report.layers) == len(weights) == 14 and report.left_dense == ("lm_head",)
    for r in report.layers:
        w = weights[r.name]
        assert r.sparsity == 0.5 == float((w == 0).float().mean()), r.name
        assert r.error is not None and 0 < r.error < 1
        if pattern == "2:4":
            assert int(((w != 0).reshape(-1, 4).sum(1) > 2).sum()) == 0
        elif method == "wanda":  # compared within each output row
            assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()


def test_sparsegpt_reconstructs_better_than_magnitude():
    errors = {m: [r.error for r in oneshot(tiny_llama(), CALIB, method=m, sparsity=0.6, progress=False)[1].layers]
              for m in ("sparsegpt", "magnitude")}
    # random weights and near-isotropic inputs leave the OBS update little to fix (a pretrained model has more):
    # lower on every layer, by about 13% here
    assert all(a < b for a, b in zip(errors["sparsegpt"], errors["magnitude"]))
    assert sum(errors["sparsegpt"]) < 0.92 * sum(errors["magnitude"])


def test_each_block_is_pruned_on_the_inputs_of_the_pruned_blocks_before_it():
    model, _ = oneshot(tiny_llama(), CALIB, method="wanda", sparsity=0.5, progress=False)
    stats = InputStats(32)  # block 1's q_proj input, in the pruned model: what the runner must have seen
    handle = stats.attach(model.model.layers[1].self_attn.q_proj)
    with torch.no_grad():
        model(CALIB, use_cache=False)
    handle.remove()
    q = model.model.layers[1].self_attn.q_proj.weight
    fresh = tiny_llama().model.layers[1].self_attn.q_proj.weight  # the dense weight before pruning
    scores = CRITERIA["wanda"].score(fresh, Evidence(inputs=stats))
    assert torch.equal(q != 0, row_mask(scores, 0.5))


def test_owl_varies_block_sparsity_around_the_mean():
    _, report = oneshot(tiny_llama(layers=4), CALIB, method="wanda", sparsity=0.6, profile="owl", owl_lambda=0.05,
                        progress=False)
    per_block = {}
    for r in report.layers:
        per_block.setdefault(r.name.split(".")[2], set()).add(r.target)
    targets = [t.pop() for t in per_block.values()]
    assert max(targets) - min(targets) == pytest.approx(2 * 0.05)  # the outlier ratios spread over 2 lambda
    assert sum(targets) / len(targets) == pytest.approx(0.6)
    _, flat = oneshot(tiny_llama(layers=4), CALIB, method="wanda", sparsity=0.6, profile="owl", owl_lambda=0.0,
                      progress=False)
    assert [r.target for r in flat.layers] == pytest.approx([0.6] * len(flat.layers))


@pytest.mark.parametrize("family", ["gpt2", "opt", "bert"])
def test_other_families(family):
    model, report = oneshot(tiny(family), CALIB, method="sparsegpt", sparsity=0.5, progress=False)
    assert report.layers and all(r.sparsity == 0.5 for r in report.layers)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="obs"), "unknown method 'obs'; choose one of"),
    (dict(pattern="2:4", sparsity=0.7), "pattern 2:4 means sparsity 0.5"),
    (dict(pattern="2:4", profile="owl"), "profile 'owl' varies sparsity per block"),
    (dict(scope="row"), "scope 'row' does not apply to method 'sparsegpt'"),
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(include="lm_head"), "no selected linear layer lies inside the blocks"),
])
def test_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        oneshot(tiny_llama(), CALIB, progress=False, **kwargs)
    with pytest.raises(ValueError, match="no transformer blocks|blocks"):
        oneshot(nn.Sequential(nn.Linear(4, 4)), CALIB, progress=False)


def test_oneshot_convert_load_generate_same_tokens(tmp_path):
    from sparse_ops import convert_checkpoint, from_pretrained

    model, _ = oneshot(tiny_llama(vocab=VOCAB), CALIB % VOCAB, method="sparsegpt", sparsity=0.7, progress=False)
    model.save_pretrained(tmp_path / "pruned")
    convert_checkpoint(tmp_path / "pruned", tmp_path / "sparse", format="csr")
    sparse = from_pretrained(tmp_path / "sparse", fuse=True)
    assert sum(type(m).__name__ == "SparseLinear" for m in sparse.modules()) == 14
    prompt = torch.tensor([[5, 9, 17, 3]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(sparse.generate(prompt, **kw), model.generate(prompt, **kw))


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "prune", *map(str, args)], capture_output=True, text=True, env=env)


def dense_folder_and_text(tmp_path):
    """tmp_path/dense (a tiny Llama and its tokenizer) and tmp_path/calib.txt (text in its vocabulary)."""
    model, tok = tiny_llama(vocab=VOCAB), word_tokenizer()
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(words(i % 90, i % 90 + 10) for i in range(60)))
    return text


def test_cli_oneshot_and_eval(tmp_path, capsys):
    """``python -m prune oneshot`` once as a user runs it (a fresh process); the refusals and ``prune eval``
    in process (``prune.cli.main``: the same code, without a fresh interpreter's imports each)."""
    from prune.cli import main

    def cli(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    text = dense_folder_and_text(tmp_path)
    out = tmp_path / "pruned"
    args = ["oneshot", tmp_path / "dense", "-o", out, "--method", "wanda", "--calibration", text, "--samples", 4,
            "--seq-len", 32, "--exclude", "mlp.down_proj"]
    done = _run_cli(*args)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "oneshot_report.json").read_text())
    assert len(report["layers"]) == 12 and report["sparsity"] == 0.5  # 7 per block, down_proj excluded
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    code, _, err = cli(*args)  # an existing output is refused, and nothing is left beside it
    assert code == 2 and "exists; pass --overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "dense", "pruned"]
    code, _, err = cli(*args[:3], tmp_path / "other", "--method", "obs", *args[6:])
    assert code == 2 and err.count("\n") == 1 and "unknown method 'obs'" in err
    assert not (tmp_path / "other").exists()
    for folder in ("dense", "pruned"):
        code, stdout, err = cli("eval", tmp_path / folder, "--text", text, "--seq-len", 32)
        assert code == 0 and stdout.startswith("perplexity "), err


def test_cli_bad_inputs_one_line_and_nothing_written(tmp_path, capsys):
    """In process (``prune.cli.main``): each case would cost a fresh interpreter's imports otherwise;
    ``test_cli_oneshot_and_eval`` checks the same one-line contract through ``python -m prune``."""
    from prune.cli import main

    def cli(*args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    tiny_llama(vocab=VOCAB).save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "calib.txt").write_text(words(0, 200))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"],
                                                              "model_type": "llama"}))
    out = tmp_path / "out"
    cases = {  # model folder, calibration, extra arguments -> what the one line says
        "no such": (tmp_path / "missing", "calib.txt", []),
        "no text in the file": (tmp_path / "dense", "empty.txt", []),
        "unknown architecture 'NoSuchModel'": (tmp_path / "odd", "calib.txt", []),
        r"sparsity must be in [0, 1), got 1.5": (tmp_path / "dense", "calib.txt", ["--sparsity", "1.5"]),
        "tokens": (tmp_path / "dense", "calib.txt", ["--seq-len", "4096"]),  # a stream too short for one window
    }
    headless = tmp_path / "headless"  # "architectures": null would save the base model without its head
    tiny_llama(vocab=VOCAB).save_pretrained(headless)
    config = json.loads((headless / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**config, "architectures": None}))
    cases["names no model class"] = (headless, "calib.txt", [])
    cases["is a folder"] = (tmp_path / "dense", "odd", [])
    cases["damp must be >= 0"] = (tmp_path / "dense", "calib.txt", ["--damp", "-1"])
    cases["longer than the 2048 positions"] = (tmp_path / "dense", "long.txt", ["--seq-len", "4096", "--samples", "1"])
    (tmp_path / "long.txt").write_text(" ".join(words(0, 200) for _ in range(25)))
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # what setting up the folders printed
    for expect, (folder, calib, extra) in cases.items():
        code, err = cli("oneshot", folder, "-o", out, "--calibration", tmp_path / calib, *extra)
        assert code == 2 and err.count("\n") == 1 and expect in err, (expect, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    evals = {  # prune eval: model folder, text, extra arguments -> the one line
        "no such model folder": (tmp_path / "missing", "calib.txt", []),
        "is a folder": (tmp_path / "dense", "odd", []),
        "longer than the 2048 positions": (tmp_path / "dense", "calib.txt", ["--seq-len", "4096"]),
    }
    for expect, (folder, text, extra) in evals.items():
        code, err = cli("eval", folder, "--text", tmp_path / text, *extra)
        assert code == 2 and err.count("\n") == 1 and expect in err, (expect, err)


def test_calibration_that_cannot_fit_in_memory_is_refused_before_work(monkeypatch):
    from prune.one_shot import data

    monkeypatch.setattr(data, "available_memory", lambda: 20_000)  # bytes; 8 windows x 16 tokens x 32 x 4 x 2 = 32 KiB
    with pytest.raises(ValueError, match="8 calibration windows of 16 tokens keep 0.0 GiB .* use at most 3 samples"):
        oneshot(tiny_llama(), CALIB, progress=False)


def test_layers_reading_one_tensor_share_their_statistics():
    from prune.one_shot.run import _collect
    from prune.one_shot.sequential import CalibrationBlock, block_linears

    model = tiny_llama()
    block = model.model.layers[0]
    layers = {f"b.{k}": m for k, m in block_linears(block).items()}
    x = torch.randn(2, 6, 32)
    kwargs = dict(attention_mask=None, position_embeddings=model.model.rotary_emb(x, torch.arange(6)[None]))
    calibration = CalibrationBlock(0, "b", block, [((x,), kwargs)] * 2)
    stats = _collect(layers, calibration, gram=True)
    q, k, v = (stats[f"b.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v and stats["b.mlp.gate_proj"] is stats["b.mlp.up_proj"]
    assert stats["b.self_attn.o_proj"] is not q and stats["b.mlp.down_proj"] is not q
    separate = InputStats(32, gram=True)  # the same numbers as a hook of its own would collect
    handle = separate.attach(block.self_attn.k_proj)
    calibration.run()
    handle.remove()
    assert q.rows == separate.rows == 24
    torch.testing.assert_close(q.gram, separate.gram, rtol=0, atol=0)


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_stages_see_their_pruned_predecessors(sequential):
    """With ``sequential=True`` each stage of a block (q/k/v, o, gate/up, down) is pruned from the inputs the
    block gives once its earlier stages are pruned; without it, every linear from the dense block's inputs.
    Checked on down_proj, the last stage: its Wanda row mask is recomputed from its inputs in the model whose
    other linears are as the run left them (sequential) or all dense (one pass)."""
    dense = tiny_llama(layers=1)
    original = dense.model.layers[0].mlp.down_proj.weight.detach().clone()
    model, _ = oneshot(tiny_llama(layers=1), CALIB, method="wanda", sparsity=0.5, sequential=sequential,
                       progress=False)
    probe = model if sequential else dense
    down = probe.model.layers[0].mlp.down_proj
    pruned = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        down.weight.copy_(original)  # down_proj dense again: its input does not depend on its own weight
        stats = InputStats(down.in_features)
        handle = stats.attach(down)
        probe(CALIB)
        handle.remove()
    scores = CRITERIA["wanda"].score(original, Evidence(inputs=stats))
    assert torch.equal(pruned != 0, row_mask(scores, 0.5))
    # and the two settings do differ here: the sequential run saw other inputs
    other, _ = oneshot(tiny_llama(layers=1), CALIB, method="wanda", sparsity=0.5, sequential=not sequential,
                       progress=False)
    assert not torch.equal(other.model.layers[0].mlp.down_proj.weight != 0, pruned != 0)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_int8_oneshot_leaves_weights_on_their_grids_and_converts_exactly(tmp_path, method):
    from sparse_ops import convert_checkpoint, load_sparse_state_dict

    model, report = oneshot(tiny_llama(), CALIB, method=method, sparsity=0.5, bits=8, progress=False)
    weights = block_weights(model)
    assert set(report.scales) == {f"{n}.weight" for n in weights} and report.to_dict()["bits"] == 8
    for name, w in weights.items():
        codes = w / report.scales[f"{name}.weight"][:, None]
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        assert float((w == 0).float().mean()) >= 0.5
    model.save_pretrained(tmp_path / "pruned")
    convert_checkpoint(tmp_path / "pruned", tmp_path / "int8", format="auto", quantize="int8", scales=report.scales)
    stored = load_sparse_state_dict(tmp_path / "int8")
    for name, w in weights.items():  # the int8 file holds exactly the one-shot model's weights
        torch.testing.assert_close(stored[f"{name}.weight"].to_dense(), w.detach(), rtol=0, atol=0)
    assert stored["lm_head.weight"].format == "dense-int8"  # not pruned, quantized too (absmax)


def test_cli_oneshot_bits_8_writes_an_int8_checkpoint_eval_reads(tmp_path, capsys):
    """In process (``prune.cli.main``); ``test_cli_oneshot_and_eval`` runs ``python -m prune`` itself."""
    from prune.cli import main

    def cli(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    text = dense_folder_and_text(tmp_path)
    code, _, err = cli("oneshot", tmp_path / "dense", "-o", tmp_path / "int8", "--calibration", text, "--samples", 4,
                       "--seq-len", 32, "--bits", "8")
    assert code == 0, err
    assert json.loads((tmp_path / "int8" / "oneshot_report.json").read_text())["bits"] == 8
    _, shown, _ = cli("inspect", tmp_path / "int8")
    assert "bitmap-int8" in shown and "dense-int8" in shown  # 50% blocks, the dense lm_head
    code, stdout, err = cli("eval", tmp_path / "int8", "--text", text, "--seq-len", 32)
    assert code == 0 and stdout.startswith("perplexity "), err
    with pytest.raises(SystemExit) as refused:  # argparse: its usage and the bad choice, exit 2
        cli("oneshot", tmp_path / "dense", "-o", tmp_path / "x", "--calibration", text, "--bits", "4")
    assert refused.value.code == 2 and "invalid choice: 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_oneshot_recipe_table_and_flags_over_it(tmp_path, capsys):
    """``prune oneshot --recipe``: the recipe's ``oneshot`` table is a OneShotConfig, each flag given overrides
    its field; a recipe without the table, or with a key that is no field, is one line naming the problem."""
    from prune.cli import main

    text = dense_folder_and_text(tmp_path)
    recipe = tmp_path / "run.yaml"
    recipe.write_text("oneshot:\n  method: wanda\n  sparsity: 0.6\n  samples: 4\n  seq_len: 32\n"
                      "  exclude: [mlp.down_proj]\n")
    out = tmp_path / "pruned"
    assert main(["oneshot", str(tmp_path / "dense"), "-o", str(out), "--calibration", str(text),
                 "--recipe", str(recipe), "--sparsity", "0.5"]) == 0
    report = json.loads((out / "oneshot_report.json").read_text())
    assert (report["method"], report["target"], len(report["layers"])) == ("wanda", 0.5, 12)
    capsys.readouterr()
    for content, expect in [("schedule: {kind: Constant, final: 0.5}\n", "has no 'oneshot' table"),
                            ("oneshot: {method: wanda, samples_: 4}\n", "'oneshot.samples_': not a one-shot setting")]:
        recipe.write_text(content)
        code = main(["oneshot", str(tmp_path / "dense"), "-o", str(tmp_path / "x"), "--calibration", str(text),
                     "--recipe", str(recipe)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and expect in err, err
        assert not (tmp_path / "x").exists()
