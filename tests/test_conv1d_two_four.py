"""2:4 along dim 0: a 2:4-pruned GPT-2 (transformers' Conv1D, weight stored (in, out)) converts to 2:4 of each
weight's transpose (``"transposed": true`` in its record), round trips exactly, loads as 2:4 sparse layers with
no dense round trip, and shows as "2:4^T" in inspect; a bad flag in an untrusted file is a clear ValueError."""
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import prune
from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.checkpoint.inspect import inspect_checkpoint
from sparse_ops.checkpoint.layout import Storage, choose_layout, choose_storage
from sparse_ops.checkpoint.schema import TENSORS_KEY, VERSION_KEY, Transposed, load_sparse_state_dict
from sparse_ops.formats import CSR, TwoFour, is_two_four
from sparse_ops.linear import SparseLinear
from sparse_ops.loading import sparsify
from sparse_ops.pretrained import from_pretrained
from tests.test_checkpoint import rewrite_metadata
from tests.test_formats import two_four, unstructured

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# (in, out) of each Conv1D weight with n_embd 32, and the bytes of 2:4 of its (out, in) transpose:
# (out * in/2) fp32 values + out * in/8 metadata bytes
SHAPES = {"attn.c_attn": (32, 96), "attn.c_proj": (32, 32), "mlp.c_fc": (32, 128), "mlp.c_proj": (128, 32)}
TWO_FOUR_BYTES = {"attn.c_attn": 96 * 16 * 4 + 96 * 4, "attn.c_proj": 32 * 16 * 4 + 32 * 4,
                  "mlp.c_fc": 128 * 16 * 4 + 128 * 4, "mlp.c_proj": 32 * 64 * 4 + 32 * 16}
CONV1D_WEIGHTS = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in CONV1D]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(the 2:4-pruned tiny GPT2LMHeadModel, in eval mode; its save_pretrained folder)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not pruning lm_head.weight: it is shared with wte"
        pruner = prune.Pruner(model, 0.5, pattern="2:4")
    assert sorted(t.name + ".weight" for t in pruner.targets) == sorted(CONV1D_WEIGHTS)
    pruner.finalize()
    folder = tmp_path_factory.mktemp("gpt2") / "dense"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def converted(gpt2, tmp_path_factory):
    """format -> the sparse folder ``gpt2`` converts to with it."""
    out = tmp_path_factory.mktemp("converted")
    return {fmt: convert_checkpoint(gpt2[1], out / fmt.replace(":", ""), format=fmt).dst
            for fmt in ("2:4", "auto", "csr")}


def records(folder):
    """The sparse_ops records of every shard of a converted folder, merged."""
    merged = {}
    for shard in sorted(Path(folder).glob("*.sparse.safetensors")):
        with safe_open(shard, "pt") as f:
            meta = f.metadata()
        assert meta[VERSION_KEY] == "1"
        merged.update(json.loads(meta[TENSORS_KEY]))
    return merged


def test_the_pruned_conv1d_weights_are_two_four_along_dim_0_only(gpt2):
    """The premise: Pruner puts Conv1D's 2:4 groups along its input, dim 0 of the stored (in, out) weight."""
    model, _ = gpt2
    for name in CONV1D_WEIGHTS:
        w = model.get_parameter(name).detach()
        assert tuple(w.shape) == SHAPES[name.split(".", 3)[3].removesuffix(".weight")]
        assert is_two_four(w.t()) and not is_two_four(w)
        assert choose_layout(name, w, "2:4", None) == Storage("2:4", transposed=True)
        assert choose_storage(name, w, "auto", None) == "csr"  # as is, never transposed: CSR the smallest


@pytest.mark.parametrize("fmt", ["2:4", "auto"])
def test_every_conv1d_weight_is_stored_as_transposed_two_four(gpt2, converted, fmt):
    model, _ = gpt2
    recs = records(converted[fmt])
    for name in CONV1D_WEIGHTS:
        rec, layer = recs[name], name.split(".", 3)[3].removesuffix(".weight")
        assert rec["format"] == "2:4" and rec["transposed"] is True
        assert rec["shape"] == list(SHAPES[layer])  # the tensor's own (in, out) shape
    others = {k: r for k, r in recs.items() if k not in CONV1D_WEIGHTS}
    assert len(others) == 20 and all(r["format"] == "dense" and "transposed" not in r for r in others.values())
    infos = {t.name: t for t in inspect_checkpoint(converted[fmt])}
    for name in CONV1D_WEIGHTS:
        layer = name.split(".", 3)[3].removesuffix(".weight")
        info = infos[name]
        assert (info.format, info.transposed, info.label) == ("2:4", True, "2:4^T")
        assert info.shape == SHAPES[layer] and info.sparsity == 0.5
        assert info.nbytes == TWO_FOUR_BYTES[layer]  # e.g. c_attn 6528 bytes, CSR 9348, dense 12288
    assert infos["transformer.h.0.ln_1.weight"].label == "dense"


