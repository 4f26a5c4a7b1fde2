"""``prune bench``: sparse against dense on your shapes, your checkpoint and your machine (CPU or CUDA).

  prune bench matmul      [--shapes bert-base,4096x11008] [--sparsity 0.5,0.9] [--tokens 1,64] [--formats ...]
  prune bench families    dense FFN vs sparse FFN vs MoE vs gated heads at matched active parameters
  prune bench checkpoint  FILE [--tokens 1,64]: per layer and whole model, is sparsity worth it?

``--tokens`` is the number of rows of x per call (a batch of 4 sequences of 16 tokens is 64 tokens); the old
name ``--batch`` still works, hidden, with a deprecation notice on stderr, and the CSV column keeps the name
``batch`` so new results read like the committed ones. Each command prints a progress bar and a table; with
``--out DIR`` it writes ``<what>.csv`` (rows, as measured), ``<what>.json`` (command, arguments, environment,
status, summary) and ``<what>.png``. ``--max-seconds`` ends a sweep on time with what it measured, and the
status says so ("complete", or "stopped by --max-seconds S after N of M points"). Bad input is checked before
anything runs or is written.

This module is imported when ``prune`` builds its parser, so it imports torch and the engines lazily.

Example:
    >>> split_values(["1,8", "64"]), parse_floats(["0.5,0.9"], "--sparsity", 0.0, 1.0)
    (['1', '8', '64'], (0.5, 0.9))
    >>> parse_floats(["1.5"], "--sparsity", 0.0, 1.0)
    Traceback (most recent call last):
    ...
    sparse_ops.errors.UserValueError: --sparsity: 1.5 is not in [0.0, 1.0)
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sparse_ops.bench.shapes import BATCHES, SHAPE_SETS, SPARSITIES
from sparse_ops.errors import MissingPathError, UnavailableError, UserValueError

if TYPE_CHECKING:
    from sparse_ops.busy import Load

# "dense", every sparse_ops.formats.FORMATS name, each int8 one with int8 inputs (+in8), and "auto" (the layer
# sparsify() builds by default). Written out so that `prune --help` does not import torch; tests/test_bench.py
# checks it against sparse_ops.bench.matmul.FORMATS.
FORMAT_CHOICES = ("dense", "csr", "2:4", "dense-int8", "csr-int8", "bitmap-int8", "dense-int8+in8", "csr-int8+in8",
                  "bitmap-int8+in8", "auto")
DTYPE_CHOICES = ("fp32", "bf16", "fp16")


# --- parsing: every value checked before anything is measured or written ---

def split_values(values: Sequence[str]) -> list[str]:
    """``["1,8", "64"]`` -> ``["1", "8", "64"]``: lists may be given with commas, spaces or both."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def parse_floats(values: Sequence[str], option: str, lo: float, hi: float) -> tuple[float, ...]:
    """Floats in [lo, hi), in order, without repeats; ValueError naming the option and the bad value."""
    out = []
    for v in split_values(values):
        try:
            f = float(v)
        except ValueError:
            raise UserValueError(f"{option}: {v!r} is not a number") from None
        if not lo <= f < hi:
            raise UserValueError(f"{option}: {f} is not in [{lo}, {hi})")
        out.append(f)
    return tuple(dict.fromkeys(out))


def parse_ints(values: Sequence[str], option: str, lo: int = 1) -> tuple[int, ...]:
    """Integers >= lo, in order, without repeats."""
    out = []
    for v in split_values(values):
        if not v.isdigit() or int(v) < lo:
            raise UserValueError(f"{option}: {v!r} is not an integer >= {lo}")
        out.append(int(v))
    return tuple(dict.fromkeys(out))


