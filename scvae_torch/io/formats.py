"""Any supported format: detect it, read and validate the counts, apply the count filters and gene selection."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py

from ..config import FORMATS
from .filters import filter_counts, select_genes
from .h5ad import read_h5ad
from .mtx import read_mtx
from .tenx import read_10x_h5
from .validation import Counts, _error

log = logging.getLogger(__name__)


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
                batch: str | None = None) -> Counts:
    """Read and validate counts in any supported format, drop cells/genes below the count thresholds, then keep
    the top_genes genes of highest binomial deviance (all when None). batch: the column (h5ad obs, or the
    cells table of the MTX layout) with each cell's batch, kept as `Counts.batch`."""
    path = os.fspath(path)
    if format not in FORMATS:
        raise _error(path, f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    fmt = detect_format(path) if format == "auto" else format
    misplaced = [opt for opt, given, fits in (("--genome", genome is not None, fmt == "10x-h5"),
                                                ("--layer", layer is not None, fmt == "h5ad"),
                                                ("--use-raw", use_raw, fmt == "h5ad"),
                                                ("--labels", labels is not None, fmt != "10x-h5"),
                                                ("--batch", batch is not None, fmt != "10x-h5"))
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
    if min_counts_cell or min_counts_gene:
        counts = filter_counts(counts, min_counts_cell, min_counts_gene, source=path)
    if top_genes is not None:
        counts = select_genes(counts, top_genes, source=path)
    return counts
