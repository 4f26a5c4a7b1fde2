"""Peak resident memory of ``prune convert`` on a large synthetic checkpoint, against the bound
``baseline + 3 x largest tensor`` (baseline: a process that imports the package and does nothing).

A safetensors file of ``--total-gb`` (default 3 GB) is written to a temporary folder, one tensor at a time:
2-D fp32 weights with ``--sparsity`` exact zeros, the largest ``--largest-mb``. ``prune convert`` then runs in
its own process, which reports its own peak resident memory (``VmHWM``; file pages included where a reader
maps the file) just before it exits; the baseline is the same for a process that only imports
the package. The folder is deleted afterwards, also on failure. Rows go to
``benchmarks/results/convert_memory/`` (CSV + JSON).

    python -m benchmarks.convert_memory                     # ~3 GB, a few minutes on 2 cores
    python -m benchmarks.convert_memory --total-gb 0.1 --largest-mb 40 --out /tmp/cm

Example:
    >>> plan_shapes(total_bytes=100 * 2**20, largest_bytes=40 * 2**20)
    [(2560, 4096), (1280, 4096), (1280, 4096), (1280, 4096)]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparse_ops.tensorio import SafetensorsWriter

COLS = 4096  # in_features of every synthetic weight; rows set the size
RESULTS = Path(__file__).resolve().parent / "results" / "convert_memory"
# A measured process: `prune <args>` through the CLI's own main (no args: the imports only, the baseline);
# prints [exit code, its peak RSS in KiB]: VmHWM, the high-water mark of this process image. (ru_maxrss is
# not used: Linux carries it over fork + exec, so a child of a large parent reports the parent's size.)
CHILD = ("import json, sys\n"
         "import prune.cli, sparse_ops.checkpoint\n"
         "rc = prune.cli.main(sys.argv[1:]) if len(sys.argv) > 1 else 0\n"
         "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]\n"
         "print(json.dumps([rc, int(hwm[0])]))")


@dataclass(frozen=True)
class MemoryRow:
    """One measured conversion; bytes throughout (RSS in bytes, from ru_maxrss KiB)."""

    format: str
    file_bytes: int
    tensors: int
    largest_bytes: int
    sparsity: float
    baseline_rss: int
    peak_rss: int
    seconds: float

    @property
    def bound(self) -> int:
        return self.baseline_rss + 3 * self.largest_bytes

    @property
    def extra_over_largest(self) -> float:
        """(peak - baseline) / largest tensor: the bound allows 3.0."""
        return (self.peak_rss - self.baseline_rss) / self.largest_bytes

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "bound": self.bound, "extra_over_largest": round(self.extra_over_largest, 3),
                "holds": self.peak_rss <= self.bound}


def plan_shapes(total_bytes: int, largest_bytes: int) -> list[tuple[int, int]]:
    """(rows, COLS) fp32 shapes adding up to about ``total_bytes``: the largest, then pieces half its size."""
    row_bytes = 4 * COLS
    big = max(1, largest_bytes // row_bytes)
    shapes, left = [(big, COLS)], total_bytes // row_bytes - big  # left: rows still to place
    while left > 0:
        rows = min(max(1, big // 2), left)
        shapes.append((rows, COLS))
        left -= rows
    return shapes


def write_checkpoint(path: Path, shapes: list[tuple[int, int]], sparsity: float, seed: int = 0) -> int:
    """Stream sparse random fp32 weights ``layers.<i>.weight`` into a safetensors file; returns its bytes."""
    gen = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(path) as writer:
        for i, (rows, cols) in enumerate(shapes):
            w = torch.empty(rows, cols)
            for r in range(0, rows, 1024):  # fill in blocks: the scratch stays small
                block = torch.randn(min(1024, rows - r), cols, generator=gen)
                w[r:r + 1024] = block.masked_fill_(torch.rand(block.shape, generator=gen) < sparsity, 0.0)
            writer.add(f"layers.{i}.weight", w)
            del w
        writer.commit({})
    return path.stat().st_size


def peak_rss(cli_args: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of a fresh process running ``prune <cli_args>`` (none: only the imports).

    The child reports its own peak before it exits: a torch process's RSS jumps by ~130 MB during interpreter
    shutdown, which a parent's RUSAGE_CHILDREN (or ``/usr/bin/time``) would count in both the baseline and the
    run, hiding that much of the conversion's own memory. Linux only (``/proc/self/status``).
    """
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *cli_args], capture_output=True, text=True,
                          check=True)
    seconds = time.perf_counter() - start
    rc, kib = json.loads(proc.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise RuntimeError(f"prune {' '.join(cli_args)} exited {rc}: {proc.stderr.strip()[-500:]}")
    return kib * 1024, seconds


def measure(src: Path, dst: Path, format: str, shapes: list[tuple[int, int]], sparsity: float) -> MemoryRow:
    """Baseline and ``prune convert`` peaks for one format (the output is removed afterwards)."""
    baseline, _ = peak_rss([])
    peak, seconds = peak_rss(["convert", str(src), "-o", str(dst), "--format", format])
    dst.unlink()
    largest = max(r * c for r, c in shapes) * 4
    return MemoryRow(format, src.stat().st_size, len(shapes), largest, sparsity, baseline, peak, seconds)


def run(total_bytes: int, largest_bytes: int, sparsity: float, formats: list[str],
        workdir: str | None = None) -> list[MemoryRow]:
    """Write the checkpoint in a temporary folder, measure each format, delete the folder."""
    tmp = Path(tempfile.mkdtemp(prefix="convert_memory.", dir=workdir))
    try:
        shapes = plan_shapes(total_bytes, largest_bytes)
        write_checkpoint(tmp / "model.safetensors", shapes, sparsity)
        return [measure(tmp / "model.safetensors", tmp / "sparse.safetensors", f, shapes, sparsity)
                for f in formats]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_results(rows: list[MemoryRow], out: Path, args: dict[str, object]) -> None:
    from sparse_ops.bench.output import write_json
    from sparse_ops.timing import environment

    out.mkdir(parents=True, exist_ok=True)
    dicts = [r.as_dict() for r in rows]
    with open(out / "convert_memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
        writer.writeheader()
        writer.writerows(dicts)
    write_json(out / "convert_memory.json", {"command": "python -m benchmarks.convert_memory", "args": args,
                                             "environment": environment("cpu"), "rows": dicts})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total-gb", type=float, default=3.0, help="checkpoint size in GB (default 3)")
    p.add_argument("--largest-mb", type=float, default=800.0, help="largest tensor in MB (default 800)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--formats", default="csr,auto", help="comma-separated convert formats (default csr,auto)")
    p.add_argument("--workdir", default=None, help="where the temporary folder goes (default: $TMPDIR)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    need = args.total_gb * 1e9 * 1.4  # source + output + the writer's temporary data file
    free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free
    if free < need:
        print(f"convert_memory: needs {need / 1e9:.1f} GB free, {free / 1e9:.1f} GB left", file=sys.stderr)
        return 2
    rows = run(int(args.total_gb * 1e9), int(args.largest_mb * 1e6), args.sparsity, args.formats.split(","),
               args.workdir)
    write_results(rows, args.out, {k: str(v) for k, v in vars(args).items()})
    for r in rows:
        print(f"{r.format}: {r.file_bytes / 1e9:.2f} GB file, largest tensor {r.largest_bytes / 1e6:.0f} MB; "
              f"peak RSS {r.peak_rss / 1e6:.0f} MB, baseline {r.baseline_rss / 1e6:.0f} MB -> "
              f"{r.extra_over_largest:.2f} x largest over baseline (bound 3.00: "
              f"{'holds' if r.peak_rss <= r.bound else 'FAILS'}), {r.seconds:.0f} s")
    return 0 if all(r.peak_rss <= r.bound for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