def parse_choices(values: Sequence[str], option: str, allowed: Sequence[str]) -> tuple[str, ...]:
    out = split_values(values)
    for v in out:
        if v not in allowed:
            raise UserValueError(f"{option}: unknown value {v!r}; allowed: {', '.join(allowed)}")
    return tuple(dict.fromkeys(out))


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; RuntimeError when CUDA is asked for and absent."""
    import torch

    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserValueError(f"--device: unknown device {device!r}; allowed: cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnavailableError(f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False)")
    return device


TOKENS_HELP = "tokens (rows of x) per call"


class _DeprecatedName(argparse.Action):
    """An old option name, hidden from --help: stores like the new one and says so on stderr (one line)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated, use --{self.dest} (the same values: {TOKENS_HELP})",
              file=sys.stderr)
        setattr(namespace, self.dest, values)
        setattr(namespace, f"_{self.dest}_option", option_string)  # error messages name what the user typed


def _add_tokens(p: argparse.ArgumentParser, default: list[str] | None, help_: str) -> None:
    p.add_argument("--tokens", nargs="+", default=default, metavar="N", help=help_)
    p.add_argument("--batch", nargs="+", dest="tokens", action=_DeprecatedName, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


def _tokens_option(args: argparse.Namespace) -> str:
    return getattr(args, "_tokens_option", "--tokens")


def _common(p: argparse.ArgumentParser, repeats: int | None) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--out", type=Path, help="write <what>.csv, .json and .png into this folder")
    p.add_argument("--max-seconds", type=float, help="end the sweep on time, keeping what was measured")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed samples per candidate (default: {repeats or '11, quick: 5'})")


def _check_common(args: argparse.Namespace) -> None:
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise UserValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.threads is not None and args.threads < 1:
        raise UserValueError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        raise UserValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserValueError(f"--out {args.out} exists and is not a folder")
    check_device(args.device)


def _start(args: argparse.Namespace) -> dict[str, object]:
    """Apply --threads; the environment to write beside the results."""
    import torch

    from sparse_ops.timing import environment

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # on a shared machine 1 thread avoids waiting on a descheduled one
    env = environment(args.device)
    print(_title(env), file=sys.stderr)
    if not str(args.device).startswith("cuda") and not env["native_kernels"]:
        print("warning: our native CPU kernels are not in use (no compiler, SPARSE_OPS_NATIVE=0 or a refused "
              "SPARSE_OPS_ISA): 'csr' and '2:4' run torch's kernels", file=sys.stderr)
    return env


def _title(env: dict[str, object]) -> str:
    where = env.get("gpu", env["device"]) if str(env["device"]).startswith("cuda") else env["cpu"]
    isa = "" if str(env["device"]).startswith("cuda") else f", kernels {env.get('kernel_isa') or 'torch only'}"
    return f"{where} ({env['cores']} cores){isa}, {env['torch_threads']} threads, torch {env['torch']}, " \
           f"load {env.get('load_avg_1_5_15min')}, {env['date']}"


def _argv(args: argparse.Namespace) -> dict[str, object]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}


def _status(done: int, total: int, max_seconds: float | None) -> str:
    """"complete" when all ``total`` points were measured, else where the sweep stopped and why.

    >>> _status(74, 74, 60.0), _status(74, 120, 60.0)
    ('complete', 'stopped by --max-seconds 60 after 74 of 120 points')
    """
    if done >= total:
        return "complete"
    why = f" by --max-seconds {max_seconds:g}" if max_seconds is not None else ""
    return f"stopped{why} after {done} of {total} points"


def _drive(points: Iterator[list], files, total: int | None, desc: str,
           on_point: Callable[[list], None]) -> tuple[int, Load]:
    """Consume a sweep under a progress bar, writing each row as it comes; returns the points measured and the
    machine's load meanwhile (``sparse_ops.busy``; written to the results' header as "load")."""
    import dataclasses

    from tqdm import tqdm

    from sparse_ops.busy import Watch

    done = 0
    with Watch() as watch, tqdm(total=total, desc=desc, unit="point", file=sys.stderr, dynamic_ncols=True,
                                mininterval=0.5) as bar:
        for rows in points:
            on_point(rows)
            if files is not None:
                for r in rows:
                    files.add(dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r)
            done += 1
            bar.update(1)
    if files is not None:
        files.header["load"] = watch.load.to_dict()
    return done, watch.load


