"""Sharded checkpoints: a Hugging Face ``model.safetensors.index.json`` folder converts shard by shard into a
folder of sparse shards with its own index, readable from the folder or the index by every reader."""
import json
import os

import pytest
import torch
from torch import nn

from prune.cli import EXIT_USER_ERROR, main
from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.checkpoint.inspect import inspect_checkpoint
from sparse_ops.checkpoint.schema import load_sparse_state_dict
from sparse_ops.formats import CSR
from sparse_ops.linear import SparseLinear
from sparse_ops.loading import sparsify
from sparse_ops.tensorio import SPARSE_INDEX
from tests.test_checkpoint import rewrite_metadata, state, write


def model_state():
    """Dense weights of ``mlp()`` with 90% of each linear weight zero."""
    torch.manual_seed(0)
    sd = mlp().state_dict()
    for k, v in sd.items():
        if k.endswith("weight"):
            v.masked_fill_(torch.rand(v.shape) < 0.9, 0.0)
    return sd


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))


def sharded_hf(tmp_path, sd, n_shards):
    """An HF-style folder: ``n_shards`` model-0000k-of-0000n.safetensors files and their index."""
    from safetensors.torch import save_file

    d = tmp_path / "hf"
    d.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for k in range(n_shards):
        name = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = keys[k::n_shards]
        save_file({key: sd[key].contiguous() for key in part}, d / name)
        weight_map.update({key: name for key in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("n_shards", [1, 3])
def test_sharded_source_converts_shard_by_shard(tmp_path, n_shards):
    sd = model_state()
    s = convert_checkpoint(sharded_hf(tmp_path, sd, n_shards), tmp_path / "out", format="csr")
    assert (s.tensors, s.converted) == (6, 3)
    names = sorted(os.listdir(tmp_path / "out"))
    shards = [f"model-{k:05d}-of-{n_shards:05d}.sparse.safetensors" for k in range(1, n_shards + 1)]
    assert names == sorted([*shards, SPARSE_INDEX])
    index = json.loads((tmp_path / "out" / SPARSE_INDEX).read_text())
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == s.bytes_after
    for where in (tmp_path / "out", tmp_path / "out" / SPARSE_INDEX):
        loaded = load_sparse_state_dict(where)
        assert isinstance(loaded["0.weight"], CSR) and set(loaded) == set(sd)
        dense = load_sparse_state_dict(where, dense=True)
        assert all(torch.equal(dense[k], sd[k]) for k in sd)
    assert {t.name: t.format for t in inspect_checkpoint(tmp_path / "out")}["2.weight"] == "csr"
    hf_index = load_sparse_state_dict(tmp_path / "hf" / "model.safetensors.index.json")  # the dense index too
    assert all(torch.equal(hf_index[k], sd[k]) for k in sd)


def test_sharded_output_runs_in_a_model(tmp_path):
    sd = model_state()
    convert_checkpoint(sharded_hf(tmp_path, sd, 2), tmp_path / "out")
    dense = mlp()
    dense.load_state_dict(sd)
    model = sparsify(mlp(), tmp_path / "out")
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 3
    x = torch.randn(5, 32)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


def test_single_file_to_folder_and_sharded_to_single_file(tmp_path):
    sd = state()
    convert_checkpoint(write(tmp_path, sd, "pt"), tmp_path / "one")
    assert sorted(os.listdir(tmp_path / "one")) == ["model-00001-of-00001.sparse.safetensors", SPARSE_INDEX]
    convert_checkpoint(tmp_path / "one", tmp_path / "merged.safetensors")  # sparse shards -> one file
    dense = load_sparse_state_dict(tmp_path / "merged.safetensors", dense=True)
    assert all(torch.equal(dense[k], sd[k]) for k in sd)


def test_cli_sharded_convert_and_inspect(tmp_path, capsys):
    src = sharded_hf(tmp_path, model_state(), 2)
    assert main(["convert", str(src), "-o", str(tmp_path / "out")]) == 0
    assert "converted 3 of 6 tensors to csr" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "out" / SPARSE_INDEX)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("total: 6 tensors,")
    # a second run into the same (now full) folder is refused, leaving it as it was
    before = sorted(os.listdir(tmp_path / "out"))
    assert main(["convert", str(src), "-o", str(tmp_path / "out")]) == EXIT_USER_ERROR
    assert "is not empty" in capsys.readouterr().err and sorted(os.listdir(tmp_path / "out")) == before


def test_failed_sharded_convert_leaves_nothing(tmp_path):
    sd = {k: torch.zeros_like(v) for k, v in model_state().items()}  # all-zero weights are 2:4 ...
    sd["4.weight"] = torch.randn(8, 48)
    sd["4.weight"][:, :24] = 0.0  # ... this one, in the last of 3 shards, is 50% sparse but not 2:4
    src = sharded_hf(tmp_path, sd, 3)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(ValueError, match="4.weight: weight of shape \\(8, 48\\) is not 2:4"):
            convert_checkpoint(src, out, format="2:4")
    assert sorted(os.listdir(tmp_path)) == ["empty", "hf"] and not os.listdir(tmp_path / "empty")


def _index_change(tmp_path, change):
    convert_checkpoint(sharded_hf(tmp_path, model_state(), 2), tmp_path / "out")
    path = tmp_path / "out" / SPARSE_INDEX
    index = json.loads(path.read_text())
    change(index, tmp_path / "out")
    path.write_text(json.dumps(index))
    return tmp_path / "out"


def _move_tensor(index, out):
    a, b = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == a)
    index["weight_map"][key] = b


def _duplicate_part(index, out):
    """Both shards store a tensor under the same name."""
    shards = sorted(set(index["weight_map"].values()))

    def add_twin(records, header):
        header["0.bias"] = dict(next(v for k, v in header.items() if k != "__metadata__"))
    rewrite_metadata(out / shards[1], add_twin)


BAD_INDEXES = {
    "shard outside the folder": (lambda i, o: i["weight_map"].update({"0.weight": "../x.safetensors"}),
                                 "is not a plain file name"),
    "missing shard": (lambda i, o: i["weight_map"].update({"0.weight": "gone.safetensors"}), "no such file"),
    "tensor in the wrong shard": (_move_tensor, "the index and model-0000.* disagree about tensor"),
    "no weight map": (lambda i, o: i.pop("weight_map"), "weight_map must map tensor names"),
    "weight map a list": (lambda i, o: i.update({"weight_map": [1, 2]}), "weight_map must map"),
    "a name stored twice": (_duplicate_part, "stored in .* too|metadata and stored tensors disagree"),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_bad_sparse_index_is_a_clear_error(tmp_path, case):
    change, message = BAD_INDEXES[case]
    out = _index_change(tmp_path, change)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_sparse_state_dict(out)
