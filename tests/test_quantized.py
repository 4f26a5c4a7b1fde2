"""int8 weights (sparse_ops.quantized): quantization worked by hand, exact round trips of the three layouts, their
kernels on every build this CPU runs against kernels/reference.py, the plan's int8 twins, conversion and loading."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prune.cli import EXIT_USER_ERROR, main
from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.checkpoint.inspect import inspect_checkpoint
from sparse_ops.dispatch import kernel_for
from sparse_ops.kernels import ours_cpu, reference
from sparse_ops.linear import SparseLinear
from sparse_ops.loading import sparsify
from sparse_ops.plan import Planner
from sparse_ops.plan_cache import PlanCache
from sparse_ops.post import AddNorm
from sparse_ops.quantized import CLIP_GRID, QMAX, BitmapInt8, CSRInt8, DenseInt8, quantize_rows
from tests.test_cpu_kernels import RUNNABLE_ISAS, isa, needs_native  # noqa: F401 (isa: a fixture)
from tests.test_formats import unstructured
from tests.test_kernels import close_to_reference

INT8_FORMATS = [DenseInt8, CSRInt8, BitmapInt8]
SHAPES = [(1, 1), (7, 12), (33, 64), (70, 130), (5, 2000), (0, 8), (3, 0)]
BATCHES = [1, 2, 8, 9, 17, 64, 256]
SPARSITIES = [0.0, 0.5, 0.9, 0.999, 1.0]


def test_quantize_rows_worked_by_hand():
    w = torch.tensor([[0.0, 1.27, -0.635, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.0, 0.004]])
    q, s = quantize_rows(w)
    assert s.dtype == torch.float32 and s.tolist() == pytest.approx([0.01, 1.0, 2.0 / 127])
    # 0.635 / 0.01 = 63.5 rounds to even; the zero row keeps scale 1; -2.0 saturates at -127, never -128
    assert q.tolist() == [[0, 127, -64, 0], [0, 0, 0, 0], [-127, 64, 0, 0]]
    assert q.dtype == torch.int8 and int(q.min()) == -QMAX


def test_mse_clipping_is_the_least_squared_error_over_the_grid():
    # row 0: 8191 evenly spread weights and one just past them: clipping that one buys finer steps for the rest;
    # row 1: normal weights and one far outlier
    w = torch.stack([torch.cat([torch.linspace(-1, 1, 8191), torch.tensor([1.02])]),
                     torch.cat([torch.randn(8191, generator=torch.Generator().manual_seed(0)), torch.tensor([40.0])])])
    err = lambda q, s: ((q.float() * s[:, None] - w) ** 2).sum(1)  # noqa: E731
    absmax, mse = err(*quantize_rows(w)), err(*quantize_rows(w, "mse"))
    q, s = quantize_rows(w, "mse")
    assert mse[0] < absmax[0] and s[0] < 1.02 / 127 and q[0, -1] == QMAX  # clipped to the largest code
    assert mse[1] <= absmax[1]
    base = w.abs().amax(1) / 127  # brute force over the grid: nothing beats the chosen scale
    for a in CLIP_GRID:
        s_a = base * a
        q_a = torch.clamp(torch.round(w / s_a[:, None]), -127, 127)
        assert bool((mse <= err(q_a, s_a) + 1e-6).all())


@pytest.mark.parametrize("bad,message", [(float("inf"), "inf or NaN"), (float("nan"), r"row 1\)")])
def test_quantize_refuses_non_finite_weights_and_unknown_clips(bad, message):
    w = torch.ones(3, 4)
    w[1, 2] = bad
    with pytest.raises(ValueError, match=message):
        quantize_rows(w)
    with pytest.raises(ValueError, match=r"unknown clip 'max'; allowed: absmax, mse"):
        quantize_rows(torch.ones(2, 2), "max")


@pytest.mark.parametrize("cls", INT8_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_round_trips_are_exact(cls, shape, sparsity):
    w = unstructured(shape, sparsity)
    q, s = quantize_rows(w)
    fmt = cls.from_quantized(q, s)
    q2, s2 = fmt.quantized()
    torch.testing.assert_close(q2, q, atol=0, rtol=0)
    torch.testing.assert_close(s2, s, atol=0, rtol=0)
    again = cls.from_parts({k: v.clone() for k, v in fmt.parts().items()}, shape)
    torch.testing.assert_close(again.quantized()[0], q, atol=0, rtol=0)
    torch.testing.assert_close(fmt.to_dense(), q.float() * s[:, None], atol=0, rtol=0)
    assert fmt.dtype == torch.float32 and fmt.shape == shape and fmt.format in ("dense-int8", "csr-int8", "bitmap-int8")
    nnz = int((q != 0).sum())
    if cls is not BitmapInt8 or sparsity == 0.0:  # the bitmap's estimate counts every tile (exact when none is empty)
        assert fmt.nbytes == cls.estimate_nbytes(shape, nnz, torch.float32)


def test_the_bitmap_is_the_smallest_from_13_to_94_percent_sparse():
    # bytes per weight: dense 1, bitmap 1/8 + density (+ 8 B per 2048-weight tile), csr 3 x density (int16 columns)
    shape, n, sparsities = (4096, 4096), 4096 * 4096, (0.1, 0.14, 0.7, 0.93, 0.95)
    size = {cls.format: {s: cls.estimate_nbytes(shape, round((1 - s) * n), torch.float32) for s in sparsities}
            for cls in INT8_FORMATS}
    smallest = {s: min(size, key=lambda f: size[f][s]) for s in sparsities}
    assert smallest == {0.1: "dense-int8", 0.14: "bitmap-int8", 0.7: "bitmap-int8", 0.93: "bitmap-int8",
                        0.95: "csr-int8"}


@pytest.mark.parametrize("cls", INT8_FORMATS)
def test_validate_names_what_is_wrong(cls):
    good = cls.from_dense(unstructured((40, 70), 0.5))
    parts = good.parts()
    cases = {"finite and positive": {**parts, "scales": parts["scales"] * torch.tensor([0.0] + [1.0] * 39)},
             "scales must have shape": {**parts, "scales": parts["scales"][:-1]},
             r"\[-127, 127\]": {**parts, "values": parts["values"].masked_fill(parts["values"] == parts["values"].max(),
                                                                              -128)}}
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            cls.from_parts(bad, (40, 70))
    with pytest.raises(ValueError, match="needs parts"):
        cls.from_parts({k: v for k, v in parts.items() if k != "scales"}, (40, 70))


def test_bitmap_int8_refuses_another_tile_shape():
    from sparse_ops.bitmap import Int8Tiles

    q, s = quantize_rows(unstructured((40, 70), 0.5))
    other = Int8Tiles.from_dense(q, (16, 64)).parts()
    with pytest.raises(ValueError, match=r"bitmaps must have shape \(tiles, 32, 2\)"):
        BitmapInt8.from_parts({**other, "scales": s}, (40, 70))


def run(fmt, x, bias=None, **kw):
    kernel = kernel_for(fmt.format, "cpu")
    with torch.inference_mode():
        return kernel.matmul(kernel.prepare(fmt), x, bias, **kw)


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("cls", INT8_FORMATS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_kernels_match_reference(shape, batch, sparsity, cls, isa):
    fmt = cls.from_dense(unstructured(shape, sparsity))
    x, bias = torch.randn(batch, shape[1]), torch.randn(shape[0]) if batch % 2 else None
    y = run(fmt, x, bias)
    ref = reference.REFERENCE[fmt.format](fmt, x) + (0.0 if bias is None else bias)
    assert y.shape == (batch, shape[0]) and y.dtype == torch.float32
    close_to_reference(y, ref, torch.float32, shape[1])


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_bitmap_one_token_paths_both_match(expand, batch, isa, monkeypatch):
    # both one-token paths (words expanded to dense lanes, or walked bit by bit) whatever the density picks,
    # on a weight whose last tile column is partial (in = 130: walked) and rows past the last tile row
    monkeypatch.setattr(ours_cpu, "BITMAP_EXPAND_DENSITY", 0.0 if expand else 2.0)
    fmt = BitmapInt8.from_dense(unstructured((45, 130), 0.6))
    x = torch.randn(batch, 130)
    close_to_reference(run(fmt, x), reference.bitmap_int8_matmul(fmt, x), torch.float32, 130)


@needs_native
@pytest.mark.parametrize("cls", INT8_FORMATS)
@pytest.mark.parametrize("batch", [1, 40])
def test_extreme_scales_and_saturated_codes(cls, batch):
    # rows scaled by 1e-20 .. 1e20 (each row's own scale carries it) and every code at +-127
    g = torch.Generator().manual_seed(1)
    w = torch.randn(41, 96, generator=g).sign() * 10.0 ** torch.arange(-20, 21).float()[:, None]
    w[::2, ::3] = 0.0
    fmt = cls.from_dense(w)
    q, s = fmt.quantized()
    assert set(q.unique().tolist()) <= {-QMAX, 0, QMAX}
    x = torch.randn(batch, 96, generator=g)
    y, ref = run(fmt, x), reference.REFERENCE[fmt.format](fmt, x)
    torch.testing.assert_close(y / s, ref / s, rtol=1e-5, atol=1e-5 * QMAX * 96 ** 0.5)  # per row, in its scale


@needs_native
@pytest.mark.parametrize("cls", INT8_FORMATS)
@pytest.mark.parametrize("batch", [1, 33])
def test_fused_activation_and_post_op(cls, batch):
    fmt = cls.from_dense(unstructured((48, 80), 0.7))
    x, bias, res = torch.randn(batch, 80), torch.randn(48), torch.randn(batch, 48)
    post = AddNorm(res, torch.randn(48), torch.randn(48))
    y = run(fmt, x, bias, activation="gelu", post=post)
    want = post.apply(F.gelu(reference.REFERENCE[fmt.format](fmt, x) + bias))
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", INT8_FORMATS)
def test_gradients_flow_through_the_dequantized_weight(cls):
    fmt = cls.from_dense(unstructured((12, 20), 0.5))
    layer = SparseLinear(fmt, torch.zeros(12))
    x = torch.randn(3, 20, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, fmt.to_dense().sum(0).expand(3, 20))


@needs_native
@pytest.mark.parametrize("cls", INT8_FORMATS)
@pytest.mark.parametrize("batch", [1, 16])
def test_every_planned_path_of_an_int8_layer_gives_its_numbers(cls, batch):
    # a layer planned onto each of its paths in turn (a timer that makes that path fastest): the dense
    # (dequantized) weight, its own kernel or another int8 layout of the same q and scales
    fmt = cls.from_dense(unstructured((64, 96), 0.8))
    x = torch.randn(batch, 96)
    ref = reference.REFERENCE[fmt.format](fmt, x)
    paths = list(map(str, SparseLinear(fmt, None).router.paths(batch)))
    assert {"dense", "dense-int8", "csr-int8", "bitmap-int8"} <= {p.partition(".")[0] for p in paths}  # .plain
    for path in paths:
        timer = lambda fns, device, path=path: {p: 1e-3 if p == path else 1.0 for p in fns}  # noqa: E731
        layer = SparseLinear(fmt, None, planner=Planner(timer=timer, cache=PlanCache(None)))
        with torch.inference_mode():
            y = layer(x)
        assert str(layer.route(batch).path) == path
        close_to_reference(y, ref, torch.float32, 96)


def _tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight[torch.rand_like(m.weight) < 0.8] = 0.0
    return model


@pytest.mark.parametrize("format,expect", [("auto", {"0.weight": "bitmap-int8", "2.weight": "bitmap-int8"}),
                                           ("csr", {"0.weight": "csr-int8", "2.weight": "csr-int8"}),
                                           ("dense-int8", {"0.weight": "dense-int8", "2.weight": "dense-int8"})])
def test_convert_quantize_int8_loads_and_runs_the_dequantized_model(tmp_path, format, expect):
    model = _tiny_model()
    src, dst = tmp_path / "model.pt", tmp_path / "model.safetensors"
    torch.save(model.state_dict(), src)
    convert_checkpoint(src, dst, format=format, quantize="int8")
    infos = {t.name: t for t in inspect_checkpoint(dst)}
    assert {n: infos[n].format for n in expect} == expect
    assert infos["0.weight"].value_bits == 8 and infos["0.weight"].scales[0] > 0 and infos["0.bias"].format == "dense"
    loaded = sparsify(_tiny_model(), dst)
    x = torch.randn(5, 64)
    dq = [quantize_rows(m.weight.detach()) for m in (model[0], model[2])]
    want = F.linear(F.relu(F.linear(x, dq[0][0].float() * dq[0][1][:, None], model[0].bias)),
                    dq[1][0].float() * dq[1][1][:, None], model[2].bias)
    with torch.inference_mode():
        close_to_reference(loaded(x), want.detach(), torch.float32, 96)
    assert torch.nn.functional.cosine_similarity(loaded(x).flatten(), model(x).flatten(), dim=0) > 0.999


def test_int8_weights_load_into_a_bf16_model(tmp_path):
    model = _tiny_model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    convert_checkpoint(tmp_path / "m.pt", tmp_path / "m.safetensors", format="auto", quantize="int8")
    loaded = sparsify(_tiny_model().to(torch.bfloat16), tmp_path / "m.safetensors")
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = loaded(x)
    assert y.dtype == torch.bfloat16 and loaded[0].weight.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), model(x.float()).detach(), rtol=0.05, atol=0.05)


def test_cli_quantize_errors_are_one_line(tmp_path, capsys):
    torch.save(_tiny_model().state_dict(), tmp_path / "m.pt")
    code = main(["convert", str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.safetensors"), "--format", "2:4",
                 "--quantize", "int8"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and len(err.strip().splitlines()) == 1
    assert "2:4 has no int8 layout; with quantize='int8' allowed: auto, csr, dense-int8" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_convert_and_inspect_show_bits_and_scales(tmp_path, capsys):
    torch.save(_tiny_model().state_dict(), tmp_path / "m.pt")
    assert main(["convert", str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.safetensors"), "--format", "auto",
                 "--quantize", "int8", "--clip", "mse"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "o.safetensors")]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("0.weight"))
    assert row[1:4] == ["96x64", "bitmap-int8", "float32"] and row[6] == "8" and row[8] == ".."


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("cls", [CSRInt8, BitmapInt8])
@pytest.mark.parametrize("variant", ["plain", "panels"])
@pytest.mark.parametrize("batch", [2, 16, 33, 200])
@pytest.mark.parametrize("shape", [(70, 300), (130, 64), (5, 600)])
def test_both_sparse_int8_kernels_match_reference(shape, batch, variant, cls, isa):
    fmt = cls.from_dense(unstructured(shape, 0.7))
    x, bias = torch.randn(batch, shape[1]), torch.randn(shape[0])
    y = run(fmt, x, bias, variant=variant)
    close_to_reference(y, reference.REFERENCE[fmt.format](fmt, x) + bias, torch.float32, shape[1])


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("cls", [CSRInt8, BitmapInt8])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("batch", [16, 130])
def test_fused_int8_feed_forward_matches_the_layers(batch, gated, cls, isa):
    # one call for up (and gate), activation, down and the post-op, on int8 panelled copies
    hidden, inp, out = 96, 40, 24
    up, down, gate = (cls.from_dense(unstructured(s, 0.6)) for s in ((hidden, inp), (out, hidden), (hidden, inp)))
    prep = [kernel_for(w.format, "cpu").prepare(w) for w in (up, down, gate)]
    x, bu, bd, bg = torch.randn(batch, inp), torch.randn(hidden), torch.randn(out), torch.randn(hidden)
    post = AddNorm(torch.randn(batch, out), torch.randn(out), torch.randn(out))
    with torch.inference_mode():
        y = ours_cpu.ffn_matmul(prep[0], prep[1], x, bu, bd, "silu" if gated else "gelu", post=post,
                                  gate=prep[2] if gated else None, gate_bias=bg if gated else None)
    ref = reference.REFERENCE[cls.format]
    h = ref(up, x) + bu
    h = F.silu(ref(gate, x) + bg) * h if gated else F.gelu(h)
    torch.testing.assert_close(y, post.apply(ref(down, h) + bd), rtol=1e-4, atol=1e-4)


def test_an_int8_checkpoint_quantizes_the_tied_output_head_at_load(tmp_path):
    # SmolLM2-style: lm_head shares the embedding, which the file stores once (and conversion keeps in float)
    from sparse_ops import from_pretrained

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    dense.save_pretrained(tmp_path / "dense")
    convert_checkpoint(tmp_path / "dense", tmp_path / "int8", format="auto", quantize="int8")
    model = from_pretrained(tmp_path / "int8")
    assert isinstance(model.lm_head, SparseLinear) and model.lm_head.format == "dense-int8"
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb, dense.get_input_embeddings().weight, rtol=0, atol=0)  # the lookup stays float
    want = dense
    with torch.no_grad():  # the reference: every linear's weight, and the head's, dequantized
        for m in [m for m in want.modules() if isinstance(m, nn.Linear)]:
            q, s = quantize_rows(m.weight)
            m.weight = nn.Parameter(q.float() * s[:, None])
    ids = torch.tensor([[3, 17, 42, 5, 9]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)
