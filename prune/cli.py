"""The `prune` command line.

Each subcommand is a pair of functions, ``add_<name>(parser)`` and ``run_<name>(args) -> int``, registered in
``COMMANDS``. User mistakes raise a :class:`~sparse_ops.errors.UserError` inside the library; ``main`` turns
them into one line on stderr and exit status 2 (``--debug`` shows the traceback instead). Any other exception
is a bug and keeps its traceback.

Example:
    >>> main(["--version"])  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from prune import __version__
from sparse_ops.errors import UserError

EXIT_USER_ERROR = 2


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-report", help="report directory (default: demo-report)")
    p.add_argument("--seed", type=int, default=0, help="seed for data split, init and batches (default: 0)")
    p.add_argument("--quick", action="store_true", help="a small budget (seconds, not minutes)")
    p.add_argument("--runs", default=None,
                   help="comma-separated runs (default: all): dense, magnitude, movement, 2:4, moe, heads")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 500; 20 quick)")


def run_demo(args: argparse.Namespace) -> int:
    from prune.demo import RUNS, DemoConfig
    from prune.demo import run_demo as _run

    runs = tuple(r.strip() for r in args.runs.split(",")) if args.runs else tuple(RUNS)
    _run(DemoConfig(out=args.out, seed=args.seed, quick=args.quick, runs=runs, steps=args.steps))
    return 0


def add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a .safetensors file, a .pt/.bin state dict, or a Hugging Face model directory")
    p.add_argument("-o", "--output", required=True,
                   help="the sparse .safetensors file to write, or a new (or empty) folder for sharded output: "
                        "one sparse shard per source shard plus model.sparse.safetensors.index.json (a model "
                        "directory's other files, config and tokenizer, are copied beside them); never the "
                        "source or a path inside the source directory")
    p.add_argument("--format", default="csr",
                   help="csr, 2:4, auto (smallest per tensor), or an int8 format: dense-int8, csr-int8, bitmap-int8 "
                        "(default: csr)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="store the converted weights as symmetric int8 with one fp32 scale per output row, in the "
                        "smallest int8 layout (--format auto), or csr-int8 where csr pays (--format csr)")
    p.add_argument("--clip", choices=["absmax", "mse"], default="absmax",
                   help="int8 scales: each row's largest magnitude, or the clipping with least squared error "
                        "(default: absmax)")
    p.add_argument("--min-sparsity", type=float, default=None,
                   help="convert tensors at least this sparse (default: where sparse storage is smaller; "
                        "0.5 for 2:4)")
    p.add_argument("--embeddings", action="store_true", help="convert embedding tables too")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (or sparse checkpoint folder) once the new one is complete")
    p.add_argument("--allow-dense", action="store_true",
                   help="write the output even when no tensor is sparse enough to convert (a warning; "
                        "without this flag, an error)")


def run_convert(args: argparse.Namespace) -> int:
    import warnings

    from sparse_ops.checkpoint.convert import convert_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = convert_checkpoint(args.src, args.output, format=args.format, min_sparsity=args.min_sparsity,
                               embeddings=args.embeddings, progress=True, overwrite=args.overwrite,
                               allow_dense=args.allow_dense, quantize=args.quantize, clip=args.clip)
    for w in caught:  # one line each, not warnings' "file:line: UserWarning:" and source line
        print(f"prune convert: warning: {str(w.message).strip().splitlines()[0]}", file=sys.stderr)
    print(f"converted {s.converted} of {s.tensors} tensors to {s.format}: {_mb(s.bytes_before)} -> "
          f"{_mb(s.bytes_after)} ({s.ratio:.1%} of dense), written to {s.dst}")
    if s.copied:
        n = len(s.copied)
        print(f"copied {n} other file{'' if n == 1 else 's'} of the model folder: {', '.join(s.copied)}")
    return 0


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.2f} MB"


def add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a dense or sparse checkpoint (.safetensors, .pt/.bin, model directory, "
                                "or a sharded checkpoint's .index.json)")


def run_inspect(args: argparse.Namespace) -> int:
    from sparse_ops.checkpoint.inspect import inspect_checkpoint

    infos = list(inspect_checkpoint(args.file))  # metadata only; the name column fits the longest name
    width = max([len("name"), *(len(t.name) for t in infos)])
    fw = max([len("format"), *(len(t.label) for t in infos)])
    print(f"{'name':<{width}} {'shape':<16} {'format':<{fw}} {'dtype':<9} {'sparsity':>8} {'bytes':>14} "
          f"{'bits':>4}  scales")
    for t in infos:
        shape = "x".join(map(str, t.shape)) or "scalar"
        scales = "" if t.scales is None else f"  {t.scales[0]:.3g} .. {t.scales[1]:.3g}"
        print(f"{t.name:<{width}} {shape:<16} {t.label:<{fw}} {str(t.dtype).removeprefix('torch.'):<9} "
              f"{t.sparsity:>8.1%} {t.nbytes:>14,} {t.value_bits:>4}{scales}")
    stored, dense = sum(t.nbytes for t in infos), sum(t.dense_nbytes for t in infos)
    print(f"total: {len(infos)} tensors, {stored:,} bytes stored, {dense:,} bytes dense "
          f"({stored / max(dense, 1):.1%} of dense)")
    return 0


def add_oneshot(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from prune.one_shot.config import OneShotConfig  # light: no torch; the one place the defaults are

    defaults = {f.name: f.default for f in dataclasses.fields(OneShotConfig)}

    def setting(name: str, help: str, **kwargs: object) -> None:
        """A flag named as its OneShotConfig field; left unset unless given (the recipe's or the default then)."""
        shown = help if "default:" in help else f"{help} (default: {defaults[name]})"
        p.add_argument(f"--{name.replace('_', '-')}", default=argparse.SUPPRESS, help=shown, **kwargs)

    p.add_argument("model", help="a Hugging Face model folder (config, weights, tokenizer)")
    p.add_argument("-o", "--output", required=True, help="the pruned model folder to write (must not exist)")
    p.add_argument("--calibration", required=True, help="a .txt (one stream of text) or .jsonl (a text per line)")
    p.add_argument("--recipe", default=None,
                   help="a recipe file (.yaml, .yml, .toml) whose 'oneshot' table holds the settings (OneShotConfig's "
                        "fields by name); the flags below override it")
    setting("method", "sparsegpt, wanda or magnitude")
    setting("sparsity", "per layer (default: 0.5, or 1-N/M for N:M)", type=float)
    setting("pattern", "unstructured or N:M, e.g. 2:4")
    setting("samples", "calibration windows", type=int)
    setting("seq_len", "tokens per calibration window", type=int)
    setting("profile", "uniform or owl (per-block sparsity from outliers)")
    setting("include", "module name pattern to prune (repeatable; default: every linear)", action="append")
    setting("exclude", "module name pattern to keep dense (repeatable; default: none)", action="append")
    setting("damp", "SparseGPT's dampening, a fraction of the Hessian's mean diagonal", type=float)
    setting("sequential", "within a block, prune q/k/v, then o, then gate/up, then down, each from the inputs the "
            "pruned earlier ones give (default: all from one pass over the dense block)", action="store_true")
    p.add_argument("--device", default=None, help="where blocks compute, e.g. cuda (default: the model's device)")
    setting("seed", "seed of the calibration windows", type=int)
    setting("bits", "8: leave the pruned weights on int8 grids (SparseGPT quantizes jointly, compensating each "
            "rounding; wanda and magnitude quantize after) and write the int8 checkpoint (default: none)",
            type=int, choices=[8])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder once done")


def run_oneshot(args: argparse.Namespace) -> int:
    import dataclasses

    from prune.one_shot.config import OneShotConfig
    from prune.one_shot.folder import oneshot_folder
    from prune.recipe import load_recipe
    from sparse_ops.errors import UserValueError

    config = OneShotConfig() if args.recipe is None else load_recipe(args.recipe).oneshot
    if config is None:
        raise UserValueError(f"recipe {args.recipe} has no 'oneshot' table of one-shot settings")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(OneShotConfig) if hasattr(args, f.name)}
    report = oneshot_folder(args.model, args.output, args.calibration, config, overwrite=args.overwrite,
                            device=args.device, **given)
    print(report)
    print(f"written to {args.output}")
    return 0


