"""The `prune` command line.

Each subcommand is a pair of functions, ``add_<name>(parser)`` and ``run_<name>(args) -> int``, registered in
``COMMANDS``. User mistakes raise ``ValueError``/``FileNotFoundError``/... inside the library; ``main`` turns
them into one line on stderr and a non-zero exit (``--debug`` shows the traceback instead).

Example:
    >>> main(["--version"])  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from prune import __version__

# Errors that mean "the user gave us something we cannot use"; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError, RuntimeError,
               NotImplementedError, OSError, KeyError)
EXIT_USER_ERROR = 2


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    p.add_argument("--sparsity", type=float, default=0.9, help="final sparsity (default: 0.9)")
    p.add_argument("--criterion", default="magnitude", help="magnitude or movement (default: magnitude)")
    p.add_argument("--seed", type=int, default=0)


def run_demo(args: argparse.Namespace) -> int:
    from prune.demo import run_demo as _run

    _run(steps=args.steps, sparsity=args.sparsity, criterion=args.criterion, seed=args.seed)
    return 0


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "demo": ("prune a small model while it trains and print its sparsity report", add_demo, run_demo),
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
    except USER_ERRORS as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"prune {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
