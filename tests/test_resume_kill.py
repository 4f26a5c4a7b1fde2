"""A pruning run killed by a signal partway resumes from its last atomic checkpoint and ends bit-identical."""
import os
import signal
import subprocess
import sys
import time

import torch

JOB = os.path.join(os.path.dirname(__file__), "_train_job.py")


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}


def _saved_step(path):
    try:
        return torch.load(path, weights_only=True)["pruner"]["step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def test_killed_run_resumes_bit_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    subprocess.run([sys.executable, JOB, "--steps", "60", "--ckpt-dir", str(ref), "--out", str(ref / "final.pt")],
                   check=True, env=_env(), timeout=300)
    proc = subprocess.Popen([sys.executable, JOB, "--steps", "60", "--ckpt-dir", str(run), "--save-every", "3",
                             "--step-delay", "0.05", "--out", str(run / "never.pt")], env=_env())
    latest = run / "latest.pt"
    deadline = time.time() + 240
    while _saved_step(latest) < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # may land in the middle of a save: "latest" must stay intact
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (run / "never.pt").exists()
    stopped_at = _saved_step(latest)
    assert 12 <= stopped_at < 60 and stopped_at % 3 == 0
    subprocess.run([sys.executable, JOB, "--steps", "60", "--ckpt-dir", str(run), "--resume",
                    "--out", str(run / "final.pt")], check=True, env=_env(), timeout=300)
    a = torch.load(ref / "final.pt", weights_only=True)
    b = torch.load(run / "final.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["pruner"]["masks"].items():
        assert torch.equal(v, b["pruner"]["masks"][k])
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k])), (i, k)
