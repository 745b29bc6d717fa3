"""The `scvae-torch` command: prepare, simulate, train, evaluate. Thin: parse, call the library, report."""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """A bad argument; reported as one line, exit status 2."""


def _int_list(text: str) -> list[int]:
    """Parse '100,250' into [100, 250]; '' gives []."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


# --- prepare (owned by the data task) -------------------------------------------------------------

def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="read a count matrix (10x HDF5, h5ad, Matrix Market) into the canonical h5ad",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> None:
    raise UsageError("prepare: not implemented yet")


# --- simulate (owned by the simulate task) --------------------------------------------------------

def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write a synthetic data set as a canonical h5ad",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> None:
    raise UsageError("simulate: not implemented yet")


# --- train / evaluate (owned by the core task) ----------------------------------------------------

def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a VAE / GMVAE", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> None:
    raise UsageError("train: not implemented yet")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model on the test split", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    raise UsageError("evaluate: not implemented yet")


# --- entry point ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="scvae-torch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prepare, _add_simulate, _add_train, _add_evaluate):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user mistakes give one line on stderr and a non-zero exit, never a traceback."""
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, DataError) as err:
        print(f"scvae-torch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scvae-torch {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
