"""Seeded train/validation/test splits and their split.tsv file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DEFAULT_FRACTIONS, SUBSETS
from .atomic import write_text
from .validation import _error, _example, _read_table


def _subset_sizes(n: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split n items by fractions with the largest-remainder rule, so sizes sum to n exactly."""
    exact = np.asarray(fractions, dtype=np.float64) * n
    sizes = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: n - int(sizes.sum())]] += 1
    return sizes


def make_split(cells: np.ndarray, labels: np.ndarray | None = None,
               fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int = 0,
               stratify: bool = False) -> pd.Series:
    """Seeded train/validation/test assignment, indexed by cell id."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1 with train > 0, got {fractions}")
    cells = np.asarray(cells)
    if stratify and labels is None:
        raise ValueError("a stratified split needs labels")
    # PCG64's raw 64-bit stream is fixed by its algorithm and seed, so argsort of it gives the same
    # permutation on every machine and numpy version (unlike higher-level sampling routines)
    rng = np.random.Generator(np.random.PCG64(seed))
    groups = ([np.flatnonzero(np.asarray(labels, dtype=str) == lab) for lab in np.unique(np.asarray(labels, dtype=str))]
              if stratify else [np.arange(cells.size)])
    subset = np.empty(cells.size, dtype=object)
    for members in groups:
        order = members[np.argsort(rng.bit_generator.random_raw(members.size), kind="stable")]
        bounds = np.cumsum(_subset_sizes(members.size, fractions))
        for name, part in zip(SUBSETS, np.split(order, bounds[:2])):
            subset[part] = name
    return pd.Series(subset, index=pd.Index(cells.astype(str), name="cell"), name="subset")


def write_split(split: pd.Series, path: str) -> None:
    """Write a split as TSV (cell, subset), atomically."""
    cells = np.asarray(split.index, dtype=str)
    bad = [c for c in cells if "\t" in c or "\n" in c or "\r" in c]
    if bad:
        raise _error(path, f"cell ids with tabs or line breaks cannot go in a TSV (e.g. {_example(bad)})")
    unknown = sorted(set(split.to_numpy()) - set(SUBSETS))
    if unknown:
        raise ValueError(f"unknown subsets {unknown}; expected {SUBSETS}")
    lines = [f"{c}\t{s}\n" for c, s in zip(cells, split.to_numpy())]
    write_text(path, "cell\tsubset\n" + "".join(lines))


def read_split(path: str, cells: np.ndarray) -> dict[str, np.ndarray]:
    """Read split.tsv and return row indices into `cells` for each subset."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _error(path, "no such split file")
    table = _read_table(Path(path), header=True)
    if list(table.columns) != ["cell", "subset"]:
        raise _error(path, f"header is {list(table.columns)}, expected 'cell<TAB>subset'")
    unknown = sorted(set(table["subset"]) - set(SUBSETS))
    if unknown:
        raise _error(path, f"unknown subsets {_example(unknown)}; expected {', '.join(SUBSETS)}")
    dup = table["cell"].duplicated()
    if dup.any():
        raise _error(path, f"{int(dup.sum())} cells listed twice (e.g. {_example(table['cell'][dup])})")
    index = pd.Index(np.asarray(cells, dtype=str))
    if not index.is_unique:
        raise _error(path, "the data's cell ids are not unique, so the split cannot name cells")
    positions = index.get_indexer(table["cell"])
    if (positions < 0).any():
        missing = table["cell"][positions < 0]
        raise _error(path, f"{missing.size} cells in the split are not in the data (e.g. {_example(missing)}); "
                           "was the split made for another file?")
    if positions.size != index.size:
        absent = index[~np.isin(np.arange(index.size), positions)]
        raise _error(path, f"{absent.size} cells of the data are not in the split (e.g. {_example(absent)}); "
                           "was the split made for another file?")
    subsets = table["subset"].to_numpy()
    return {name: np.sort(positions[subsets == name]).astype(np.int64) for name in SUBSETS}
