"""The `prune` command line: version, errors as one line with a non-zero exit, the demo."""
import subprocess
import sys

import prune
from prune.cli import main


def test_version_via_python_m():
    out = subprocess.run([sys.executable, "-m", "prune", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"prune {prune.__version__}"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: prune" in capsys.readouterr().err


def test_user_error_is_one_line(capsys, tmp_path):
    assert main(["demo", "--runs", "dense,random", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown run(s) ['random']" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_only_user_errors_become_one_line(monkeypatch, capsys):
    """A UserError prints one line and exits 2; anything else (a bug, ours or a library's) keeps its traceback."""
    import pytest

    from prune import cli
    from sparse_ops.errors import UserValueError

    def command(error):
        def run(args):
            raise error
        return run

    help_, add, _ = cli.COMMANDS["eval"]
    monkeypatch.setitem(cli.COMMANDS, "eval", (help_, add, command(UserValueError("bad value 3; use 1 or 2"))))
    assert main(["eval", "m", "--text", "t.txt"]) == 2
    assert capsys.readouterr().err == "prune eval: error: bad value 3; use 1 or 2\n"
    for bug in (KeyError("x"), ValueError("an internal check"), RuntimeError("a library's"), OSError("disk")):
        monkeypatch.setitem(cli.COMMANDS, "eval", (help_, add, command(bug)))
        with pytest.raises(type(bug)):
            main(["eval", "m", "--text", "t.txt"])