def add_recover(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a pruned Hugging Face model folder (prune oneshot's output, dense-stored)")
    p.add_argument("--teacher", required=True, help="the dense model folder it was pruned from (the teacher)")
    p.add_argument("--text", required=True, help="a .txt or .jsonl file of training text")
    p.add_argument("-o", "--output", required=True, help="the recovered model folder to write (must not exist)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of AdamW (default: 2e-5)")
    p.add_argument("--samples", type=int, default=64, help="training windows, cycled (default: 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default: 4)")
    p.add_argument("--temperature", type=float, default=2.0, help="of the KL to the teacher's logits (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training windows (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder once done")


def run_recover(args: argparse.Namespace) -> int:
    from prune.recover import recover_folder

    report = recover_folder(args.model, args.teacher, args.text, args.output, overwrite=args.overwrite,
                            samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                            seed=args.seed, steps=args.steps, lr=args.lr, temperature=args.temperature)
    print(report)
    print(f"written to {args.output}")
    return 0


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a dense or converted sparse Hugging Face causal-LM folder")
    p.add_argument("--text", required=True, help="a .txt or .jsonl file of the text to score")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--stride", type=int, default=None,
                   help="score only the last STRIDE tokens of windows moved by STRIDE (default: disjoint windows)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (default: 1)")


def run_eval(args: argparse.Namespace) -> int:
    from prune.evaluate import folder_perplexity

    result = folder_perplexity(args.model, args.text, seq_len=args.seq_len, stride=args.stride,
                               batch_size=args.batch_size, progress=True)
    print(result)
    return 0


def add_bench(p: argparse.ArgumentParser) -> None:
    from sparse_ops.bench.command import add_arguments  # light: torch and the engines load when a bench runs

    add_arguments(p)


def run_bench(args: argparse.Namespace) -> int:
    from sparse_ops.bench.command import run

    return run(args)


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "demo": ("train, prune, convert and time six sparse variants of a small model on bundled digits",
             add_demo, run_demo),
    "convert": ("convert a checkpoint to a sparse safetensors file (csr, 2:4)", add_convert, run_convert),
    "inspect": ("list a checkpoint's tensors: shape, format, sparsity, bytes", add_inspect, run_inspect),
    "oneshot": ("prune a pretrained model folder in one shot from calibration text (SparseGPT, Wanda, magnitude)",
                add_oneshot, run_oneshot),
    "recover": ("train a one-shot pruned model folder towards its dense teacher, every zero held",
                add_recover, run_recover),
    "eval": ("perplexity of a dense or sparse model folder on your own text", add_eval, run_eval),
    "bench": ("time sparse against dense: matmul shapes, sparse families, a checkpoint's layers", add_bench,
              run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prune", description="Prune, convert and benchmark sparse models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("prune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`prune inspect FILE | head`): what it read was enough
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 0
    except UserError as e:  # what the user passed; anything else is a bug and keeps its traceback
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"prune {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
