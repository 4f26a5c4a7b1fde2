"""`prune convert` / `prune inspect` end to end: summaries, tables, and one stderr line + exit 2 on bad input."""
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from prune.cli import EXIT_USER_ERROR, main
from tests.test_formats import unstructured


@pytest.fixture
def dense_file(tmp_path):
    sd = {"fc.weight": unstructured((256, 256), 0.9), "fc.bias": torch.randn(256), "head.weight": torch.randn(8, 256)}
    save_file(sd, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


def test_convert_prints_summary_and_inspect_lists_tensors(tmp_path, dense_file, capsys):
    assert main(["convert", str(dense_file), "-o", str(tmp_path / "s.safetensors"), "--format", "csr"]) == 0
    out = capsys.readouterr().out
    assert "converted 1 of 3 tensors to csr" in out and "MB ->" in out and "of dense" in out
    assert main(["inspect", str(tmp_path / "s.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(ln.split() for ln in lines if ln.startswith("fc.weight"))
    assert row[1:4] == ["256x256", "csr", "float32"] and 85.0 < float(row[4].rstrip("%")) < 95.0
    assert lines[-1].startswith("total: 3 tensors,")
    assert main(["inspect", str(dense_file)]) == 0
    assert "fc.weight" in capsys.readouterr().out


def _truncate(tmp_path, dense_file):
    data = dense_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.safetensors"


def _garbage_pt(tmp_path, _):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    return tmp_path / "junk.pt"


def _wrong_type(tmp_path, _):
    (tmp_path / "notes.txt").write_text("hello")
    return tmp_path / "notes.txt"


def _not_a_state_dict(tmp_path, _):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    return tmp_path / "list.pt"


def _evil(tmp_path, _):
    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    return tmp_path / "evil.pt"


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


BAD_INPUTS = {
    "missing file": (lambda tmp, f: tmp / "nope.safetensors", [], "no such file or directory"),
    "truncated": (_truncate, [], "cannot read .*cut.safetensors: .*a truncated file"),
    "garbage .pt": (_garbage_pt, [], "cannot read .*junk.pt"),
    "wrong type": (_wrong_type, [], "unsupported file type 'notes.txt'"),
    "not a state dict": (_not_a_state_dict, [], "holds a list, not a state dict"),
    "malicious pickle": (_evil, [], "refusing to load .*weights_only"),
    "not 2:4": (lambda tmp, f: f, ["--format", "2:4"], "fc.weight: weight of shape \\(256, 256\\) is not 2:4: \\d+ of"),
    "unknown format": (lambda tmp, f: f, ["--format", "bsr"], "unknown format 'bsr'; allowed: csr, 2:4, dense-int8, csr-int8, bitmap-int8, auto"),
    "bad sparsity": (lambda tmp, f: f, ["--min-sparsity", "1.5"], "min_sparsity must be in \\[0, 1\\], got 1.5"),
    "directory not a model": (lambda tmp, f: tmp / "d", [], "is not a Hugging Face model directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_file(tmp_path, dense_file, capsys, monkeypatch, case):
    make, extra, message = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    src = make(tmp_path, dense_file)
    before = set(os.listdir(tmp_path))
    code = main(["convert", str(src), "-o", str(tmp_path / "out.safetensors"), *extra])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert len(err.strip().splitlines()) == 1 and err.startswith("prune convert: error: ")
    assert re.search(message, err), err
    assert set(os.listdir(tmp_path)) == before  # no output, no temporary file, no pickle side effect


def test_inspect_bad_file_and_no_traceback_in_a_real_process(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json here!}")
    proc = subprocess.run([sys.executable, "-m", "prune", "inspect", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("prune inspect: error: cannot read") and len(proc.stderr.splitlines()) == 1


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    path = tmp_path / "many.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(2, 2) for i in range(5000)}, str(path))  # more than a pipe holds
    # head reads one line and exits: every later write of ours meets a closed pipe
    done = subprocess.run(f"{sys.executable} -m prune inspect {path} | head -1", shell=True, capture_output=True,
                          text=True, timeout=120, executable="/bin/bash")
    assert done.stdout.startswith("name") and done.stderr == ""
    status = subprocess.run(f"set -o pipefail; {sys.executable} -m prune inspect {path} | head -1 > /dev/null",
                            shell=True, executable="/bin/bash", timeout=120)
    assert status.returncode == 0


def test_inspect_columns_fit_long_names(tmp_path, capsys):
    long = "model.encoder.layers.11.self_attention.linear_qkv.weight_with_a_long_suffix"
    save_file({long: torch.zeros(3, 4), "b": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {line.index("3x4") if "3x4" in line else line.index("2 ") for line in lines[1:3]}
    assert len(starts) == 1 and lines[0].index("shape") in starts  # the shape column lines up


# --- user traps: own source, overwriting, nothing sparse, model folders ---

def _hf_folder(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    save_file({"fc.weight": unstructured((256, 256), 0.9), "fc.bias": torch.randn(256)}, d / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        (d / name).write_text(f"{name} of the model")
    return d


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_convert_refuses_to_write_into_its_own_source_folder(tmp_path, capsys):
    src = _hf_folder(tmp_path)
    before = _files(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(src), "-o", str(src / "model.safetensors"), *extra]) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(
            f"prune convert: error: output {src / 'model.safetensors'} lies inside the source folder {src}"), err
    assert _files(tmp_path) == before  # the source checkpoint is intact


def test_convert_keeps_an_existing_output_unless_overwrite(tmp_path, dense_file, capsys):
    out = tmp_path / "s.safetensors"
    assert main(["convert", str(dense_file), "-o", str(out)]) == 0
    first = out.read_bytes()
    assert main(["convert", str(dense_file), "-o", str(out), "--format", "auto", "--embeddings",
                 "--min-sparsity", "0"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == f"prune convert: error: output {out} exists; pass overwrite=True (CLI: --overwrite) to replace " \
                  f"it, or choose another path\n" and out.read_bytes() == first
    assert main(["convert", str(dense_file), "-o", str(out), "--min-sparsity", "0", "--overwrite"]) == 0
    assert "converted 2 of 3 tensors" in capsys.readouterr().out and out.read_bytes() != first
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "s.safetensors"]


def test_convert_of_a_checkpoint_with_nothing_sparse_fails_unless_allow_dense(tmp_path, capsys):
    save_file({"fc.weight": torch.randn(64, 64), "fc.bias": torch.randn(64)}, tmp_path / "dense.safetensors")
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(tmp_path / "dense.safetensors"), "-o", str(tmp_path / "s.safetensors")]) \
        == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert re.match(r"prune convert: error: nothing to convert: .* likely the model is unpruned, or it was saved "
                    r"before Pruner.finalize\(\) .*--allow-dense", captured.err), captured.err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    assert main(["convert", str(tmp_path / "dense.safetensors"), "-o", str(tmp_path / "s.safetensors"),
                 "--allow-dense"]) == 0
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith(
        "prune convert: warning: nothing to convert: "), captured.err
    assert "converted 0 of 2 tensors" in captured.out and (tmp_path / "s.safetensors").is_file()


def test_convert_of_a_model_folder_to_a_folder_copies_its_config_and_tokenizer(tmp_path, capsys):
    src = _hf_folder(tmp_path)
    assert main(["convert", str(src), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "copied 3 other files of the model folder: config.json, tokenizer.json, vocab.txt" in out
    copied = _files(tmp_path / "out")
    assert all(copied[name] == data for name, data in _files(src).items() if name != "model.safetensors")
    assert sorted(copied) == ["config.json", "model-00001-of-00001.sparse.safetensors",
                              "model.sparse.safetensors.index.json", "tokenizer.json", "vocab.txt"]


def test_output_folder_name_with_a_dot_is_a_folder(tmp_path, dense_file, capsys):
    assert main(["convert", str(dense_file), "-o", str(tmp_path / "s0.5")]) == 0
    assert (tmp_path / "s0.5" / "model.sparse.safetensors.index.json").is_file()
    assert main(["convert", str(dense_file), "-o", str(tmp_path / "model.pt")]) == EXIT_USER_ERROR
    assert "output must be a .safetensors file or a folder" in capsys.readouterr().err


def test_an_output_another_writer_claimed_meanwhile_is_never_replaced(tmp_path):
    """Two conversions to the same new output: the one that finishes second is refused and leaves no file."""
    from sparse_ops.checkpoint.output import replace_folder
    from sparse_ops.errors import OutputExistsError
    from sparse_ops.tensorio import SafetensorsWriter

    out = tmp_path / "out.safetensors"
    with SafetensorsWriter(out, overwrite=False) as writer:
        writer.add("x", torch.ones(2))
        out.write_bytes(b"the other writer's")  # finished first
        with pytest.raises(OutputExistsError, match="written by another process"):
            writer.commit({})
    assert out.read_bytes() == b"the other writer's" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    new, folder = tmp_path / "new", tmp_path / "folder"
    new.mkdir()
    (new / "a").write_text("mine")
    folder.mkdir()
    (folder / "b").write_text("theirs")
    with pytest.raises(OutputExistsError, match="written by another process"):
        replace_folder(new, folder, overwrite=False)
    assert [p.name for p in folder.iterdir()] == ["b"] and (new / "a").is_file()
    replace_folder(new, folder, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["a"] and not new.exists()