def _warn_busy(load: Load) -> None:
    if load.busy:
        print(f"warning: {load.advice()}", file=sys.stderr)


def _files(args: argparse.Namespace, stem: str, columns: Sequence[str], header: dict[str, object]):
    from contextlib import nullcontext

    from sparse_ops.bench.output import RunFiles

    return RunFiles(args.out, stem, columns, header) if args.out is not None else nullcontext()


# --- prune bench matmul ---

def add_matmul(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", default=["square-4096"],
                   help=f"OUTxIN weights and/or sets: {', '.join(SHAPE_SETS)} (default: square-4096)")
    p.add_argument("--sparsity", nargs="+", default=[",".join(map(str, SPARSITIES))],
                   help=f"fractions of zeros (default: {','.join(map(str, SPARSITIES))})")
    _add_tokens(p, [",".join(map(str, BATCHES))], f"{TOKENS_HELP} (default: {','.join(map(str, BATCHES))})")
    p.add_argument("--formats", nargs="+", default=[",".join(FORMAT_CHOICES)],
                   help=f"our layers to time against dense: {', '.join(FORMAT_CHOICES)} (default: all)")
    p.add_argument("--dtype", nargs="+", default=["fp32"], help=f"{', '.join(DTYPE_CHOICES)} (default: fp32)")
    p.add_argument("--no-anchors", dest="anchors", action="store_false",
                   help="skip torch CSR int64/int32, scipy (CPU) and torch 2:4 (CUDA)")
    _common(p, repeats=7)
    p.set_defaults(_bench=run_matmul)


def matmul_plan(args: argparse.Namespace):
    """The validated ``MatmulPlan`` of the arguments (ValueError naming a bad value)."""
    from sparse_ops.bench.matmul import MatmulPlan
    from sparse_ops.bench.shapes import shapes

    _check_common(args)
    formats = parse_choices(args.formats, "--formats", FORMAT_CHOICES)
    return MatmulPlan(shapes=tuple(shapes(split_values(args.shapes))),
                      sparsities=parse_floats(args.sparsity, "--sparsity", 0.0, 1.0),
                      batches=parse_ints(args.tokens, _tokens_option(args)),
                      dtypes=parse_choices(args.dtype, "--dtype", DTYPE_CHOICES),
                      formats=("dense", *(f for f in formats if f != "dense")), device=args.device,
                      anchors=args.anchors, repeats=args.repeats,
                      min_sample_s=0.01 if args.device.startswith("cuda") else 0.02)


def matmul_table(rows: list) -> str:
    """One line per point: dense ms, then each candidate's speedup ('!' marks an output off the reference)."""
    from sparse_ops.bench.matmul import DTYPES, TOLERANCE
    from sparse_ops.bench.output import table

    cands = list(dict.fromkeys(r.candidate for r in rows if r.candidate != "dense"))
    points: dict[tuple, dict] = {}
    for r in rows:
        points.setdefault((r.shape, r.dtype, r.sparsity, r.batch), {})[r.candidate] = r
    body = []
    for (shape, dtype, sparsity, batch), by in points.items():
        cells = [shape, dtype, f"{sparsity:g}", str(batch), f"{1e3 * by['dense'].median_s:.3f}"]
        for c in cands:
            r = by.get(c)
            bad = r is not None and r.max_rel_err > TOLERANCE[DTYPES[dtype]]
            cells.append("-" if r is None else f"{r.speedup:.2f}{'!' if bad else ''}"
                         + (f" ({r.auto_chose})" if r.auto_chose else ""))
        body.append(cells)
    return table(["shape", "dtype", "sparsity", "tokens", "dense ms", *(f"x {c}" for c in cands)], body)


