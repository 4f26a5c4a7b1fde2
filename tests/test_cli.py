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


def test_user_error_is_one_line(capsys):
    assert main(["demo", "--steps", "5", "--criterion", "random"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown criterion 'random'" in err and "Traceback" not in err


def test_demo_runs_and_prints_report(capsys):
    assert main(["demo", "--steps", "40", "--sparsity", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "0.8000" in out and "test accuracy" in out
