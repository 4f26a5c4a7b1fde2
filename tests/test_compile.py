"""Sparse models under ``torch.compile(fullgraph=True)`` and ``torch.export``: our layers as the custom operator
``sparse_ops::linear`` (``sparse_ops.linear``), the same numbers as eager, each layer still on its planned path."""
import io

import pytest
import torch

from sparse_ops import linear as sparse_linear
from sparse_ops.kernels import cpp

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not cpp.available(), reason="native CPU kernels unavailable")

from sparse_ops.checkpoint.convert import convert_checkpoint  # noqa: E402
from sparse_ops.linear import SparseLinear  # noqa: E402
from sparse_ops.pretrained import from_pretrained  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 3, 7]])


def converted(tmp_path, fmt="csr", quantize=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                w = m.weight.view(-1, 4)  # 2:4, which every format stores
                w.mul_(torch.zeros_like(w).scatter_(1, w.abs().topk(2, dim=1).indices, 1.0))
    dense.save_pretrained(tmp_path / "dense")
    convert_checkpoint(tmp_path / "dense", tmp_path / "sparse", format=fmt, quantize=quantize)
    return from_pretrained(tmp_path / "sparse", fuse=True)


def logits(model, **kw):
    with torch.no_grad():
        return model(IDS, use_cache=False, **kw).logits


@pytest.mark.parametrize(("fmt", "quantize"), [("csr", None), ("2:4", None), ("auto", "int8")])
def test_compiled_with_fullgraph_gives_the_eager_numbers(tmp_path, fmt, quantize):
    model = converted(tmp_path, fmt, quantize)
    eager = logits(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break would raise
    torch.testing.assert_close(logits(compiled), eager, atol=0, rtol=0)


def test_exported_program_runs_the_layers_and_survives_save_and_load(tmp_path):
    model = converted(tmp_path)
    eager = logits(model)
    program = torch.export.export(model, (IDS,), kwargs={"use_cache": False})
    calls = [n for n in program.graph.nodes if n.target is torch.ops.sparse_ops.linear.default]
    assert len(calls) == sum(isinstance(m, SparseLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(program.module()(IDS, use_cache=False).logits, eager, atol=0, rtol=0)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)  # its weights are new tensors: no live layer owns them
    built = len(sparse_linear._BUILT)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(IDS, use_cache=False).logits, eager, atol=1e-6, rtol=1e-6)
    assert len(sparse_linear._BUILT) == built + len(calls)


def test_the_operator_runs_each_layers_planned_path(tmp_path, monkeypatch):
    import sparse_ops.plan

    monkeypatch.setattr(sparse_ops.plan, "time_candidates",  # dense fastest for every layer
                        lambda fns, device, **kw: {k: 0.5 if k == "dense" else 1.0 for k in fns})
    model = converted(tmp_path)
    eager = logits(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(logits(compiled), eager, atol=0, rtol=0)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert all(m.router.planned(8)["choice"] == "dense" for m in layers)  # the bucket of 5 tokens, planned and used


@pytest.mark.filterwarnings("ignore:Error detected in GeneratedBackward")
def test_no_backward_through_the_operator():
    from sparse_ops.formats import CSR

    layer = SparseLinear(CSR.from_dense(torch.eye(3)))
    x = torch.randn(2, 3, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="autograd"):
        compiled(x).sum().backward()