def run_matmul(args: argparse.Namespace) -> int:
    import dataclasses

    from sparse_ops.bench.matmul import MATMUL_COLUMNS, sweep
    from sparse_ops.bench.plots import plot_speedup
    from sparse_ops.timing import Deadline

    plan = matmul_plan(args)
    env = _start(args)
    header = {"command": "prune bench matmul", "args": _argv(args), "plan": dataclasses.asdict(plan),
              "environment": env, "units": {"median_s": "seconds per call", "speedup": "dense median / median",
                                            "batch": TOKENS_HELP,
                                            "gbps": "(weight + input + output bytes) / median / 1e9",
                                            "limit": "dense weight bytes / candidate's weight bytes"}}
    rows, skipped = [], {}
    with _files(args, "matmul", MATMUL_COLUMNS, header) as files:
        points = _noting_skipped(sweep(plan, Deadline(args.max_seconds)), skipped)
        done, load = _drive(points, files, plan.points, "bench matmul", rows.extend)
        print(matmul_table(rows))
        _warn_spread([(r.p10_s, r.median_s, r.p90_s) for r in rows])
        _warn_busy(load)
        _print_skipped(skipped)
        if files is not None:
            plot_speedup([dict(dataclasses.asdict(r), group=f"{r.shape} {r.dtype}") for r in rows],
                         files.path(".png"), title=_title(env))
            files.finish(_status(done, plan.points, args.max_seconds), skipped=skipped)
            print(f"wrote {files.out}/matmul.csv, matmul.json, matmul.png")
    return 0


def _noting_skipped(points: Iterator[tuple[list, dict[str, str]]], skipped: dict[str, str]) -> Iterator[list]:
    for rows, why in points:
        skipped.update(why)
        yield rows


SPREAD_WARNING = 0.5  # (p90 - p10) / median above this: the timing says little


def _warn_spread(timings: list[tuple[float, float, float]]) -> None:
    """Warn (stderr) when measurements (p10, median, p90) spread too wide to trust their ratios."""
    wide = [t for t in timings if t[1] > 0 and (t[2] - t[0]) / t[1] > SPREAD_WARNING]
    if wide:
        worst = max((t[2] - t[0]) / t[1] for t in wide)
        print(f"warning: {len(wide)} of {len(timings)} measurements spread over {SPREAD_WARNING:.0%} of their "
              f"median (p10-p90; worst {worst:.0%}): the machine is busy or noisy; rerun idle or with more "
              f"--repeats before trusting those ratios", file=sys.stderr)


def _print_skipped(skipped: dict[str, str]) -> None:
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")


# --- prune bench families ---

