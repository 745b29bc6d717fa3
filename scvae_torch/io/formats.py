"""Any supported format: detect it, read and validate the counts, apply the count filters and gene selection."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py

from ..config import FORMATS
from .filters import filter_counts, keep_cells, select_genes
from .h5ad import read_h5ad, read_obs_columns
from .mtx import read_mtx
from .tenx import read_10x_h5
from .validation import Counts, _error

log = logging.getLogger(__name__)


def _annotations(path: str, fmt: str, counts: Counts, columns: list[str]) -> dict:
    """Columns of the cells' annotation table (h5ad obs, or the MTX layout's cells table) by name."""
    if fmt == "h5ad":
        return read_obs_columns(path, columns)
    table = counts.obs
    missing = [c for c in columns if table is None or c not in table.columns]
    if missing:
        have = ", ".join(map(str, table.columns)) if table is not None else "none (no cells table with a header)"
        raise _error(path, f"no cells-table column {missing[0]!r} for the cell filter; columns: {have}")
    return {c: table[c].to_numpy() for c in columns}


def detect_format(path: str) -> str:
    """Guess the input format from the path (folder, suffix) and, for HDF5, its contents."""
    p = Path(path)
    if not p.exists():
        raise _error(path, "no such file or folder")
    name = p.name.lower()
    if p.is_dir() or name.endswith((".mtx", ".mtx.gz")):
        return "mtx"
    if name.endswith(".h5ad"):
        return "h5ad"
    try:
        with h5py.File(path, "r") as f:
            return "h5ad" if isinstance(f.get("obs"), h5py.Group) and isinstance(f.get("var"), h5py.Group) else "10x-h5"
    except OSError:
        if name.endswith((".h5", ".hdf5")):
            return "10x-h5"  # let the reader say what is wrong with it
    raise _error(path, "cannot tell the format (expected a 10x .h5, an .h5ad, a .mtx[.gz] or a 10x MEX folder); "
                       "give --format")


def read_counts(path: str, format: str = "auto", *, genome: str | None = None, layer: str | None = None,
                use_raw: bool = False, labels: str | None = None, round_counts: bool = False,
                min_counts_cell: int = 0, min_counts_gene: int = 0, top_genes: int | None = None,
                batch: str | None = None, keep: dict[str, list[str]] | None = None) -> Counts:
    """Read and validate counts in any supported format, keep the cells `keep` selects, drop cells/genes below the
    count thresholds, then keep the top_genes genes of highest binomial deviance (all when None). batch: the
    column (h5ad obs, or the cells table of the MTX layout) with each cell's batch, kept as `Counts.batch`.
    keep: {column: [values]} of the same tables, e.g. {"demuxlet_cls": ["SNG"]} (a cell is kept when every
    column holds one of its values)."""
    path = os.fspath(path)
    if format not in FORMATS:
        raise _error(path, f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    fmt = detect_format(path) if format == "auto" else format
    misplaced = [opt for opt, given, fits in (("--genome", genome is not None, fmt == "10x-h5"),
                                                ("--layer", layer is not None, fmt == "h5ad"),
                                                ("--use-raw", use_raw, fmt == "h5ad"),
                                                ("--labels", labels is not None, fmt != "10x-h5"),
                                                ("--batch", batch is not None, fmt != "10x-h5"),
                                                ("--keep", bool(keep), fmt != "10x-h5"))
                 if given and not fits]
    if misplaced:
        raise _error(path, f"{' and '.join(misplaced)} do not apply to the {fmt} format")
    if fmt == "10x-h5":
        counts = read_10x_h5(path, genome=genome, round_counts=round_counts)
    elif fmt == "h5ad":
        counts = read_h5ad(path, layer=layer, use_raw=use_raw, labels=labels, round_counts=round_counts, batch=batch)
    else:
        counts = read_mtx(path, labels=labels, round_counts=round_counts, batch=batch)
    log.info("%s: read %d cells x %d genes (%s)", path, counts.X.shape[0], counts.X.shape[1], fmt)
    if keep:
        counts = keep_cells(counts, _annotations(path, fmt, counts, list(keep)), keep, source=path)
    if min_counts_cell or min_counts_gene:
        counts = filter_counts(counts, min_counts_cell, min_counts_gene, source=path)
    if top_genes is not None:
        counts = select_genes(counts, top_genes, source=path)
    return counts