def test_auto_takes_csr_where_it_is_smaller_than_transposed_two_four():
    w = two_four((64, 64), extra_sparsity=0.8).t()  # 2:4 down the columns, ~90% zeros: CSR smaller than 2:4
    nnz = int(torch.count_nonzero(w))
    assert CSR.estimate_nbytes((64, 64), nnz, w.dtype) < TwoFour.estimate_nbytes((64, 64), nnz, w.dtype) == 8704
    assert choose_layout("fc.weight", w, "auto", None) == Storage("csr")
    assert choose_layout("fc.weight", w, "2:4", None) == Storage("2:4", True)
    assert choose_layout("fc.weight", w.t(), "2:4", None) == Storage("2:4")  # as is where as is fits


@pytest.mark.parametrize("fmt", ["2:4", "auto"])
def test_load_sparse_state_dict_round_trips_exactly(gpt2, converted, fmt):
    saved = load_file(gpt2[1] / "model.safetensors")
    dense = load_sparse_state_dict(converted[fmt], dense=True)
    assert set(dense) == set(saved)
    for name, t in saved.items():
        assert dense[name].shape == t.shape and torch.equal(dense[name], t), name  # atol=0
        assert dense[name].is_contiguous()
    sparse = load_sparse_state_dict(converted[fmt])
    for name in CONV1D_WEIGHTS:
        w = sparse[name]
        assert isinstance(w, Transposed) and isinstance(w.inner, TwoFour)
        assert w.format == "2:4" and w.shape == tuple(saved[name].shape) and w.inner.shape == w.shape[::-1]
        assert torch.equal(w.inner.to_dense(), saved[name].t())


def test_from_pretrained_loads_the_conv1d_layers_as_two_four_without_a_dense_round_trip(gpt2, converted,
                                                                                          monkeypatch):
    model, _ = gpt2
    folder = converted["2:4"]
    stored = load_sparse_state_dict(folder)

    def no_encoding(*args, **kwargs):
        raise AssertionError("from_pretrained re-encoded a weight")

    monkeypatch.setattr(TwoFour, "from_dense", no_encoding)
    monkeypatch.setattr(CSR, "from_dense", no_encoding)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = from_pretrained(folder)
    assert not [w for w in caught if str(w.message).startswith("sparsify:")]  # nothing loads dense or changes
    monkeypatch.undo()
    for name in CONV1D_WEIGHTS:
        layer = sparse.get_submodule(name.removesuffix(".weight"))
        assert isinstance(layer, SparseLinear) and layer.format == "2:4"
        inner = stored[name].inner  # (out, in), groups along in: the file's parts as they are
        assert (layer.out_features, layer.in_features) == inner.shape
        assert torch.equal(layer.weight_values, inner.values) and torch.equal(layer.weight_metadata, inner.metadata)
    ids = torch.randint(0, 64, (3, 13))
    with torch.no_grad():
        got, want = sparse(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_conv1d_stored_as_csr_still_loads(gpt2, converted):
    model, _ = gpt2
    assert all(records(converted["csr"])[n]["format"] == "csr" for n in CONV1D_WEIGHTS)
    assert "transposed" not in json.dumps(records(converted["csr"]))
    sparse = from_pretrained(converted["csr"])
    assert {sparse.get_submodule(n.removesuffix(".weight")).format for n in CONV1D_WEIGHTS} == {"csr"}
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.fixture
def column_file(tmp_path):
    """A file whose ``fc.weight`` (8, 16) is 2:4 down its columns only, converted to 2:4: stored transposed."""
    w = two_four((16, 8)).t().contiguous()  # (out 8, in 16)
    assert not is_two_four(w)
    sd = {"fc.weight": w, "fc.bias": torch.randn(8)}
    save_file(sd, tmp_path / "m.safetensors")
    convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors", format="2:4")
    return sd, tmp_path / "o.safetensors"


def test_a_linear_weight_stored_transposed_loads_turned_back(column_file):
    """nn.Linear computes with its (out, in) weight as stored: a transposed 2:4 record is turned back, and since
    the (out, in) weight breaks 2:4 it loads as csr, with a warning saying so; the output is exact."""
    sd, path = column_file
    assert isinstance(load_sparse_state_dict(path)["fc.weight"], Transposed)
    assert torch.equal(load_sparse_state_dict(path, dense=True)["fc.weight"], sd["fc.weight"])
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(16, 8))
    with pytest.warns(UserWarning, match=r"change format: fc.weight: loads as csr: its \(out, in\) transpose is "
                                         r"not 2:4"):
        sparsify(model, path)
    assert isinstance(model.fc, SparseLinear) and model.fc.format == "csr"
    assert torch.equal(model.fc.weight.to_dense(), sd["fc.weight"])
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.fc(x), nn.functional.linear(x, sd["fc.weight"], sd["fc.bias"]),
                                   rtol=1e-6, atol=1e-6)


