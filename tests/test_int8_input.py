"""int8 inputs (``input_bits=8``): each int8 layer's input quantized per block of 32 columns, so that one token
multiplies int8 by int8. ``quantize_input`` worked by hand; the kernels' codes bit for bit against it (an identity
weight returns its input as quantized); every build's kernels against ``kernels/reference.py``; every planned path;
loading; the decoder step against transformers with the same quantization; compile and export."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_ops import linear as sparse_linear
from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.formats import CSR
from sparse_ops.kernels import reference
from sparse_ops.linear import SparseLinear
from sparse_ops.loading import sparsify
from sparse_ops.plan import Planner
from sparse_ops.plan_cache import PlanCache
from sparse_ops.quantized import INPUT_BLOCK, BitmapInt8, CSRInt8, DenseInt8, quantize_input
from tests.test_cpu_kernels import RUNNABLE_ISAS, isa, needs_native  # noqa: F401 (isa: a fixture)
from tests.test_formats import unstructured
from tests.test_kernels import close_to_reference
from tests.test_quantized import _tiny_model, run

INT8_FORMATS = [DenseInt8, CSRInt8, BitmapInt8]


def test_quantize_input_worked_by_hand():
    x = torch.zeros(2, 40)
    x[0, :4] = torch.tensor([127.0, 2.5, 3.5, -2.5])  # block 0: s = 1, halves round to even
    x[0, 32:35] = torch.tensor([0.0, -0.254, 0.001])  # block 1 (8 columns): s = 0.002, 0.001 -> 0.5 -> 0
    q = quantize_input(x)
    assert q[0, :4].tolist() == [127.0, 2.0, 4.0, -2.0] and q[0, 4:32].abs().sum() == 0
    s = torch.tensor(0.254) / 127
    assert q[0, 32:35].tolist() == [0.0, (-127 * s).item(), 0.0]
    assert torch.equal(q[1], torch.zeros(40))  # a zero block stays zero
    assert quantize_input(x.to(torch.bfloat16)).dtype == torch.bfloat16 and INPUT_BLOCK == 32


def test_quantize_input_is_idempotent_to_rounding_and_keeps_shapes():
    x = torch.randn(3, 5, 70)
    q = quantize_input(x)
    assert q.shape == x.shape
    torch.testing.assert_close(quantize_input(q), q, rtol=1e-6, atol=0)
    assert ((q - x).abs() <= x.abs().amax() / 127).all()


def identity(cls, n):
    return cls.from_quantized(torch.eye(n, dtype=torch.int8), torch.ones(n), input_bits=8)


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("cls", INT8_FORMATS)
@pytest.mark.parametrize("batch", [1, 2, 9, 40])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 100, 257])
def test_the_kernels_codes_are_quantize_inputs_bit_for_bit(n, batch, cls, isa):
    # y = x W^T with W = I (codes 1, scale 1): every kernel returns its int8 copy of x exactly (int8 x int8 sums
    # are exact, and s * q is one rounding), so the codes and scales must be quantize_input's
    g = torch.Generator().manual_seed(n * batch)
    x = torch.randn(batch, n, generator=g) * 10.0 ** torch.randint(-3, 4, (batch, n), generator=g).float()
    x[:, :INPUT_BLOCK // 2] = 0.0  # a zero half block
    assert torch.equal(run(identity(cls, n), x), quantize_input(x))


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("cls", INT8_FORMATS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 9, 64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 12), (33, 64), (70, 130), (64, 96), (5, 2000), (0, 8), (3, 0)])
def test_int8_input_kernels_match_reference(shape, batch, sparsity, cls, isa):
    fmt = cls.from_dense(unstructured(shape, sparsity)).with_input_bits(8)
    x, bias = torch.randn(batch, shape[1]), torch.randn(shape[0]) if batch % 2 else None
    y = run(fmt, x, bias, activation="silu")
    ref = F.silu(reference.REFERENCE[fmt.format](fmt, x) + (0.0 if bias is None else bias))
    assert y.shape == (batch, shape[0]) and y.dtype == torch.float32
    close_to_reference(y, ref, torch.float32, shape[1])


@needs_native
@pytest.mark.parametrize("cls", [CSRInt8, BitmapInt8])
@pytest.mark.parametrize("variant", ["plain", "panels"])
def test_both_sparse_kernel_variants_quantize(cls, variant):
    fmt = cls.from_dense(unstructured((70, 300), 0.6)).with_input_bits(8)
    x = torch.randn(33, 300)
    close_to_reference(run(fmt, x, variant=variant), reference.REFERENCE[fmt.format](fmt, x), torch.float32, 300)


@needs_native
@pytest.mark.parametrize("cls", INT8_FORMATS)
@pytest.mark.parametrize("batch", [1, 16])
def test_every_planned_path_quantizes_the_input(cls, batch):
    # each path in turn (a timer that makes it fastest): dense (torch on the dequantized weight), our kernel, the
    # other int8 layouts: all give the numbers of the int8 input, not of the float one
    fmt = cls.from_dense(unstructured((64, 96), 0.8)).with_input_bits(8)
    x = torch.randn(batch, 96)
    ref = reference.REFERENCE[fmt.format](fmt, x)
    assert (ref - x @ fmt.to_dense().T).abs().max() > 1e-3  # the quantization shows
    paths = list(map(str, SparseLinear(fmt, None).router.paths(batch)))
    for path in paths:
        timer = lambda fns, device, path=path: {p: 1e-3 if p == path else 1.0 for p in fns}
        layer = SparseLinear(fmt, None, planner=Planner(timer=timer, cache=PlanCache(None)))
        assert layer.input_bits == 8
        with torch.inference_mode():
            y = layer(x)
        assert str(layer.route(batch).path) == path
        close_to_reference(y, ref, torch.float32, 96)
        assert layer.native_weight(1).extra & 2  # the decoder step's weight quantizes too (dense -> dense-int8)


def test_input_bits_is_a_runtime_choice_with_clear_errors():
    fmt = DenseInt8.from_dense(torch.randn(8, 16))
    layer = SparseLinear(fmt)
    assert layer.input_bits is None and "input_bits" not in repr(layer)
    x = torch.randn(2, 16)
    with torch.inference_mode():
        weight_only = layer(x)
        layer.input_bits = 8
        quantized = layer(x)
    assert "input_bits=8" in repr(layer) and not torch.equal(weight_only, quantized)
    assert not any("input_bits" in k for k in layer.state_dict())
    with pytest.raises(ValueError, match=r"unknown input_bits 4; allowed: None, 8"):
        layer.input_bits = 4
    with pytest.raises(ValueError, match=r"input_bits=8 needs an int8 weight .* this layer's is csr"):
        SparseLinear(CSR.from_dense(torch.randn(8, 16))).input_bits = 8
    with pytest.raises(ValueError, match="unknown input_bits 16"):
        fmt.with_input_bits(16)


def _tiny(tmp_path, quantize):
    model = _tiny_model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    convert_checkpoint(tmp_path / "m.pt", tmp_path / "m.safetensors", format="auto", quantize=quantize)
    return model


def test_sparsify_sets_input_bits_on_every_int8_layer(tmp_path):
    model = _tiny(tmp_path, "int8")
    loaded = sparsify(_tiny_model(), tmp_path / "m.safetensors", input_bits=8)
    assert [m.input_bits for m in loaded.modules() if isinstance(m, SparseLinear)] == [8, 8]
    x = torch.randn(5, 64)
    want = x
    for m in (loaded[0], loaded[2]):
        want = F.linear(quantize_input(want), m.dense_weight(), m.bias)
        want = F.relu(want) if m is loaded[0] else want
    with torch.inference_mode():
        close_to_reference(loaded(x), want, torch.float32, 96)
    assert F.cosine_similarity(loaded(x).flatten(), model(x).flatten(), dim=0) > 0.99


def test_sparsify_refuses_input_bits_without_int8_layers(tmp_path):
    _tiny(tmp_path, None)
    fresh = _tiny_model()
    with pytest.raises(ValueError, match=r"input_bits=8 quantizes the inputs of int8 layers, and this checkpoint "
                                         r"has none \(convert it with prune convert --quantize int8\)"):
        sparsify(fresh, tmp_path / "m.safetensors", input_bits=8)
    with pytest.raises(ValueError, match="unknown input_bits 7"):
        sparsify(fresh, tmp_path / "m.safetensors", input_bits=7)


# ---- LLaMA models: the decoder step and compile --------------------------------------------------------------

def _llama_int8(tmp_path, sparsity=0.5):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    dense.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head":
                m.weight.mul_(m.weight.abs() > m.weight.abs().flatten().kthvalue(int(sparsity * m.weight.numel())).values)
    dense.save_pretrained(tmp_path / "dense")
    convert_checkpoint(tmp_path / "dense", tmp_path / "int8", format="auto", quantize="int8")
    return dense


@needs_native
@pytest.mark.parametrize("fuse", [False, True])
def test_the_decoder_step_quantizes_as_the_layers_do(tmp_path, fuse):
    from sparse_ops.decode import Decoder, generate
    from sparse_ops.pretrained import from_pretrained

    dense = _llama_int8(tmp_path)
    model = from_pretrained(tmp_path / "int8", input_bits=8, fuse=fuse)
    assert isinstance(model.lm_head, SparseLinear) and model.lm_head.input_bits == 8  # the tied head too
    decoder = Decoder(model, max_len=32)
    assert all(layout.endswith("i8") or "_i8_" in layout for layout in decoder.layouts().values())
    assert all(w.extra & 2 for w in decoder.weights.values())
    # the reference: transformers with every weight dequantized and every linear's input quantize_input'd
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, nn.Linear):
                m.weight = nn.Parameter(model.get_submodule(name).dense_weight().clone())
                m.register_forward_pre_hook(lambda mod, args: (quantize_input(args[0]),))
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = dense(ids[None]).logits[0]
    got = torch.cat([decoder.step(ids[:4], all_logits=True)] + [decoder.step(ids[i:i + 1])[None] for i in range(4, 12)])
    # a hidden state that differs in its last bit may round to the neighbouring code: tolerance of a few codes
    torch.testing.assert_close(got, ref, atol=2e-3 * ref.abs().max(), rtol=0)
    prompt = ids[None, :4]
    with torch.no_grad():  # greedy tokens: transformers' own loop over the same layers
        want = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, eos_token_id=-1), want)


@needs_native
def test_an_int8_lm_head_follows_the_models_input_bits(tmp_path):
    from sparse_ops.decode import Decoder
    from sparse_ops.pretrained import from_pretrained

    _llama_int8(tmp_path)
    model = from_pretrained(tmp_path / "int8", input_bits=8)
    assert Decoder(model, max_len=8, lm_head="int8").weights["lm_head"].extra & 2
    model = from_pretrained(tmp_path / "int8")
    assert not Decoder(model, max_len=8, lm_head="int8").weights["lm_head"].extra & 2


@needs_native
def test_compiled_and_exported_models_keep_the_input_bits(tmp_path):
    from sparse_ops.pretrained import from_pretrained

    _llama_int8(tmp_path)
    model = from_pretrained(tmp_path / "int8", input_bits=8, fuse=True)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        weight_only = from_pretrained(tmp_path / "int8")(ids, use_cache=False).logits
        assert not torch.equal(eager, weight_only)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager, atol=0, rtol=0)
        program = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)  # no live layer owns its weights: layers are built with the input bits
    built = len(sparse_linear._BUILT)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(ids, use_cache=False).logits, eager, atol=1e-5, rtol=1e-5)
    assert len(sparse_linear._BUILT) > built
    assert all(layer.input_bits == 8 for layer, _ in list(sparse_linear._BUILT.values())[built:])
