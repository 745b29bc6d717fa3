"""The Matrix Market reader: a 10x MEX folder, or NAME.counts.mtx[.gz] with NAME.genes.tsv and NAME.cells.tsv."""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from .validation import (
    GENE_EXPRESSION,
    Counts,
    DataError,
    _as_strings,
    _batch_values,
    _error,
    _example,
    _finish,
    _keep_features,
    _read_table,
    _short,
)

log = logging.getLogger(__name__)


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of folder/name that exists."""
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _mtx_files(path: str) -> tuple[Path, Path, Path, str]:
    """(matrix, genes, cells, layout) for a 10x MEX folder or a NAME.counts.mtx[.gz] file with its companions."""
    p = Path(path)
    if p.is_dir():
        matrix = _first_existing(p, ("matrix.mtx.gz", "matrix.mtx"))
        if matrix is None:
            named = sorted(p.glob("*.counts.mtx.gz")) + sorted(p.glob("*.counts.mtx"))
            if len(named) != 1:
                raise _error(path, "no matrix.mtx[.gz] (10x MEX folder) and " +
                             ("no NAME.counts.mtx[.gz]" if not named else
                              f"several NAME.counts.mtx files ({_example(x.name for x in named)}); give one"))
            p = named[0]
    elif not p.is_file():
        raise _error(path, "no such file or folder")
    if p.is_dir() or p.name in ("matrix.mtx", "matrix.mtx.gz"):
        folder = p if p.is_dir() else p.parent
        matrix = _first_existing(folder, ("matrix.mtx.gz", "matrix.mtx"))
        genes = _first_existing(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
        cells = _first_existing(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
        if genes is None or cells is None:
            missing = [n for n, x in (("features.tsv[.gz] or genes.tsv[.gz]", genes), ("barcodes.tsv[.gz]", cells))
                       if x is None]
            raise _error(folder, f"10x MEX folder without {' and '.join(missing)}")
        return matrix, genes, cells, "10x"
    for suffix in (".counts.mtx.gz", ".counts.mtx"):
        if p.name.endswith(suffix):
            stem = p.name[: -len(suffix)]
            genes = _first_existing(p.parent, (f"{stem}.genes.tsv.gz", f"{stem}.genes.tsv"))
            cells = _first_existing(p.parent, (f"{stem}.cells.tsv.gz", f"{stem}.cells.tsv"))
            if genes is None or cells is None:
                missing = [n for n, x in ((f"{stem}.genes.tsv[.gz]", genes), (f"{stem}.cells.tsv[.gz]", cells))
                           if x is None]
                raise _error(path, f"companion file {' and '.join(missing)} not found next to it")
            return p, genes, cells, "named"
    raise _error(path, "expected a 10x MEX folder, matrix.mtx[.gz], or NAME.counts.mtx[.gz] with NAME.genes.tsv[.gz] "
                       "and NAME.cells.tsv[.gz]")


def _mmread(path: Path, fmt: str) -> sp.spmatrix | np.ndarray:
    """Read a Matrix Market body with pandas' C parser, checking every index.

    scipy's fast_matrix_market reader crashes the interpreter (segmentation fault) on some malformed
    bodies, which no exception handler can turn into a one-line error, so only the header goes through scipy.
    """
    import gzip

    rows, cols, entries, _, _, _ = scipy.io.mminfo(path)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        line = fh.readline()
        while line.startswith("%") or not line.strip():  # header and comments, then the size line
            line = fh.readline()
            if not line:
                raise ValueError("no size line")
        try:
            body = pd.read_csv(fh, sep=r"\s+", header=None, dtype=np.float64, engine="c").to_numpy()
        except pd.errors.EmptyDataError:
            body = np.zeros((0, 3 if fmt == "coordinate" else 1))
        except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"malformed body ({_short(err)})") from None
    if fmt == "array":
        if body.shape[1] != 1 or body.shape[0] != rows * cols:
            raise ValueError(f"expected {rows * cols} values, one per line, found {body.shape[0]} lines")
        return body[:, 0].reshape(cols, rows).T
    if body.shape[0] != entries or (entries and body.shape[1] != 3):
        raise ValueError(f"header promises {entries} entries of 3 numbers, body has {body.shape[0]} lines "
                         f"of {body.shape[1] if body.ndim == 2 else 0}")
    if entries == 0:
        return sp.coo_matrix((rows, cols), dtype=np.float64)
    i, j = body[:, 0], body[:, 1]
    if not (np.all(i == np.round(i)) and np.all(j == np.round(j))
            and i.min() >= 1 and i.max() <= rows and j.min() >= 1 and j.max() <= cols):
        raise ValueError(f"an entry's row or column index lies outside the {rows} x {cols} matrix")
    return sp.coo_matrix((body[:, 2], (i.astype(np.int64) - 1, j.astype(np.int64) - 1)), shape=(rows, cols))


def read_mtx(path: str, labels: str | None = None, round_counts: bool = False, batch: str | None = None) -> Counts:
    """Read Matrix Market counts: a 10x MEX folder, or NAME.counts.mtx[.gz] + NAME.genes.tsv + NAME.cells.tsv.

    labels / batch: columns of NAME.cells.tsv with each cell's type / batch; the whole table is in `.obs`."""
    path = os.fspath(path)
    matrix_path, genes_path, cells_path, layout = _mtx_files(path)
    if layout == "10x" and (labels is not None or batch is not None):
        what = "label" if labels is not None else "batch"
        raise _error(path, f"a 10x MEX folder has no {what} column; it needs NAME.cells.tsv with a header, or an h5ad")
    feats = _read_table(genes_path, header=False)
    genes = feats.iloc[:, 1].to_numpy() if feats.shape[1] > 1 else feats.iloc[:, 0].to_numpy()
    gene_ids = feats.iloc[:, 0].to_numpy() if feats.shape[1] > 1 else None
    types = feats.iloc[:, 2].to_numpy() if layout == "10x" and feats.shape[1] > 2 else None
    cell_table = _read_table(cells_path, header=layout == "named")
    cells = cell_table.iloc[:, 0].to_numpy()
    dup = pd.Index(cells).duplicated()
    if dup.any():
        raise _error(cells_path, f"{int(dup.sum())} duplicate cell ids (e.g. {_example(cells[dup])}); "
                                 "cell ids must be unique")
    label_values = None
    if labels is not None:
        if labels not in cell_table.columns[1:]:
            raise _error(cells_path, f"no column {labels!r} for labels; columns: "
                                     f"{', '.join(map(str, cell_table.columns))}")
        label_values = cell_table[labels].to_numpy()
        if (label_values == "").any():
            raise _error(cells_path, f"{int((label_values == '').sum())} empty values in label column {labels!r}")
    batch_values = None
    if batch is not None:
        if batch not in cell_table.columns[1:]:
            raise _error(cells_path, f"no column {batch!r} for the batch; columns: "
                                     f"{', '.join(map(str, cell_table.columns))}")
        batch_values = _batch_values(cell_table[batch], cells_path, batch)
    try:
        _, _, _, fmt, field, _ = scipy.io.mminfo(matrix_path)
        if field in ("pattern", "complex"):
            raise _error(matrix_path, f"Matrix Market field is '{field}'; counts need 'integer' or 'real'")
        M = _mmread(matrix_path, fmt)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, IndexError, RuntimeError, zlib.error) as err:  # zlib: damaged .gz
        raise _error(matrix_path, f"not a readable Matrix Market file: {_short(err)}") from None
    M = sp.csr_matrix(M) if fmt == "array" else M
    n_rows, n_cols = M.shape
    fits_cell_rows = (n_rows, n_cols) == (len(cells), len(genes))
    fits_gene_rows = (n_rows, n_cols) == (len(genes), len(cells))
    if not (fits_cell_rows or fits_gene_rows):
        raise _error(matrix_path, f"matrix is {n_rows} x {n_cols} but there are {len(genes)} genes in "
                                  f"{genes_path.name} and {len(cells)} cells in {cells_path.name}")
    # 10x MEX stores genes as rows; the NAME.counts.mtx layout stores cells as rows; a square matrix follows that
    genes_as_rows = fits_gene_rows and (not fits_cell_rows or layout == "10x")
    X = (M.T if genes_as_rows else M).tocsr()
    log.info("%s: %d x %d matrix read with %s as rows", matrix_path, n_rows, n_cols,
             "genes" if genes_as_rows else "cells")
    integer_source = field == "integer"
    genes = _as_strings(genes, genes_path, "gene names")
    gene_ids = None if gene_ids is None else _as_strings(gene_ids, genes_path, "gene ids")
    if types is not None:
        types = _as_strings(types, genes_path, "feature types")
        if GENE_EXPRESSION not in set(types):
            raise _error(genes_path, f"no '{GENE_EXPRESSION}' features "
                                     f"(feature types: {', '.join(sorted(set(types)))})")
        X, genes, gene_ids = _keep_features(X, types == GENE_EXPRESSION, genes, gene_ids, path,
                                            f"feature_type '{GENE_EXPRESSION}'")
    counts = _finish(str(matrix_path), X, genes, cells, label_values, gene_ids,
                     integer_source=integer_source, round_counts=round_counts)
    counts.batch = batch_values
    if layout == "named":
        counts.obs = cell_table.set_index(cell_table.columns[0])
    return counts