BAD_FLAGS = {
    "int": (["fc.weight"], 1, "transposed of 'fc.weight' must be true or false, got 1"),
    "string": (["fc.weight"], "true", "transposed of 'fc.weight' must be true or false, got 'true'"),
    "null": (["fc.weight"], None, "transposed of 'fc.weight' must be true or false, got None"),
    "list": (["fc.weight"], [True], r"transposed of 'fc.weight' must be true or false, got \[True\]"),
    "on a dense tensor": (["fc.bias"], True, "says transposed for a dense tensor"),
    # parts of the (16, 8) transpose read as the (8, 16) tensor itself
    "dropped": (["fc.weight"], False, r"'fc.weight': 2:4 values must have shape \(8, 8\), got \(16, 4\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_a_corrupted_transposed_flag_raises_a_clear_value_error(column_file, case):
    keys, value, message = BAD_FLAGS[case]
    _, path = column_file

    def change(records, header):
        records[keys[0]]["transposed"] = value

    rewrite_metadata(path, change)
    for read in (load_sparse_state_dict, lambda p: list(inspect_checkpoint(p))):
        with pytest.raises(ValueError, match=f"cannot read {path}: .*{message}"):
            read(path)


def test_a_file_without_the_flag_reads_as_before(column_file, tmp_path):
    """A flag of false reads like no flag; a record without it is what every earlier file holds."""
    sd, _ = column_file
    w = two_four((8, 16))
    save_file({"fc.weight": w}, tmp_path / "rows.safetensors")
    convert_checkpoint(tmp_path / "rows.safetensors", tmp_path / "rows.sparse.safetensors", format="2:4")
    with safe_open(tmp_path / "rows.sparse.safetensors", "pt") as f:
        rec = json.loads(f.metadata()[TENSORS_KEY])["fc.weight"]
    assert set(rec) == {"format", "shape", "dtype", "parts"} and rec["format"] == "2:4"
    rewrite_metadata(tmp_path / "rows.sparse.safetensors",
                     lambda records, header: records["fc.weight"].update(transposed=False))
    loaded = load_sparse_state_dict(tmp_path / "rows.sparse.safetensors")["fc.weight"]
    assert isinstance(loaded, TwoFour) and torch.equal(loaded.to_dense(), w)


def test_a_tensor_that_is_not_two_four_either_way_still_names_the_bad_group_count(tmp_path):
    w = unstructured((64, 64), 0.6)
    assert not is_two_four(w) and not is_two_four(w.t())
    save_file({"a.weight": w}, tmp_path / "m.safetensors")
    bad = int(((w != 0).reshape(-1, 4).sum(-1) > 2).sum())  # groups of 4 along the last dim
    with pytest.raises(ValueError, match=rf"^a\.weight: weight of shape \(64, 64\) is not 2:4: {bad} of 1024 "
                                         rf"groups of 4 hold more than 2 nonzeros \(nor along dim 0: its "
                                         rf"transpose is not 2:4 either\)$"):
        convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors", format="2:4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    with pytest.raises(ValueError, match=rf"is not 2:4: {bad} of 1024 groups of 4 hold more than 2 nonzeros$"):
        choose_storage("a.weight", w, "2:4", None)  # as is only: no word about the transpose