def add_families(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small shapes (D=256), 1 and 64 tokens, 5 repeats")
    _add_tokens(p, None, "tokens per forward pass, split into sequences of at most 128 "
                         "(default: 1,8,64,256; quick: 1,64)")
    _common(p, repeats=None)
    p.set_defaults(_bench=run_families)


def families_config(args: argparse.Namespace):
    """The validated ``FamiliesConfig``: token counts above seq_len must be multiples of it (whole sequences)."""
    import dataclasses

    from sparse_ops.bench.families import QUICK, FamiliesConfig

    _check_common(args)
    cfg = QUICK if args.quick else FamiliesConfig()
    option = _tokens_option(args)
    if args.tokens:
        cfg = dataclasses.replace(cfg, batches=parse_ints(args.tokens, option))
    bad = [b for b in cfg.batches if b > cfg.seq_len and b % cfg.seq_len]
    if bad:
        raise UserValueError(f"{option}: {bad[0]} is above seq_len={cfg.seq_len} and not a multiple of it "
                         f"(allowed: up to {cfg.seq_len}, or a multiple of {cfg.seq_len})")
    return dataclasses.replace(cfg, repeats=args.repeats) if args.repeats else cfg


def families_table(rows: list[dict[str, object]]) -> str:
    from sparse_ops.bench.output import table

    return table(["tokens", "candidate", "active params", "median ms", "p10-p90 ms", "speedup", "vs"],
                 [[str(r["batch"]), r["name"], f"{r['active_params']:,}", f"{r['median_ms']:.3f}",
                   f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}", f"{r['speedup']:.2f}", r["baseline"]] for r in rows])


def run_families(args: argparse.Namespace) -> int:
    import dataclasses

    from sparse_ops.bench.families import FAMILIES_COLUMNS, UNITS, plot, sweep
    from sparse_ops.timing import Deadline

    cfg = families_config(args)
    env = _start(args)
    header = {"command": "prune bench families", "args": _argv(args), "config": dataclasses.asdict(cfg),
              "environment": env, "units": {"batch": TOKENS_HELP, **UNITS}}
    rows: list[dict[str, object]] = []
    with _files(args, "families", FAMILIES_COLUMNS, header) as files:
        done, load = _drive(sweep(cfg, args.device, Deadline(args.max_seconds)), files, len(cfg.batches),
                            "bench families", rows.extend)
        print(families_table(rows))
        _warn_spread([(r["p10_ms"], r["median_ms"], r["p90_ms"]) for r in rows])
        _warn_busy(load)
        if files is not None:
            plot(rows, env, files.path(".png"))
            files.finish(_status(done, len(cfg.batches), args.max_seconds))
            print(f"wrote {files.out}/families.csv, families.json, families.png")
    return 0


# --- prune bench checkpoint ---

def add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a checkpoint `prune convert` accepts: .safetensors (dense or sparse), "
                                ".pt/.bin, or a Hugging Face model folder")
    _add_tokens(p, ["1,64"], f"{TOKENS_HELP} (default: 1,64)")
    p.add_argument("--dtype", help=f"time in this dtype ({', '.join(DTYPE_CHOICES)}; default: as stored)")
    _common(p, repeats=5)
    p.set_defaults(_bench=run_checkpoint)


def checkpoint_table(rows: list, summary: list[dict[str, object]]) -> str:
    """One line per (layer, tokens): sparsity, dense ms, csr and 2:4 speedups, auto's choice; then the totals,
    labelled with how many of the checkpoint's linear layers they cover."""
    from sparse_ops.bench.output import table

    by: dict[tuple[str, int], dict] = {}
    for r in rows:
        by.setdefault((r.layer, r.batch), {})[r.candidate] = r
    body = [[layer, "x".join(map(str, (c["dense"].out_features, c["dense"].in_features))), c["dense"].dtype,
             c["dense"].stored_format, f"{c['dense'].sparsity:.3f}", str(batch), f"{1e3 * c['dense'].median_s:.3f}",
             *(f"{c[f].speedup:.2f}" if f in c else "-" for f in ("csr", "2:4")), c["dense"].auto_chose]
            for (layer, batch), c in by.items()]
    body += [[_whole_label(s), "", "", "", "", str(s["batch"]), f"{1e3 * s['dense_s']:.3f}",
              *(f"{s[f'speedup_{f}']:.2f}" if s[f"layers_{f}"] else "-" for f in ("csr", "2:4")),
              f"x{s['speedup_auto']:.2f}"] for s in summary]
    return table(["layer", "shape", "dtype", "stored", "sparsity", "tokens", "dense ms", "x csr", "x 2:4", "auto"],
                 body)


def _whole_label(s: dict[str, object]) -> str:
    if s["layers"] >= s["layers_total"]:
        return f"whole model ({s['layers']} linear layers)"
    return f"whole model: {s['layers']} of {s['layers_total']} linear layers"


def _bytes_line(s: dict[str, object]) -> str:
    n, total = s["layers"], s["layers_total"]
    which = "linear weights" if n >= total else f"linear weights of the {n} measured layer{'s' * (n != 1)} (of {total})"
    return (f"{which}: {s['dense_bytes'] / 1e6:,.2f} MB dense, {s['stored_bytes'] / 1e6:,.2f} MB as stored, "
            f"{s['csr_bytes'] / 1e6:,.2f} MB as csr, {s['2:4_bytes'] / 1e6:,.2f} MB as 2:4 "
            f"(where the pattern fits)")


def _tokens_title(n: int) -> str:
    return f"{n} token{'s' if n != 1 else ''} per call"


def run_checkpoint(args: argparse.Namespace) -> int:
    from sparse_ops.bench.checkpoint import LAYER_COLUMNS, count_linear, coverage, whole_model

    _check_common(args)
    if not Path(args.file).exists():
        raise MissingPathError(f"no such file or directory: {args.file}")
    batches = parse_ints(args.tokens, _tokens_option(args))
    dtype = parse_choices([args.dtype], "--dtype", DTYPE_CHOICES)[0] if args.dtype else None
    skipped: dict[str, str] = {}
    total = count_linear(args.file, skipped)  # from the headers: what a cut-short run reports against
    if not total:
        raise UserValueError(f"{args.file} has no linear (2-D float) weights to time")
    env = _start(args)
    header = {"command": "prune bench checkpoint", "args": _argv(args), "environment": env,
              "units": {"median_s": "seconds per call", "speedup": "dense median / median (same run)",
                        "batch": TOKENS_HELP, "whole_model": "sums over the measured linear layers only "
                                                             "(layers of layers_total; see coverage)"}}
    rows: list = []
    with _files(args, "checkpoint", LAYER_COLUMNS, header) as files:
        points = _checkpoint_points(args, batches, dtype, skipped)
        done, load = _drive(points, files, total * len(batches), "bench checkpoint", rows.extend)
        if not rows:  # the headers promised linear weights that the tensors do not hold
            raise UserValueError(f"{args.file} has no linear (2-D float) weights to time")
        summary = whole_model(rows, layers_total=total)
        note = coverage(summary[0]["layers"], total, args.max_seconds)
        print(checkpoint_table(rows, summary))
        if summary[0]["layers"] < total:
            print(f"note: {note}")
        _warn_spread([(r.p10_s, r.median_s, r.p90_s) for r in rows])
        _warn_busy(load)
        print(_bytes_line(summary[0]))
        print(f"not timed: {len(skipped)} tensors (not 2-D float weights, or embeddings)")
        if files is not None:
            _plot_checkpoint(rows, summary, files.path(".png"), f"{Path(args.file).name}: {note}", env)
            files.finish(_status(done, total * len(batches), args.max_seconds), skipped=skipped,
                         whole_model=summary,
                         coverage={"layers_measured": summary[0]["layers"], "layers_total": total, "note": note})
            print(f"wrote {files.out}/checkpoint.csv, checkpoint.json, checkpoint.png")
    return 0


def _checkpoint_points(args: argparse.Namespace, batches: tuple[int, ...], dtype: str | None,
                       skipped: dict[str, str]) -> Iterator[list]:
    from sparse_ops.bench.checkpoint import sweep_checkpoint
    from sparse_ops.timing import Deadline

    return sweep_checkpoint(args.file, batches, dtype=dtype, device=args.device, repeats=args.repeats,
                            min_sample_s=0.01 if args.device.startswith("cuda") else 0.02,
                            deadline=Deadline(args.max_seconds), skipped=skipped)


def _plot_checkpoint(rows: list, summary: list[dict[str, object]], path: Path, what: str,
                     env: dict[str, object]) -> None:
    """Per token count: the whole-model bar, then each layer's (or group of alike layers') speedup."""
    from sparse_ops.bench.checkpoint import speedup_bars, whole_model_bar
    from sparse_ops.bench.plots import plot_bars

    panels = {_tokens_title(s["batch"]): [whole_model_bar(s), *speedup_bars(rows, s["batch"])]
              for s in summary}
    plot_bars(panels, path,
              title=f"{what}\nspeedup over dense per linear layer and whole model; {_title(env)}")


# --- wiring into `prune` ---

# what -> (help, add_arguments)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "matmul": ("time sparse layers and anchors against dense F.linear on named or OUTxIN shapes", add_matmul),
    "families": ("dense FFN vs sparse FFN vs MoE vs gated heads at matched active parameters", add_families),
    "checkpoint": ("per layer of a checkpoint: dense vs csr vs 2:4 at its real shape and sparsity",
                   add_checkpoint),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``matmul``, ``families`` and ``checkpoint`` under ``prune bench``."""
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    for name, (help_, add) in SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))


def run(args: argparse.Namespace) -> int:
    return args._bench(args)
