"""Checks every reader shares: DataError, the Counts container, count values, names and shapes."""

from __future__ import annotations

import csv
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)


GENE_EXPRESSION = "Gene Expression"

_CHUNK = 1 << 22  # elements per chunk when scanning large arrays, to bound temporary memory


class DataError(Exception):
    """A problem with a user's input file; str() is one line naming the file and the problem."""


@dataclass
class Counts:
    """A cells x genes count matrix with its names and optional labels."""

    X: sp.csr_matrix
    genes: np.ndarray
    cells: np.ndarray
    labels: np.ndarray | None = None
    gene_ids: np.ndarray | None = None  # e.g. Ensembl IDs when `genes` holds symbols
    gene_deviance: np.ndarray | None = None  # binomial deviance per gene, when genes were selected by it
    selection: dict | None = None  # how genes were selected; the canonical file's uns['scvae_prepare']
    batch: np.ndarray | None = None  # each cell's batch (the canonical file's obs['batch']), when given
    obs: pd.DataFrame | None = None  # every column of a cells table (NAME.cells.tsv), as read; not written


def _error(path: str | os.PathLike, problem: str) -> DataError:
    """A DataError whose message is one line: 'PATH: problem'."""
    return DataError(" ".join(f"{os.fspath(path)}: {problem}".split()))


def _short(err: BaseException) -> str:
    """A library exception as a short one-line text."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _example(values) -> str:
    """The first few of `values`, quoted, for an error message."""
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:3])
    return shown + (", ..." if len(values) > 3 else "")


def _count_where(data: np.ndarray, test) -> tuple[int, float | None]:
    """How many entries of `data` satisfy `test` (chunked, so no full-size temporary), and the first one."""
    total, first = 0, None
    for start in range(0, data.size, _CHUNK):
        block = data[start:start + _CHUNK]
        hit = test(block)
        n = int(np.count_nonzero(hit))
        if n and first is None:
            first = float(block[np.argmax(hit)])
        total += n
    return total, first


def refuse_bad_counts(data: np.ndarray, path: str, integer_source: bool = False, round_counts: bool = False,
                      hint: str = "the round option (--round) rounds them") -> int:
    """Raise DataError (one line naming `path`) on NaN/inf, negative or (unless round_counts) fractional values.

    Reads `data` only (chunked; no full-size temporary). Returns how many values are not whole numbers (to be
    rounded when round_counts). `hint` ends the message about non-integer values.
    """
    if not data.size:
        return 0
    if not integer_source:
        n_bad, first = _count_where(data, lambda b: ~np.isfinite(b))
        if n_bad:
            raise _error(path, f"{n_bad} NaN or infinite values (e.g. {first}); counts must be finite")
    minimum = data.min()
    if minimum < 0:
        n_neg, _ = _count_where(data, lambda b: b < 0)
        raise _error(path, f"{n_neg} negative values (minimum {minimum:g}); counts must be >= 0")
    if integer_source:
        return 0
    n_frac, first = _count_where(data, lambda b: b != np.rint(b))
    if n_frac and not round_counts:
        raise _error(path, f"{n_frac} non-integer values (e.g. {first:g}); raw counts must be whole "
                           f"numbers (normalised data?); {hint}")
    return n_frac


def _check_values(X: sp.csr_matrix, path: str, integer_source: bool, round_counts: bool) -> sp.csr_matrix:
    """Reject NaN/inf, negative and (unless round_counts) non-integer values; return X with float32 data."""
    data = X.data
    if data.size:
        n_frac = refuse_bad_counts(data, path, integer_source, round_counts)
        if n_frac:
            log.warning("%s: rounded %d non-integer values to the nearest integer", path, n_frac)
            for start in range(0, data.size, _CHUNK):
                np.rint(data[start:start + _CHUNK], out=data[start:start + _CHUNK])
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    if data.size and not np.all(X.data):  # explicit zeros (stored or made by rounding) are not non-zeros
        X.eliminate_zeros()
    X.sum_duplicates()
    return X


def _as_strings(values, path: str, what: str) -> np.ndarray:
    """Names (bytes, str or numbers) as an object array of str; missing values are an error."""
    values = np.asarray(values)
    if values.dtype.kind == "S":
        try:
            return np.char.decode(values, "utf-8").astype(object)
        except UnicodeDecodeError:
            raise _error(path, f"{what} are not valid UTF-8 text") from None
    series = pd.Series(values, dtype=object)
    if series.isna().any():
        raise _error(path, f"{int(series.isna().sum())} missing values in {what}")
    if values.dtype.kind == "f" and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)  # label codes stored as 1.0, 2.0, ... read as '1', '2', ...
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _finish(path: str, X: sp.csr_matrix, genes, cells, labels=None, gene_ids=None, *,
            integer_source: bool | None = None, round_counts: bool = False) -> Counts:
    """Check shapes, ids and values of a freshly read matrix and return it as Counts (float32 CSR)."""
    genes = _as_strings(genes, path, "gene names")
    cells = _as_strings(cells, path, "cell ids")
    if X.shape != (len(cells), len(genes)):
        raise _error(path, f"matrix is {X.shape[0]} x {X.shape[1]} (cells x genes) but there are "
                           f"{len(cells)} cell ids and {len(genes)} gene names")
    _check_cells(path, cells, len(genes))
    if labels is not None:
        labels = _as_strings(labels, path, "labels")
    if gene_ids is not None:
        gene_ids = _as_strings(gene_ids, path, "gene ids")
    if integer_source is None:
        integer_source = X.dtype.kind in "iub"
    X = _check_values(X.tocsr(), path, integer_source, round_counts)
    return Counts(X=X, genes=genes, cells=cells, labels=labels, gene_ids=gene_ids)


def _batch_values(values, path: str | os.PathLike, column: str) -> np.ndarray:
    """A batch column as strings; a cell without one is a DataError naming the file and column."""
    from ..batches import SourceError, batch_column

    try:
        return batch_column(values, f"{path}: column {column!r}")
    except SourceError as err:
        raise DataError(str(err)) from None


def _check_cells(path: str, cells: np.ndarray, n_genes: int) -> None:
    """Refuse a matrix without cells or genes, and duplicate cell ids."""
    if len(cells) == 0 or n_genes == 0:
        raise _error(path, f"holds no data ({len(cells)} cells x {n_genes} genes)")
    dup = pd.Index(cells).duplicated()
    if dup.any():
        raise _error(path, f"{int(dup.sum())} duplicate cell ids (e.g. {_example(cells[dup])}); "
                           "cell ids must be unique")


def _keep_features(X: sp.csr_matrix, keep: np.ndarray, genes: np.ndarray, gene_ids, path: str, why: str):
    """Keep the gene columns where `keep` is True (no copy when all are kept)."""
    if keep.all():
        return X, genes, gene_ids
    log.info("%s: kept %d of %d features (%s)", path, int(keep.sum()), keep.size, why)
    cols = np.flatnonzero(keep)
    return X[:, cols], genes[cols], None if gene_ids is None else gene_ids[cols]


def _read_table(path: Path, header: bool) -> pd.DataFrame:
    """A tab-separated text table (gzip by extension) as strings, nothing treated as missing."""
    try:
        table = pd.read_csv(path, sep="\t", header=0 if header else None, dtype=str, keep_default_na=False,
                            quoting=csv.QUOTE_NONE, compression="infer")
    except pd.errors.EmptyDataError:
        raise _error(path, "empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, zlib.error) as err:  # zlib: damaged .gz
        raise _error(path, f"not a readable tab-separated table: {_short(err)}") from None
    return table
