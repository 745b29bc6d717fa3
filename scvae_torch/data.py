"""Count-matrix readers (10x HDF5 v2/v3, h5ad, Matrix Market), validation, canonical h5ad, splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

SUBSETS: tuple[str, ...] = ("train", "validation", "test")


class DataError(Exception):
    """A problem with a user's input file; str() is one line naming the file and the problem."""


@dataclass
class Counts:
    """A cells x genes count matrix with its names and optional labels."""

    X: sp.csr_matrix
    genes: np.ndarray
    cells: np.ndarray
    labels: np.ndarray | None = None


def load_canonical(path: str) -> Counts:
    """Read a canonical counts.h5ad (X = CSR counts, obs['label'] optional) written by `prepare`."""
    raise NotImplementedError


def write_canonical(counts: Counts, path: str) -> None:
    """Write counts as the canonical AnnData file, atomically (temp path, then rename)."""
    raise NotImplementedError


def make_split(cells: np.ndarray, labels: np.ndarray | None = None,
               fractions: tuple[float, float, float] = (0.81, 0.09, 0.10), seed: int = 0,
               stratify: bool = False) -> pd.Series:
    """Seeded train/validation/test assignment, indexed by cell id."""
    raise NotImplementedError


def write_split(split: pd.Series, path: str) -> None:
    """Write a split as TSV (cell, subset), atomically."""
    raise NotImplementedError


def read_split(path: str, cells: np.ndarray) -> dict[str, np.ndarray]:
    """Read split.tsv and return row indices into `cells` for each subset."""
    raise NotImplementedError
