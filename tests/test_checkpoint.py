"""Checkpoint conversion, reading of every source kind, validation of bad files, and sparsify on a tiny BERT."""
import json
import os
import re
import struct
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.checkpoint.inspect import inspect_checkpoint
from sparse_ops.checkpoint.schema import TENSORS_KEY, VERSION_KEY, load_sparse_state_dict
from sparse_ops.formats import CSR, TwoFour
from sparse_ops.linear import SparseLinear
from sparse_ops.loading import sparsify
from sparse_ops.plan import plan_rows
from sparse_ops.plan_cache import PlanCache
from sparse_ops.tensorio import SPARSE_INDEX
from tests.test_formats import two_four, unstructured


def state(sparsity=0.9, dtype=torch.float32, pattern="unstructured"):
    make = (lambda s: two_four(s, dtype)) if pattern == "2:4" else (lambda s: unstructured(s, sparsity, dtype))
    return {"fc1.weight": make((256, 128)), "fc1.bias": torch.randn(256).to(dtype),
            "fc2.weight": make((64, 256)), "emb.embeddings.weight": torch.randn(50, 16).to(dtype),
            "step": torch.tensor(3)}


def write(tmp_path, sd, kind):
    """Save ``sd`` as a .safetensors file, a .pt file, or an HF directory (single or 2-shard)."""
    if kind == "safetensors":
        save_file(sd, tmp_path / "m.safetensors")
        return tmp_path / "m.safetensors"
    if kind == "pt":
        torch.save(sd, tmp_path / "m.pt")
        return tmp_path / "m.pt"
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    if kind == "hf":
        save_file(sd, d / "model.safetensors")
        return d
    keys = sorted(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for file, names in shards.items():
        save_file({k: sd[k] for k in names}, d / file)
    index = {"weight_map": {k: f for f, names in shards.items() for k in names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


@pytest.mark.parametrize("kind", ["safetensors", "pt", "hf", "hf-sharded"])
@pytest.mark.parametrize("format", ["csr", "auto"])
def test_convert_round_trips_every_source(tmp_path, kind, format):
    sd = state()
    summary = convert_checkpoint(write(tmp_path, sd, kind), tmp_path / "out.safetensors", format=format)
    assert (summary.tensors, summary.converted) == (5, 2)  # embeddings, bias and the scalar stay dense
    loaded = load_sparse_state_dict(tmp_path / "out.safetensors")
    assert isinstance(loaded["fc1.weight"], CSR) and isinstance(loaded["emb.embeddings.weight"], torch.Tensor)
    dense = load_sparse_state_dict(tmp_path / "out.safetensors", dense=True)
    assert set(dense) == set(sd) and all(torch.equal(dense[k], sd[k]) and dense[k].dtype == sd[k].dtype for k in sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_two_four_round_trip_and_auto_prefers_smaller(tmp_path, dtype):
    sd = state(dtype=dtype, pattern="2:4")
    src = write(tmp_path, sd, "safetensors")
    convert_checkpoint(src, tmp_path / "a.safetensors", format="2:4")
    loaded = load_sparse_state_dict(tmp_path / "a.safetensors")
    assert isinstance(loaded["fc2.weight"], TwoFour) and loaded["fc2.weight"].dtype == dtype
    assert all(torch.equal(v, sd[k]) for k, v in load_sparse_state_dict(tmp_path / "a.safetensors", True).items())
    # at 50% sparsity CSR is larger than dense (fp32 + int16 breaks even at 33%, fp16 at 50%); 2:4 is smaller
    convert_checkpoint(src, tmp_path / "b.safetensors", format="auto")
    assert isinstance(load_sparse_state_dict(tmp_path / "b.safetensors")["fc1.weight"], TwoFour)


def test_sizes_at_90_percent_csr_and_2_4(tmp_path):
    big = {"w": unstructured((512, 512), 0.9), "b": torch.randn(512)}
    save_file(big, tmp_path / "d.safetensors")
    convert_checkpoint(tmp_path / "d.safetensors", tmp_path / "s.safetensors", format="csr")
    assert os.path.getsize(tmp_path / "s.safetensors") <= 0.25 * os.path.getsize(tmp_path / "d.safetensors")
    save_file({"w": two_four((512, 512)), "b": torch.randn(512)}, tmp_path / "d24.safetensors")
    convert_checkpoint(tmp_path / "d24.safetensors", tmp_path / "s24.safetensors", format="2:4")
    assert os.path.getsize(tmp_path / "s24.safetensors") <= 0.60 * os.path.getsize(tmp_path / "d24.safetensors")


@pytest.mark.parametrize("min_sparsity,converted", [(None, 1), (0.0, 2), (0.95, 0)])
def test_min_sparsity_threshold(tmp_path, min_sparsity, converted):
    sd = {"a": unstructured((64, 64), 0.9), "b": unstructured((64, 64), 0.2)}  # b: CSR would be larger
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing converted: refused without allow_dense, a warning with it
        allow = {"allow_dense": True} if converted == 0 else {}
        s = convert_checkpoint(write(tmp_path, sd, "pt"), tmp_path / "o.safetensors", min_sparsity=min_sparsity,
                               **allow)
    assert s.converted == converted


def test_metadata_not_names_carry_the_format(tmp_path):
    convert_checkpoint(write(tmp_path, state(), "pt"), tmp_path / "o.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        meta = f.metadata()
    records = json.loads(meta[TENSORS_KEY])
    assert meta[VERSION_KEY] == "1" and records["fc1.weight"]["format"] == "csr"
    assert records["fc1.weight"]["shape"] == [256, 128] and records["fc1.bias"]["format"] == "dense"
    # renaming a stored part keeps the file readable as long as the metadata points at it
    infos = {t.name: t for t in inspect_checkpoint(tmp_path / "o.safetensors")}
    assert infos["fc1.weight"].format == "csr" and 0.85 < infos["fc1.weight"].sparsity < 0.95


def rewrite_metadata(path, change):
    """Rewrite a safetensors file's header with ``change(records)`` applied to the sparse_ops records."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    records = json.loads(header["__metadata__"][TENSORS_KEY])
    change(records, header)
    header["__metadata__"][TENSORS_KEY] = json.dumps(records)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def patch_data(path, tensor, new_bytes):
    """Overwrite the first bytes of a stored tensor's data (a bit flip on disk)."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start = 8 + n + json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    raw[start:start + len(new_bytes)] = new_bytes
    path.write_bytes(bytes(raw))


def _set(path, value):
    def change(records, header):
        obj = records
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return change


CORRUPTIONS = {
    "unknown format": (_set(["fc1.weight", "format"], "bsr"), "format of 'fc1.weight' is 'bsr'"),
    "bad shape": (_set(["fc1.weight", "shape"], [256, 64]), "fc1.weight"),
    "bad dtype name": (_set(["fc1.weight", "dtype"], "float128"), "dtype of 'fc1.weight'"),
    "missing part": (_set(["fc1.weight", "parts", "values"], "nope"), "parts of 'fc1.weight'"),
    "dense shape lie": (_set(["fc1.bias", "shape"], [7]), "metadata says"),
    "corrupt indices": (None, r"'fc1.weight': csr col_indices must lie in \[0, 128\)"),  # bytes, not metadata
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_sparse_file_raises_value_error(tmp_path, case):
    change, message = CORRUPTIONS[case]
    convert_checkpoint(write(tmp_path, state(), "pt"), tmp_path / "o.safetensors")
    if change is not None:
        rewrite_metadata(tmp_path / "o.safetensors", change)
    if case == "corrupt indices":
        patch_data(tmp_path / "o.safetensors", "fc1.weight/col_indices", struct.pack("<h", 30000))
    with pytest.raises(ValueError, match=message):
        load_sparse_state_dict(tmp_path / "o.safetensors")


class _Payload:
    """Unpickling this runs ``touch <marker>``: the file appearing is the proof that the pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(command):
    def run(path, tmp_path):
        from prune.cli import EXIT_USER_ERROR, main

        extra = ["-o", str(tmp_path / "o.safetensors")] if command == "convert" else []
        assert main([command, str(path), *extra]) == EXIT_USER_ERROR
        raise ValueError("refusing to load (the CLI printed it: weights_only)")  # for the shared assertion
    return run


MALICIOUS_READERS = {
    "convert_checkpoint": lambda path, tmp: convert_checkpoint(path, tmp / "o.safetensors"),
    "load_sparse_state_dict": lambda path, tmp: load_sparse_state_dict(path),
    "inspect_checkpoint": lambda path, tmp: list(inspect_checkpoint(path)),
    "sparsify": lambda path, tmp: sparsify(nn.Linear(2, 2), path),
    "prune convert": _cli("convert"),
    "prune inspect": _cli("inspect"),
}


@pytest.mark.parametrize("where", ["evil.pt", "evil.bin", "hf/pytorch_model.bin", "nested.pt"])
@pytest.mark.parametrize("reader", sorted(MALICIOUS_READERS))
def test_malicious_pickle_is_refused_without_running(tmp_path, reader, where, capsys):
    marker = tmp_path / "pwned"
    obj = {"w": torch.zeros(2), "evil": _Payload(marker)}
    if where == "nested.pt":  # the payload inside a {"state_dict": ...} wrapper, as training scripts save
        obj = {"state_dict": {"w": torch.zeros(2)}, "extra": [_Payload(marker)]}
    path = tmp_path / where
    path.parent.mkdir(exist_ok=True)
    torch.save(obj, path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="refusing to load .*weights_only"):
        MALICIOUS_READERS[reader](path.parent if where.startswith("hf/") else path, tmp_path)
    assert not marker.exists()  # the payload did not run
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary files either
    if reader.startswith("prune"):
        err = capsys.readouterr().err
        assert err.startswith(f"{reader}: error: refusing to load {path}: ") and len(err.splitlines()) == 1, err


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=32)
    return BertModel(cfg).eval()


def prune_linears(model, sparsity, pattern="unstructured"):
    """Zero the smallest weights of every nn.Linear (per layer); 2:4 keeps the 2 largest of each 4."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                if pattern == "2:4":
                    g = w.abs().reshape(w.shape[0], -1, 4)
                    drop = g.argsort(-1)[..., :2]
                    w.copy_(w.reshape(g.shape).scatter(-1, drop, 0.0).reshape(w.shape))
                else:
                    k = int(sparsity * w.numel())
                    w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0.0
    return model


@pytest.mark.parametrize("format,pattern", [("csr", "unstructured"), ("2:4", "2:4"), ("auto", "2:4")])
def test_sparsify_tiny_bert_matches_dense_pruned_model(tmp_path, format, pattern):
    dense = prune_linears(tiny_bert(), 0.9, pattern)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, tmp_path / "bert.safetensors")
    convert_checkpoint(tmp_path / "bert.safetensors", tmp_path / "sparse.safetensors", format=format)
    model = sparsify(tiny_bert(seed=1), tmp_path / "sparse.safetensors")
    n_sparse = sum(isinstance(m, SparseLinear) for m in model.modules())
    assert n_sparse == sum(isinstance(m, nn.Linear) for m in dense.modules())  # every linear is pruned
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sparsify_by_default_runs_dense_where_an_injected_timer_says_sparse_is_slower():
    dense = prune_linears(tiny_bert(), 0.9)
    sd = {k: (CSR.from_dense(v) if v.dim() == 2 and "encoder" in k else v) for k, v in dense.state_dict().items()}
    slow_sparse = lambda fns, device: {k: (1.0 if k == "dense" else 2.0) for k in fns}
    model = sparsify(tiny_bert(seed=1), sd, timer=slow_sparse, cache=PlanCache(None))
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():  # dense F.linear on the same weights: bit for bit the dense model
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=0)
    rows = plan_rows(model)
    assert len(rows) == sum(isinstance(m, SparseLinear) for m in model.modules()) > 0
    assert all(r["routes"][8]["choice"] == "dense" and r["routes"][1] is None for r in rows)  # 5 tokens: bucket 8


def test_sparsify_plans_are_cached_on_disk_and_pinning_measures_nothing(tmp_path, capsys):
    dense = prune_linears(tiny_bert(), 0.9)
    sd = {k: (CSR.from_dense(v) if v.dim() == 2 and "encoder" in k else v) for k, v in dense.state_dict().items()}
    fast_torch = lambda fns, device: {k: (0.1 if k.endswith(":torch") else 1.0) for k in fns}
    first = sparsify(tiny_bert(seed=1), sd, timer=fast_torch, cache=PlanCache(tmp_path / "plans.json"),
                     batches=(1, 300), verbose=True)
    assert "-> csr:torch (10.00x of dense), measured" in capsys.readouterr().err
    def no_timing(fns, device):
        raise AssertionError("a cached plan was measured again")
    again = sparsify(tiny_bert(seed=1), sd, timer=no_timing, cache=PlanCache(tmp_path / "plans.json"), batches=(1,))
    assert [r["routes"][1] for r in plan_rows(again)] == [r["routes"][1] for r in plan_rows(first)]
    pinned = sparsify(tiny_bert(seed=1), sd, kernel="ours", timer=no_timing)
    ids = torch.randint(0, 100, (8, 20))  # 160 tokens: bucket 256
    with torch.no_grad():
        want = dense(input_ids=ids).last_hidden_state
        for model in (first, pinned):
            torch.testing.assert_close(model(input_ids=ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    assert plan_rows(pinned) == []
    with pytest.raises(ValueError, match="unknown kernel 'fast'; allowed: auto, ours, torch"):
        sparsify(tiny_bert(seed=1), sd, kernel="fast")


def test_sparsify_rejects_a_checkpoint_for_another_model():
    sd = {"nope.weight": CSR.from_dense(torch.zeros(4, 4))}
    with pytest.raises(ValueError, match="does not fit the model: 1 unexpected and 2 missing tensors, e.g. .nope.weight."):
        sparsify(nn.Sequential(nn.Linear(4, 4)), sd)


# --- user traps: the output and its source, overwriting, nothing sparse, model folders, buffers, Conv1D ---

def snapshot(root):
    """Every file under ``root`` (hidden ones too) -> its bytes: what a refused conversion must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _symlink_to_source(tmp_path, src):
    (tmp_path / "link.safetensors").symlink_to(src)
    return tmp_path / "link.safetensors"


OWN_SOURCE = {  # case -> (source kind, output from (tmp_path, source), overwrite)
    "the source's own weights file": ("hf", lambda tmp, src: src / "model.safetensors", False),
    "the same, with overwrite": ("hf", lambda tmp, src: src / "model.safetensors", True),
    "a new file inside the source folder": ("hf", lambda tmp, src: src / "sparse.safetensors", False),
    "a new folder inside the source folder": ("hf-sharded", lambda tmp, src: src / "sparse", False),
    "the source folder itself": ("hf", lambda tmp, src: src, True),
    "the source file itself": ("safetensors", lambda tmp, src: src, True),
    "the source file through a link": ("safetensors", _symlink_to_source, True),
    "a shard of an index file's folder": ("hf-sharded", lambda tmp, src: src / "a.safetensors", True),
    "a folder holding the source file": ("safetensors", lambda tmp, src: tmp, True),
    "a folder holding the source folder": ("hf", lambda tmp, src: tmp, True),
}


@pytest.mark.parametrize("case", sorted(OWN_SOURCE))
def test_an_output_that_could_replace_its_source_is_refused_naming_both(tmp_path, case):
    kind, output, overwrite = OWN_SOURCE[case]
    src = write(tmp_path, state(), kind)
    dst = output(tmp_path, src)
    named = src  # the source the message names: an index file's folder is its source folder
    if case == "a shard of an index file's folder":
        src = src / "model.safetensors.index.json"
    (tmp_path / "out").mkdir()  # any output folder at all: a "folder holding the source" may not be replaced
    (tmp_path / "out" / SPARSE_INDEX).write_text("{}")
    if case.startswith("a folder holding"):
        (dst / SPARSE_INDEX).write_text("{}")  # looks like a sparse checkpoint: overwrite would replace it
    before = snapshot(tmp_path)
    first, second = (src, dst) if case.startswith("a folder holding") else (dst, named)
    with pytest.raises(ValueError, match=f"{re.escape(str(first))} .*{re.escape(str(second))}"):
        convert_checkpoint(src, dst, overwrite=overwrite)
    assert snapshot(tmp_path) == before  # the source intact, nothing written, no temporary file


@pytest.mark.parametrize("out", ["o.safetensors", "out"])
def test_an_existing_output_is_kept_unless_overwrite(tmp_path, out):
    sd = state()
    src, dst = write(tmp_path, sd, "pt"), tmp_path / out
    convert_checkpoint(src, dst)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=f"{re.escape(str(dst))} .*overwrite=True") as refused:
        convert_checkpoint(src, dst, embeddings=True, min_sparsity=0.0)
    assert isinstance(refused.value, ValueError) and snapshot(tmp_path) == before
    convert_checkpoint(src, dst, embeddings=True, min_sparsity=0.0, overwrite=True)  # a different output
    assert isinstance(load_sparse_state_dict(dst)["emb.embeddings.weight"], CSR)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.pt", out])  # no temporary file, no old copy left
    dense = load_sparse_state_dict(dst, dense=True)
    assert all(torch.equal(dense[k], v) for k, v in sd.items())


def test_overwrite_never_replaces_a_folder_that_is_not_a_sparse_checkpoint(tmp_path):
    src = write(tmp_path, state(), "pt")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'notes'))} is not empty and holds no "
                                         f"{re.escape(SPARSE_INDEX)}"):
        convert_checkpoint(src, tmp_path / "notes", overwrite=True)
    assert snapshot(tmp_path / "notes") == {"todo.txt": b"keep me"}


@pytest.mark.parametrize("out", ["o.safetensors", "out"])
def test_a_failed_overwrite_keeps_the_previous_output(tmp_path, out):
    src = write(tmp_path, state(), "pt")
    convert_checkpoint(src, tmp_path / out)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"fc1.weight: weight of shape \(256, 128\) is not 2:4"):
        convert_checkpoint(src, tmp_path / out, format="2:4", overwrite=True)
    assert snapshot(tmp_path) == before


def _pre_finalize_state():
    """A model saved with its Pruner attached: dense ``...parametrizations.weight.original`` tensors."""
    from prune import Pruner

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    Pruner(model, sparsity=0.9).step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


NOTHING_SPARSE = {  # case -> (state, min_sparsity, what the message says: sparsest weight; likely cause)
    "unpruned": (lambda: {"fc.weight": torch.randn(64, 64), "fc.bias": torch.randn(64)}, None,
                 r"\(the sparsest 2-D weight is 0.0% zeros\); likely the model is unpruned, or it was saved "
                 + r"before Pruner.finalize\(\)"),
    "saved before finalize": (_pre_finalize_state, None,
                              r"\(the sparsest 2-D weight is 0.0% zeros\); likely it was saved before "
                              + r"Pruner.finalize\(\): its keys hold parametrizations"),
    "min_sparsity too high": (lambda: {"fc.weight": unstructured((64, 64), 0.9)}, 0.99,
                              r"\(the sparsest 2-D weight is [89]\d.\d% zeros\); likely .*, "
                              + r"or min_sparsity=0.99 is too high"),
}


@pytest.mark.parametrize("out", ["o.safetensors", "out"])
@pytest.mark.parametrize("case", sorted(NOTHING_SPARSE))
def test_a_checkpoint_with_nothing_sparse_is_refused_unless_allow_dense(tmp_path, case, out):
    make, min_sparsity, cause = NOTHING_SPARSE[case]
    sd = make()
    src = write(tmp_path, sd, "pt")
    with pytest.raises(ValueError, match=rf"nothing to convert: none of the {len(sd)} tensors is sparse enough "
                                         rf"for csr storage {cause}.*allow_dense=True"):
        convert_checkpoint(src, tmp_path / out, min_sparsity=min_sparsity)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]  # no output, no temporary file
    with pytest.warns(UserWarning, match=rf"nothing to convert: .*{cause}.*written anyway"):
        s = convert_checkpoint(src, tmp_path / out, min_sparsity=min_sparsity, allow_dense=True)
    assert (s.tensors, s.converted) == (len(sd), 0)
    assert all(torch.equal(v, sd[k]) for k, v in load_sparse_state_dict(tmp_path / out).items())


MODEL_FOLDER_FILES = {  # everything but weights is copied, byte for byte
    "config.json": b'{"model_type": "bert"}', "generation_config.json": b"{}", "tokenizer.json": b'{"v": 1}',
    "tokenizer_config.json": b"{}", "special_tokens_map.json": b"{}", "vocab.txt": b"[PAD]\nhello\n",
    "vocab.json": b'{"a": 0}', "merges.txt": b"#version: 0.2\na b\n", "spiece.model": bytes(range(256)),
    "added_tokens.json": b"{}", "chat_template.jinja": b"{{ messages }}", "preprocessor_config.json": b"{}",
    "README.md": b"# a model\n",
}
NOT_COPIED = ("training_args.bin", "optimizer.pt", "tf_model.h5", "flax_model.msgpack", "pytorch_model.bin.index.json")


@pytest.mark.parametrize("kind", ["hf", "hf-sharded"])
def test_a_model_folder_converted_to_a_folder_keeps_config_and_tokenizer_files(tmp_path, kind):
    sd = state()
    src = write(tmp_path, sd, kind)
    for name, data in {**MODEL_FOLDER_FILES, **{n: b"dense weights" for n in NOT_COPIED}}.items():
        (src / name).write_bytes(data)
    (src / "runs").mkdir()  # subfolders (training logs, checkpoints) are not copied
    (src / "runs" / "log.txt").write_text("step 1")
    s = convert_checkpoint(src, tmp_path / "out")
    copied = {k: v for k, v in snapshot(tmp_path / "out").items() if not k.startswith("model")}
    assert copied == MODEL_FOLDER_FILES and s.copied == tuple(sorted(MODEL_FOLDER_FILES))
    n = 1 if kind == "hf" else 2
    shards = [f"model-{k:05d}-of-{n:05d}.sparse.safetensors" for k in range(1, n + 1)]
    assert sorted(set(os.listdir(tmp_path / "out")) - set(copied)) == [*shards, SPARSE_INDEX]
    dense = load_sparse_state_dict(tmp_path / "out", dense=True)
    assert all(torch.equal(dense[k], v) for k, v in sd.items())


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8), persistent=False)
        self.register_buffer("table", torch.zeros(3), persistent=False)

    def forward(self, x):
        return self.fc(x) * self.scale


def test_checkpoint_keys_of_non_persistent_buffers_are_copied_or_skipped():
    w = unstructured((8, 8), 0.9)
    sd = {"fc.weight": CSR.from_dense(w), "fc.bias": torch.zeros(8), "scale": torch.full((8,), 2.0),
          "table": torch.ones(5)}  # scale fits: copied; table does not: skipped
    model = sparsify(WithBuffers(), sd)
    assert isinstance(model.fc, SparseLinear)
    assert torch.equal(model.scale, torch.full((8,), 2.0)) and torch.equal(model.table, torch.zeros(3))
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), 2.0 * (x @ w.t()), rtol=1e-5, atol=1e-5)


def test_sparsify_a_bert_checkpoint_that_holds_position_ids(tmp_path):
    dense = prune_linears(tiny_bert(), 0.9)
    sd = {k: v.contiguous() for k, v in dense.state_dict().items()}
    assert "embeddings.position_ids" not in sd  # a non-persistent buffer in current transformers
    sd["embeddings.position_ids"] = torch.arange(32)[None]  # as older transformers saved it
    save_file(sd, tmp_path / "bert.safetensors")
    convert_checkpoint(tmp_path / "bert.safetensors", tmp_path / "sparse.safetensors")
    model = sparsify(tiny_bert(seed=1), tmp_path / "sparse.safetensors")
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def prune_conv1d(model, pattern):
    """90% of each Conv1D weight (in, out) zero, or 2:4 along its stored last dimension (out)."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Conv1D):
                w = m.weight
                if pattern == "2:4":
                    g = w.abs().reshape(w.shape[0], -1, 4)
                    w.copy_(w.reshape(g.shape).scatter(-1, g.argsort(-1)[..., :2], 0.0).reshape(w.shape))
                else:
                    w.masked_fill_(torch.rand(w.shape) < 0.9, 0.0)
    return model


@pytest.mark.parametrize("format,pattern", [("csr", "unstructured"), ("auto", "unstructured"), ("2:4", "2:4")])
def test_sparsify_loads_gpt2_conv1d_layers_sparse(tmp_path, format, pattern):
    from transformers.pytorch_utils import Conv1D

    dense = prune_conv1d(tiny_gpt2(), pattern)
    dense.save_pretrained(tmp_path / "dense")  # no lm_head.weight: tied to the token embedding
    convert_checkpoint(tmp_path / "dense", tmp_path / "sparse.safetensors", format=format)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sparsify(tiny_gpt2(seed=1), tmp_path / "sparse.safetensors")
    ours = [str(w.message) for w in caught if str(w.message).startswith("sparsify")]
    layers = [n for n, m in dense.named_modules() if isinstance(m, Conv1D)]
    assert len(layers) == 8 and all(isinstance(model.get_submodule(n), SparseLinear) for n in layers)
    if format == "2:4":  # the (out, in) transpose of a weight 2:4 along out is not 2:4: csr, said once
        assert len(ours) == 1 and ours[0].startswith("sparsify: 8 sparse weight(s) change format: ")
        assert all(f"{n}.weight: loads as csr: its (out, in) transpose is not 2:4" in ours[0] for n in layers)
    else:
        assert ours == []
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (0, 4), (4, 0), (40000, 3), (6, 6)])
def test_transpose_csr_equals_the_dense_transpose(shape):
    from sparse_ops.formats import csr_col_dtype
    from sparse_ops.loading import transpose_csr

    w = unstructured(shape, 0.7) if 0 not in shape else torch.zeros(shape)
    if shape == (6, 6):
        w[2] = 0.0  # an empty row and column
        w[:, 4] = 0.0
    t = transpose_csr(CSR.from_dense(w)).validate()
    assert t.shape == shape[::-1] and t.col_indices.dtype == csr_col_dtype(shape[0])
    assert torch.equal(t.to_dense(), w.t())


def test_sparse_weights_of_other_layers_load_dense_with_a_warning_naming_them():
    dense = prune_linears(tiny_bert(), 0.9)
    with torch.no_grad():
        emb = dense.embeddings.word_embeddings.weight
        emb.masked_fill_(torch.rand(emb.shape) < 0.9, 0.0)
    sd = dict(dense.state_dict())
    sd["embeddings.word_embeddings.weight"] = CSR.from_dense(emb.detach().clone())
    with pytest.warns(UserWarning, match=r"^sparsify: 1 sparse weight\(s\) load dense: "
                                         r"embeddings.word_embeddings.weight: Embedding has no sparse layer$"):
        model = sparsify(tiny_bert(seed=1), sd)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
