"""Argument parsing helpers of the `scvae-torch` command: one-line errors and the value parsers."""

from __future__ import annotations

import argparse
import logging
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump); --help still shows everything."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(Exception):
    """A bad argument; reported as one line, exit status 2."""


def one_of(values: tuple[str, ...]) -> str:
    """'a, b or c' for help texts."""
    return ", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]


def int_list(text: str) -> list[int]:
    """Parse '100,250' into [100, 250]; '' gives []."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


def _whole_number(text: str, minimum: int) -> int:
    """Parse a whole number >= minimum."""
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """Parse a count threshold >= 0."""
    return _whole_number(text, 0)


def positive_int(text: str) -> int:
    """Parse a whole number >= 1."""
    return _whole_number(text, 1)


def cell_filter(text: str) -> tuple[str, list[str]]:
    """Parse 'COLUMN=VALUE[,VALUE...]' (a cell filter of prepare --keep)."""
    column, sep, values = text.partition("=")
    kept = [v for v in values.split(",") if v]
    if not sep or not column or not kept:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE[,VALUE...], got {text!r}")
    return column, kept


def split_fractions(text: str) -> tuple[float, float, float]:
    """Parse 'train,validation,test' fractions that sum to 1."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or values[0] <= 0 or abs(sum(values) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three fractions train,validation,test >= 0 summing to 1 "
                                         f"(train > 0), got {text!r}")
    return values


class StderrLog:
    """Show the library's log lines (INFO and up, or from `level`) on stderr while a command runs."""

    def __init__(self, command: str, level: int = 20):
        self.logger = logging.getLogger("scvae_torch")
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter(f"scvae-torch {command}: %(message)s"))
        self.level, self.show = self.logger.level, level

    def __enter__(self):
        self.logger.addHandler(self.handler)
        self.logger.setLevel(self.show)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        return False


def open_fraction(text: str) -> float:
    """Parse a fraction strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {text!r}")
    return value
