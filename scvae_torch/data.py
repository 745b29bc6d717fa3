"""Count-matrix readers (10x HDF5 v2/v3, h5ad, Matrix Market), validation, canonical h5ad, splits."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import re
import secrets
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from . import genes as _genes
from .genes import row_blocks as _cell_blocks

SUBSETS: tuple[str, ...] = ("train", "validation", "test")
FORMATS: tuple[str, ...] = ("auto", "10x-h5", "h5ad", "mtx")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.81, 0.09, 0.10)
GENE_EXPRESSION = "Gene Expression"
_CHUNK = 1 << 22  # elements per chunk when scanning large arrays, to bound temporary memory

log = logging.getLogger(__name__)


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


# --- values and names -------------------------------------------------------------------------------

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


def _check_cells(path: str, cells: np.ndarray, n_genes: int) -> None:
    """Refuse a matrix without cells or genes, and duplicate cell ids."""
    if len(cells) == 0 or n_genes == 0:
        raise _error(path, f"holds no data ({len(cells)} cells x {n_genes} genes)")
    dup = pd.Index(cells).duplicated()
    if dup.any():
        raise _error(path, f"{int(dup.sum())} duplicate cell ids (e.g. {_example(cells[dup])}); cell ids must be unique")


def _keep_features(X: sp.csr_matrix, keep: np.ndarray, genes: np.ndarray, gene_ids, path: str, why: str):
    """Keep the gene columns where `keep` is True (no copy when all are kept)."""
    if keep.all():
        return X, genes, gene_ids
    log.info("%s: kept %d of %d features (%s)", path, int(keep.sum()), keep.size, why)
    cols = np.flatnonzero(keep)
    return X[:, cols], genes[cols], None if gene_ids is None else gene_ids[cols]


# --- HDF5 helpers ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _open_hdf5(path: str) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only; a missing, truncated or non-HDF5 file, or a read failure, is a DataError."""
    if not os.path.isfile(path):
        raise _error(path, "no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise _error(path, f"not a readable HDF5 file (truncated, damaged or another format): {_short(err)}") from None
    try:
        with handle:
            yield handle
    except (OSError, RuntimeError, KeyError, ValueError) as err:  # how h5py reports damaged objects and chunks
        raise _error(path, f"damaged HDF5 file, reading failed: {_short(err)}") from None


def _dataset(group: h5py.Group, name: str, path: str) -> h5py.Dataset:
    """group[name] as a dataset, or a DataError naming what is missing."""
    item = group.get(name)
    if not isinstance(item, h5py.Dataset):
        raise _error(path, f"no dataset '{group.name.rstrip('/')}/{name}' (not the expected layout)")
    return item


def _csr_layout(group: h5py.Group, path: str, n_rows: int, n_cols: int) -> tuple[np.ndarray, bool]:
    """Check group's data/indices/indptr (indptr over rows) against the shape; the row offsets (int32 where they
    fit, else int64) and whether the values are stored as integers."""
    data_ds, indices_ds, indptr_ds = (_dataset(group, n, path) for n in ("data", "indices", "indptr"))
    where = group.name
    nnz = data_ds.shape[0] if data_ds.ndim == 1 else -1
    if nnz < 0 or indices_ds.shape != (nnz,):
        raise _error(path, f"{where}: 'data' and 'indices' disagree in length ({data_ds.shape} vs {indices_ds.shape})")
    if indptr_ds.shape != (n_rows + 1,):
        raise _error(path, f"{where}: 'indptr' has {indptr_ds.shape[0] if indptr_ds.ndim else 0} entries but the "
                           f"shape says {n_rows} columns of cells (expected {n_rows + 1})")
    idx_dtype = np.int32 if max(nnz, n_cols, n_rows) < np.iinfo(np.int32).max else np.int64
    indptr = indptr_ds.astype(idx_dtype)[()]
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        raise _error(path, f"{where}: 'indptr' is not a valid pointer array for {nnz} non-zeros")
    if data_ds.dtype.kind not in "iubf":
        raise _error(path, f"{where}: 'data' holds {data_ds.dtype}, not numbers")
    return indptr, data_ds.dtype.kind in "iub"


def _read_compressed(group: h5py.Group, path: str, n_rows: int, n_cols: int) -> tuple[sp.csr_matrix, bool]:
    """CSR (n_rows x n_cols) straight from group's data/indices/indptr (indptr over rows), never dense."""
    indptr, integer_source = _csr_layout(group, path, n_rows, n_cols)
    indices = group["indices"].astype(indptr.dtype)[()]
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise _error(path, f"{group.name}: 'indices' run outside 0..{n_cols - 1} (the shape disagrees with the data)")
    data_ds = group["data"]
    data = data_ds.astype(np.float32)[()] if integer_source else data_ds[()]  # converted while reading: one copy
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols)), integer_source


# --- readers --------------------------------------------------------------------------------------

def _10x_metadata(f: h5py.File, path: str, genome: str | None):
    """The count group of an open 10x HDF5 file (v2: one group per genome; v3: 'matrix'), its (cells, genes),
    cell ids, gene names and ids, and the feature filters to apply in turn: [(keep mask, why), ...]."""
    if isinstance(f.get("matrix"), h5py.Group):
        group, layout = f["matrix"], "v3"
    else:
        layout = "v2"
        genomes = sorted(k for k in f if isinstance(f[k], h5py.Group) and "indptr" in f[k] and "shape" in f[k])
        if not genomes:
            raise _error(path, "no 10x count matrix: expected a 'matrix' group (Cell Ranger v3) or one group "
                               "per genome (v2); is this an .h5ad file (--format h5ad)?")
        if genome is None and len(genomes) > 1:
            raise _error(path, f"holds several genomes ({', '.join(genomes)}); choose one with --genome")
        if genome is not None and genome not in genomes:
            raise _error(path, f"no genome {genome!r}; genomes in the file: {', '.join(genomes)}")
        group = f[genome or genomes[0]]
    shape = _dataset(group, "shape", path)[()]
    if np.shape(shape) != (2,):
        raise _error(path, f"{group.name}/shape is {shape!r}, expected [genes, cells]")
    n_genes, n_cells = int(shape[0]), int(shape[1])
    cells = _dataset(group, "barcodes", path)[()]
    if layout == "v3":
        feats = group.get("features")
        if not isinstance(feats, h5py.Group):
            raise _error(path, "no group 'matrix/features' (not the expected Cell Ranger v3 layout)")
        gene_ids = _dataset(feats, "id", path)[()]
        genes = _dataset(feats, "name", path)[()] if "name" in feats else gene_ids
        types = _as_strings(feats["feature_type"][()], path, "feature types") if "feature_type" in feats else None
        feat_genomes = _as_strings(feats["genome"][()], path, "feature genomes") if "genome" in feats else None
    else:
        gene_ids = _dataset(group, "genes", path)[()]
        genes = _dataset(group, "gene_names", path)[()] if "gene_names" in group else gene_ids
        types = feat_genomes = None
    if len(cells) != n_cells or len(genes) != n_genes or len(gene_ids) != n_genes:
        raise _error(path, f"{group.name}/shape says {n_genes} genes x {n_cells} cells but there are "
                           f"{len(genes)} gene names and {len(cells)} barcodes")
    genes, gene_ids = _as_strings(genes, path, "gene names"), _as_strings(gene_ids, path, "gene ids")
    filters = []
    if types is not None:
        if GENE_EXPRESSION not in set(types):
            raise _error(path, f"no '{GENE_EXPRESSION}' features (feature types: {', '.join(sorted(set(types)))})")
        filters.append((types == GENE_EXPRESSION, f"feature_type '{GENE_EXPRESSION}'"))
        if feat_genomes is not None:
            feat_genomes = feat_genomes[types == GENE_EXPRESSION]
    if layout == "v3" and genome is not None:
        if feat_genomes is None or genome not in set(feat_genomes):
            choices = ", ".join(sorted(set(feat_genomes) - {""})) if feat_genomes is not None else "none recorded"
            raise _error(path, f"no genome {genome!r}; genomes in the file: {choices or 'none recorded'}")
        filters.append((feat_genomes == genome, f"genome {genome!r}"))
    return group, n_cells, n_genes, cells, genes, gene_ids, filters


def read_10x_h5(path: str, genome: str | None = None, round_counts: bool = False) -> Counts:
    """Read a 10x Cell Ranger HDF5 file: v2 (one group per genome) or v3 ('matrix', Gene Expression only)."""
    path = os.fspath(path)
    with _open_hdf5(path) as f:
        group, n_cells, n_genes, cells, genes, gene_ids, filters = _10x_metadata(f, path, genome)
        # stored CSC over [genes, cells] (indptr runs over cells) == CSR over [cells, genes]: no transpose copy
        X, integer_source = _read_compressed(group, path, n_cells, n_genes)
    for keep, why in filters:
        X, genes, gene_ids = _keep_features(X, keep, genes, gene_ids, path, why)
    return _finish(path, X, genes, cells, None, gene_ids, integer_source=integer_source, round_counts=round_counts)


def _read_elem(element, path: str, what: str):
    """Decode one AnnData element (data frame, array) with anndata's own reader."""
    from anndata.io import read_elem

    try:
        return read_elem(element)
    except Exception as err:  # anndata raises assorted types for unreadable or foreign encodings
        raise _error(path, f"could not read {what}: {_short(err)}") from None


def _read_h5ad_matrix(element, path: str, what: str) -> tuple[sp.csr_matrix, bool]:
    """A matrix element of an h5ad file (CSR, CSC or dense) as CSR; dense ones are converted in row blocks."""
    if isinstance(element, h5py.Dataset):
        if element.ndim != 2:
            raise _error(path, f"{what} is not a 2-d matrix (shape {element.shape})")
        kind = element.dtype.kind
        if kind not in "iubf":
            raise _error(path, f"{what} holds {element.dtype}, not numbers")
        n_rows, n_cols = element.shape
        step = max(1, _CHUNK // max(n_cols, 1))
        blocks = [sp.csr_matrix(element[i:i + step].astype(np.float32 if kind in "iub" else element.dtype))
                  for i in range(0, n_rows, step)]
        X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((n_rows, n_cols), dtype=np.float32)
        return X, kind in "iub"
    encoding = element.attrs.get("encoding-type") or (str(element.attrs.get("h5sparse_format", "")) + "_matrix")
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    shape = element.attrs.get("shape", element.attrs.get("h5sparse_shape"))
    if encoding not in ("csr_matrix", "csc_matrix") or shape is None or len(shape) != 2:
        raise _error(path, f"{what} has an unsupported encoding {encoding!r} (expected csr_matrix, csc_matrix or dense)")
    n_rows, n_cols = int(shape[0]), int(shape[1])
    if encoding == "csr_matrix":
        return _read_compressed(element, path, n_rows, n_cols)
    X_t, integer_source = _read_compressed(element, path, n_cols, n_rows)  # CSC arrays = CSR of the transpose
    return X_t.T.tocsr(), integer_source


def _h5ad_labels(obs_group: h5py.Group, column: str, path: str, what: str = "labels") -> np.ndarray:
    """The values of one obs column of an h5ad file."""
    if column not in obs_group or column == obs_group.attrs.get("_index"):
        names = [c for c in obs_group.attrs.get("column-order", []) if isinstance(c, str)] or \
                [c for c in obs_group if c != obs_group.attrs.get("_index") and c != "__categories"]
        raise _error(path, f"no obs column {column!r} for {what}; obs columns: {', '.join(names) or 'none'}")
    values = _read_elem(obs_group[column], path, f"obs column {column!r}")
    if isinstance(values, pd.Categorical):
        values = np.asarray(values.astype(object))
    return np.asarray(values, dtype=object)


def read_h5ad(path: str, layer: str | None = None, use_raw: bool = False, labels: str | None = None,
              round_counts: bool = False, batch: str | None = None) -> Counts:
    """Read counts from an AnnData .h5ad: X, a named layer, or raw.X; labels and the batch from obs columns."""
    path = os.fspath(path)
    if layer is not None and use_raw:
        raise _error(path, "choose either a layer or raw.X, not both")
    with _open_hdf5(path) as f:
        if not isinstance(f.get("obs"), h5py.Group) or not isinstance(f.get("var"), h5py.Group):
            raise _error(path, "not an AnnData .h5ad file (no 'obs'/'var' groups); is it a 10x file (--format 10x-h5)?")
        var_group = f["var"]
        if use_raw:
            if not isinstance(f.get("raw"), h5py.Group) or "X" not in f["raw"]:
                raise _error(path, "has no raw.X (the AnnData was saved without .raw)")
            if not isinstance(f["raw"].get("var"), h5py.Group):
                raise _error(path, "raw has no var table (damaged raw section)")
            element, what, var_group = f["raw/X"], "raw.X", f["raw/var"]
        elif layer is not None:
            layers = sorted(f["layers"]) if isinstance(f.get("layers"), h5py.Group) else []
            if layer not in layers:
                raise _error(path, f"no layer {layer!r}; layers in the file: {', '.join(layers) or 'none'}")
            element, what = f["layers"][layer], f"layer {layer!r}"
        else:
            if "X" not in f:
                raise _error(path, "has no X matrix (X is None); choose a layer or raw.X")
            element, what = f["X"], "X"
        obs = f["obs"]
        if "_index" not in obs.attrs or "_index" not in var_group.attrs:
            raise _error(path, "obs/var without an index: an old or foreign h5ad layout; re-save it with anndata >= 0.8")
        cells = _read_elem(obs[obs.attrs["_index"]], path, "obs names")
        genes = _read_elem(var_group[var_group.attrs["_index"]], path, "var names")
        gene_ids = _read_elem(var_group["gene_ids"], path, "var['gene_ids']") if "gene_ids" in var_group else None
        label_values = _h5ad_labels(obs, labels, path) if labels is not None else None
        batch_values = None if batch is None else _batch_values(_h5ad_labels(obs, batch, path, "the batch"), path,
                                                                f"obs {batch!r}")
        X, integer_source = _read_h5ad_matrix(element, path, what)
    try:
        counts = _finish(path, X, genes, cells, label_values, gene_ids, integer_source=integer_source,
                         round_counts=round_counts)
        counts.batch = batch_values
        return counts
    except DataError as err:
        if layer is not None or use_raw:
            raise
        raise _counts_elsewhere(err, path, "prepare") from None


def _whole_number_sources(path: str) -> list[str]:
    """Layers (and raw.X) of an h5ad whose first stored values are whole numbers >= 0: where raw counts may be
    when X holds normalised values. Names only; '' entries never; an unreadable file gives []."""
    found = []
    try:
        with h5py.File(path, "r") as f:
            candidates = [(f"layer {name!r}", f["layers"][name]) for name in sorted(f["layers"])] \
                if isinstance(f.get("layers"), h5py.Group) else []
            if isinstance(f.get("raw"), h5py.Group) and "X" in f["raw"]:
                candidates.append(("raw.X", f["raw"]["X"]))
            for name, element in candidates:
                values = element["data"] if isinstance(element, h5py.Group) and "data" in element else element
                if not isinstance(values, h5py.Dataset) or values.size == 0:
                    continue
                sample = np.asarray(values[:_CHUNK] if values.ndim == 1 else values[:max(1, _CHUNK // max(
                    values.shape[1], 1))]).ravel()
                if sample.size and not _not_whole(sample):
                    found.append(name)
    except (OSError, KeyError, TypeError, ValueError):
        return []
    return found


def _not_whole(values: np.ndarray) -> bool:
    """Whether values hold anything but finite whole numbers >= 0."""
    values = values.astype(np.float64, copy=False)
    return not (np.isfinite(values).all() and values.min() >= 0 and np.array_equal(values, np.rint(values)))


def _counts_elsewhere(err: DataError, path: str, command: str) -> DataError:
    """err (non-integer values in X) with the layers or raw.X that hold whole numbers named as the fix."""
    if "non-integer values" not in str(err):
        return err
    sources = _whole_number_sources(path)
    if not sources:  # train has no --round: `prepare` is where rounding is asked for
        return err if command == "prepare" else DataError(str(err).replace(
            "the round option (--round) rounds them", f"`scvae-torch prepare {path} --round` rounds them"))
    first = sources[0]
    option = "--use-raw" if first == "raw.X" else f"--layer {first.split(' ', 1)[1].strip(chr(39))}"
    how = f"read them with `{option}`" if command == "prepare" else \
        f"convert it with `scvae-torch prepare {path} {option} --out counts.h5ad`"
    text = str(err).split("; the round option")[0]
    return DataError(f"{text}; {' and '.join(sources)} of the file hold{'s' if len(sources) == 1 else ''} whole "
                     f"numbers (raw counts?): {how}")


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
            missing = [n for n, x in (("features.tsv[.gz] or genes.tsv[.gz]", genes), ("barcodes.tsv[.gz]", cells)) if x is None]
            raise _error(folder, f"10x MEX folder without {' and '.join(missing)}")
        return matrix, genes, cells, "10x"
    for suffix in (".counts.mtx.gz", ".counts.mtx"):
        if p.name.endswith(suffix):
            stem = p.name[: -len(suffix)]
            genes = _first_existing(p.parent, (f"{stem}.genes.tsv.gz", f"{stem}.genes.tsv"))
            cells = _first_existing(p.parent, (f"{stem}.cells.tsv.gz", f"{stem}.cells.tsv"))
            if genes is None or cells is None:
                missing = [n for n, x in ((f"{stem}.genes.tsv[.gz]", genes), (f"{stem}.cells.tsv[.gz]", cells)) if x is None]
                raise _error(path, f"companion file {' and '.join(missing)} not found next to it")
            return p, genes, cells, "named"
    raise _error(path, "expected a 10x MEX folder, matrix.mtx[.gz], or NAME.counts.mtx[.gz] with NAME.genes.tsv[.gz] "
                       "and NAME.cells.tsv[.gz]")


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
            raise _error(cells_path, f"no column {labels!r} for labels; columns: {', '.join(map(str, cell_table.columns))}")
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
            raise _error(genes_path, f"no '{GENE_EXPRESSION}' features (feature types: {', '.join(sorted(set(types)))})")
        X, genes, gene_ids = _keep_features(X, types == GENE_EXPRESSION, genes, gene_ids, path,
                                            f"feature_type '{GENE_EXPRESSION}'")
    counts = _finish(str(matrix_path), X, genes, cells, label_values, gene_ids,
                     integer_source=integer_source, round_counts=round_counts)
    counts.batch = batch_values
    if layout == "named":
        counts.obs = cell_table.set_index(cell_table.columns[0])
    return counts


def _batch_values(values, path: str | os.PathLike, column: str) -> np.ndarray:
    """A batch column as strings; a cell without one is a DataError naming the file and column."""
    from .batches import SourceError, batch_column

    try:
        return batch_column(values, f"{path}: column {column!r}")
    except SourceError as err:
        raise DataError(str(err)) from None


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
                                                ("--batch", batch is not None, fmt != "10x-h5")) if given and not fits]
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


def filter_counts(counts: Counts, min_counts_cell: int = 0, min_counts_gene: int = 0, source: str = "") -> Counts:
    """Drop cells, then genes, whose total count is below the given minimum; logs what was dropped."""
    X, cells, genes, labels, gene_ids = counts.X, counts.cells, counts.genes, counts.labels, counts.gene_ids
    batch = counts.batch
    keep = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel() >= min_counts_cell
    if not keep.all():
        X, cells = X[keep], cells[keep]
        labels = None if labels is None else labels[keep]
        batch = None if batch is None else batch[keep]
    _report_dropped(source, "cells", keep, min_counts_cell)
    keep = np.asarray(X.sum(axis=0, dtype=np.float64)).ravel() >= min_counts_gene
    if not keep.all():
        cols = np.flatnonzero(keep)
        X, genes = X[:, cols], genes[cols]
        gene_ids = None if gene_ids is None else gene_ids[cols]
    _report_dropped(source, "genes", keep, min_counts_gene)
    _check_left(source, X.shape[0], X.shape[1], min_counts_cell, min_counts_gene)
    return Counts(X=X, genes=genes, cells=cells, labels=labels, gene_ids=gene_ids, batch=batch)


def select_genes(counts: Counts, n: int, source: str = "") -> Counts:
    """Keep the n genes of highest binomial deviance (`scvae_torch.genes`), in their order, and record it.

    Parameters
    ----------
    counts : Counts
        Raw counts (after any count filters: the deviance uses the cells' totals over these genes).
    n : int
        Genes to keep, >= 1; at least the number of genes keeps all (logged).
    source : str
        The input's path, for the log.

    Returns
    -------
    Counts
        The kept genes, with `gene_deviance` and `selection` set.
    """
    _genes.check_count(n)
    deviance = _genes.binomial_deviance(counts.X)
    keep = _genes.rank_top(deviance, n)
    _report_selection(source, n, deviance.size)
    X = counts.X if keep.size == deviance.size else counts.X[:, keep]
    return Counts(X=X, genes=counts.genes[keep], cells=counts.cells, labels=counts.labels, batch=counts.batch,
                  gene_ids=None if counts.gene_ids is None else counts.gene_ids[keep], gene_deviance=deviance[keep],
                  selection=_selection_record(n, deviance.size))


def _selection_record(n: int, n_genes: int) -> dict:
    """What the canonical file records of a gene selection, as uns['scvae_prepare']."""
    return {"criterion": _genes.CRITERION, "top_genes": int(n), "genes_considered": int(n_genes)}


def _report_selection(source: str, n: int, n_genes: int) -> None:
    """Log what a gene selection kept (or that it kept everything)."""
    if n >= n_genes:
        log.warning("%s: asked for the top %d genes by binomial deviance but %d are left after the count "
                    "filters: keeping all", source, n, n_genes)
    else:
        log.info("%s: kept the %d of %d genes with the highest binomial deviance", source, n, n_genes)


def _report_dropped(source: str, what: str, keep: np.ndarray, minimum: int) -> None:
    """Log how many cells or genes a count threshold dropped (when one was set)."""
    if minimum:
        log.info("%s: dropped %d of %d %s with fewer than %d counts", source, int((~keep).sum()), keep.size, what,
                 minimum)


def _check_left(source: str, n_cells: int, n_genes: int, min_counts_cell: int, min_counts_gene: int) -> None:
    """Refuse a matrix the count thresholds emptied."""
    if n_cells == 0 or n_genes == 0:
        rules = [f"{what} with fewer than {n} counts" for what, n in (("cells", min_counts_cell),
                                                                      ("genes", min_counts_gene)) if n]
        raise _error(source, f"no data left after dropping {' and '.join(rules)} ({n_cells} cells x {n_genes} genes)")


def _summary_row(n_cells: int, n_genes: int, nonzeros: int, total: float, max_count: float) -> dict:
    """The summary's counts (labels filled in by the caller when there are any)."""
    return {"cells": int(n_cells), "genes": int(n_genes), "nonzeros": int(nonzeros),
            "sparsity_percent": round(100.0 * (1.0 - nonzeros / (n_cells * n_genes)), 4),
            "total_counts": round(total), "max_count": int(max_count), "labels": None, "label_counts": None}


def _natural_key(text: str) -> list:
    """Sort key that orders '2' before '10' (label codes)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def summarize(counts: Counts) -> dict:
    """The data set's Table 1 row: cells, genes, non-zeros, sparsity %, labels and cells per label."""
    nonzeros = int(counts.X.count_nonzero())
    summary = _summary_row(*counts.X.shape, nonzeros, float(counts.X.sum(dtype=np.float64)),
                           float(counts.X.max()) if nonzeros else 0.0)
    if counts.labels is not None:
        names, sizes = np.unique(counts.labels.astype(str), return_counts=True)
        summary["labels"] = int(names.size)
        summary["label_counts"] = {str(n): int(s) for n, s in sorted(zip(names, sizes), key=lambda x: _natural_key(x[0]))}
    return summary


# --- atomic output --------------------------------------------------------------------------------

@contextlib.contextmanager
def _atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary path next to `path`, renamed onto it on success and removed on failure."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
        try:  # created with the umask's permissions (mkstemp would force 0600)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _write_text_atomic(path: str, text: str) -> None:
    """Write a text file via a temporary file and a rename."""
    with _atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def write_summary(summary: dict, path: str) -> None:
    """Write a summary dict as JSON, atomically."""
    _write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def _check_space(path: str, nbytes: int) -> None:
    """Refuse a write that cannot fit: on a full disk HDF5 fails with pages of errors and may crash at exit."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise OSError(errno.ENOSPC, f"not enough space to write it ({nbytes / 1e6:.1f} MB needed, "
                                    f"{free / 1e6:.1f} MB free)", os.fspath(path))


def _obs_var(path: str, cells, genes, labels=None, gene_ids=None, batch=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The canonical file's obs (cell ids, 'label', 'batch') and var (unique gene names, 'gene_ids') tables."""
    from anndata.utils import make_index_unique

    obs = pd.DataFrame(index=pd.Index(np.asarray(cells, dtype=str).astype(object)))
    genes = pd.Index(np.asarray(genes, dtype=str).astype(object))
    n_dup = int(genes.duplicated().sum())
    if n_dup:
        log.info("%s: made %d duplicate gene names unique (suffixes -1, -2, ...)", path, n_dup)
        genes = make_index_unique(genes)
    var = pd.DataFrame(index=genes)
    if labels is not None:
        obs["label"] = pd.Categorical(np.asarray(labels, dtype=str).astype(object))
    if batch is not None:
        obs["batch"] = pd.Categorical(np.asarray(batch, dtype=str).astype(object))
    if gene_ids is not None:
        var["gene_ids"] = np.asarray(gene_ids, dtype=str).astype(object)
    return obs, var


def _selection_annotations(var: pd.DataFrame, deviance: np.ndarray | None, selection: dict | None) -> dict:
    """Put each kept gene's deviance in var['binomial_deviance']; the uns that records the selection ({} if none)."""
    if deviance is not None:
        var[_genes.CRITERION] = np.asarray(deviance, dtype=np.float64)
    return {"scvae_prepare": dict(selection)} if selection else {}


def _names_bytes(cells, genes) -> int:
    """About what the cell and gene names take in the file."""
    return sum(len(str(n)) + 16 for n in cells) + sum(len(str(n)) + 16 for n in genes)


def write_canonical(counts: Counts, path: str) -> None:
    """Write counts as the canonical AnnData file, atomically (temp path, then rename)."""
    import anndata

    X = counts.X.tocsr()
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    names = _names_bytes(counts.cells, counts.genes)
    _check_space(path, int(1.05 * (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes + names)) + (1 << 20))
    obs, var = _obs_var(path, counts.cells, counts.genes, counts.labels, counts.gene_ids, counts.batch)
    uns = _selection_annotations(var, counts.gene_deviance, counts.selection)
    adata = anndata.AnnData(X=X, obs=obs, var=var, uns=uns)
    with _atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)


def load_canonical(path: str) -> Counts:
    """Read a canonical counts.h5ad (X = CSR counts, obs['label'] optional) written by `prepare`."""
    import anndata

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _error(path, "no such file")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise OSError, KeyError, AnnDataReadError... for damaged files
        raise _error(path, f"not a readable h5ad file: {_short(err)}") from None
    if adata.X is None:
        raise _error(path, "has no X matrix")
    X = adata.X if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    labels = adata.obs["label"].to_numpy(dtype=object) if "label" in adata.obs else None
    gene_ids = adata.var["gene_ids"].to_numpy(dtype=object) if "gene_ids" in adata.var else None
    try:
        return _finish(path, sp.csr_matrix(X), adata.var_names.to_numpy(), adata.obs_names.to_numpy(), labels,
                       gene_ids)
    except DataError as err:  # train / evaluate: a log-normalised X whose counts are in a layer
        raise _counts_elsewhere(err, path, "train") from None


# --- 10x HDF5 to the canonical file, block by block -------------------------------------------------

STREAM_BLOCK_NONZEROS = 1 << 22  # stored counts per block of cells when converting out of core (~35 MB of them)


@dataclass
class StreamedPlan:
    """What the first pass over a 10x HDF5 file found: the cells and genes to keep, all values checked."""

    path: str
    genome: str | None
    round_counts: bool
    block_nonzeros: int
    cells: np.ndarray            # ids of the kept cells
    keep_cells: np.ndarray       # bool, per cell of the file
    columns: np.ndarray          # kept genes, as columns of the file's matrix
    genes: np.ndarray
    gene_ids: np.ndarray
    nonzeros_bound: int          # stored counts of the kept cells in all their genes
    gene_deviance: np.ndarray | None = None  # of the kept genes, when selected by binomial deviance
    selection: dict | None = None            # uns['scvae_prepare'] of the canonical file


def _hand_back_large_blocks() -> None:
    """On glibc, serve every allocation over 1 MiB by mmap, so that it goes back to the system when freed.

    glibc's default raises that threshold to the largest block freed so far; the conversion's blocks then
    come from the heap, whose fragments kept the process growing with the number of blocks (`python
    benchmarks/bench_read.py --streamed --cells 20000|80000` measures the peak RSS growth; figures in
    docs/data.md). Process-wide; no effect elsewhere (and none after
    training.reuse_freed_memory, which turns mmap off: not done in the same process).
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _read_block(group: h5py.Group, indptr: np.ndarray, lo: int, hi: int, n_genes: int, path: str) -> sp.csr_matrix:
    """Cells lo..hi-1 of a 10x count group as CSR (cells x all genes), index ranges checked."""
    a, b = int(indptr[lo]), int(indptr[hi])
    indices = group["indices"][a:b].astype(np.int32 if n_genes < np.iinfo(np.int32).max else np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
        raise _error(path, f"{group.name}: 'indices' of cells {lo + 1}-{hi} run outside 0..{n_genes - 1}")
    data = group["data"][a:b]
    return sp.csr_matrix((data, indices, (indptr[lo:hi + 1] - a)), shape=(hi - lo, n_genes))


def plan_10x_streamed(path: str, genome: str | None = None, round_counts: bool = False, min_counts_cell: int = 0,
                      min_counts_gene: int = 0, block_nonzeros: int = STREAM_BLOCK_NONZEROS,
                      top_genes: int | None = None) -> StreamedPlan:
    """First pass of the out-of-core conversion: check every value, apply the feature and count filters and
    the gene selection.

    Reads the file one block of cells at a time, so the matrix is never held (the cell ids and per-cell offsets
    and totals are). Same checks, filters and messages as read_10x_h5 followed by filter_counts and
    select_genes; a bad block is named by its cells. The binomial deviance of top_genes is summed in the same
    pass; with min_counts_gene as well it takes one more read of the file, since the cells' totals over the
    genes that pass that filter are only known at the end of the first.
    """
    path = os.fspath(path)
    if top_genes is not None:
        _genes.check_count(top_genes)
    _hand_back_large_blocks()
    with _open_hdf5(path) as f:
        group, n_cells, n_genes, cells, genes, gene_ids, filters = _10x_metadata(f, path, genome)
        indptr, integer_source = _csr_layout(group, path, n_cells, n_genes)
        indptr = indptr.astype(np.int64)
        cells = _as_strings(cells, path, "cell ids")
        _check_cells(path, cells, n_genes)
        columns = np.arange(n_genes)
        for keep, why in filters:
            if not keep.all():
                log.info("%s: kept %d of %d features (%s)", path, int(keep.sum()), keep.size, why)
                columns, genes, gene_ids = columns[keep], genes[keep], gene_ids[keep]
        cell_totals = np.zeros(n_cells)
        cell_nonzeros = np.zeros(n_cells, dtype=np.int64)
        gene_totals = np.zeros(len(columns))
        # every gene passes min_counts_gene 0, so the cells' totals are final and the deviance sums in this pass
        sums = _genes.DevianceSums(len(columns)) if top_genes is not None and not min_counts_gene else None
        for lo, hi in _cell_blocks(indptr, block_nonzeros):
            where = f"{path} (cells {lo + 1}-{hi})"
            X = _read_block(group, indptr, lo, hi, n_genes, path)
            X = _check_values(X[:, columns] if len(columns) < n_genes else X, where, integer_source, round_counts)
            cell_totals[lo:hi] = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
            cell_nonzeros[lo:hi] = X.getnnz(axis=1)
            kept = cell_totals[lo:hi] >= min_counts_cell
            gene_totals += np.asarray(X[kept].sum(axis=0, dtype=np.float64)).ravel()
            if sums is not None:
                sums.add(X if kept.all() else X[kept])
        keep_cells = cell_totals >= min_counts_cell
        _report_dropped(path, "cells", keep_cells, min_counts_cell)
        keep_genes = gene_totals >= min_counts_gene
        _report_dropped(path, "genes", keep_genes, min_counts_gene)
        _check_left(path, int(keep_cells.sum()), int(keep_genes.sum()), min_counts_cell, min_counts_gene)
        columns, genes, gene_ids = columns[keep_genes], genes[keep_genes], gene_ids[keep_genes]
        deviance = selection = None
        if top_genes is not None:
            if sums is None:
                sums = _genes.DevianceSums(len(columns))
                for lo, hi in _cell_blocks(indptr, block_nonzeros):
                    kept = keep_cells[lo:hi]
                    if kept.any():
                        X = _read_block(group, indptr, lo, hi, n_genes, path)[kept][:, columns]
                        sums.add(_check_values(X, f"{path} (cells {lo + 1}-{hi})", integer_source, round_counts))
            deviance = sums.deviance()
            keep = _genes.rank_top(deviance, top_genes)
            _report_selection(path, top_genes, deviance.size)
            selection = _selection_record(top_genes, deviance.size)
            columns, genes, gene_ids, deviance = columns[keep], genes[keep], gene_ids[keep], deviance[keep]
    return StreamedPlan(path, genome, round_counts, block_nonzeros, cells[keep_cells], keep_cells, columns, genes,
                        gene_ids, int(cell_nonzeros[keep_cells].sum()), deviance, selection)


def write_10x_streamed(plan: StreamedPlan, out: str) -> dict:
    """Second pass: write the kept cells and genes as the canonical h5ad, block by block and atomically (temp
    path, then rename); returns the data set's summary, as `summarize` gives it."""
    import anndata

    out = os.fspath(out)
    _hand_back_large_blocks()
    n_cells, n_genes = len(plan.cells), len(plan.genes)
    _check_space(out, int(1.05 * (8 * plan.nonzeros_bound + 8 * (n_cells + 1) + _names_bytes(plan.cells, plan.genes)))
                 + (1 << 20))
    obs, var = _obs_var(out, plan.cells, plan.genes, None, plan.gene_ids)
    uns = _selection_annotations(var, plan.gene_deviance, plan.selection)
    with _atomic_path(out, suffix=".h5ad") as tmp:
        anndata.AnnData(obs=obs, var=var, uns=uns).write_h5ad(tmp)  # obs, var and the empty slots; X written below
        try:
            nonzeros, total, max_count = _write_x_streamed(plan, tmp, n_cells, n_genes)
        except _WriteFailed as err:  # the output's error (a full disk...), not the input's
            raise err.__cause__ from None
    return _summary_row(n_cells, n_genes, nonzeros, total, max_count)


class _WriteFailed(Exception):
    """Writing the output failed (its cause is the error); kept apart from read errors of the input file."""


def _write_x_streamed(plan: StreamedPlan, tmp: str, n_cells: int, n_genes: int) -> tuple[int, float, float]:
    """Write X of the canonical file at tmp from the 10x file, block by block; (non-zeros, total, maximum)."""
    nonzeros, total, max_count = 0, 0.0, 0.0
    try:
        h = h5py.File(tmp, "r+")
    except OSError as err:
        raise _WriteFailed from err
    with h, _open_hdf5(plan.path) as f:
        group, _, n_file_genes, *_ = _10x_metadata(f, plan.path, plan.genome)
        indptr = group["indptr"][()].astype(np.int64)
        integer_source = group["data"].dtype.kind in "iub"
        try:
            X_out = h.create_group("X")  # anndata's CSR encoding, written directly so that it can grow
            X_out.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                "shape": np.array([n_cells, n_genes])})
            chunk = (min(max(plan.nonzeros_bound, 1), 1 << 18),)
            data = X_out.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=chunk)
            indices = X_out.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32,
                                           chunks=chunk)
            out_indptr = X_out.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
            out_indptr[0] = 0
        except (OSError, RuntimeError, ValueError) as err:
            raise _WriteFailed from err
        row = 0
        for lo, hi in _cell_blocks(indptr, plan.block_nonzeros):
            kept = plan.keep_cells[lo:hi]
            if not kept.any():
                continue
            block = _read_block(group, indptr, lo, hi, n_file_genes, plan.path)
            block = block if kept.all() else block[kept]
            block = block if len(plan.columns) == n_file_genes else block[:, plan.columns]
            block = _check_values(block, f"{plan.path} (cells {lo + 1}-{hi})", integer_source, plan.round_counts)
            size = block.nnz
            try:
                data.resize((nonzeros + size,))
                indices.resize((nonzeros + size,))
                data[nonzeros:] = block.data
                indices[nonzeros:] = block.indices
                out_indptr[row + 1:row + 1 + block.shape[0]] = nonzeros + block.indptr[1:]
            except (OSError, RuntimeError, ValueError) as err:
                raise _WriteFailed from err
            row += block.shape[0]
            nonzeros += size
            if size:
                total += float(block.data.sum(dtype=np.float64))
                max_count = max(max_count, float(block.data.max()))
    return nonzeros, total, max_count


STREAM_ABOVE_GB = 4.0  # `prepare` converts a 10x HDF5 file block by block when its matrix takes more in memory


def _10x_bytes_in_memory(path: str, genome: str | None) -> int:
    """What the in-memory reader would hold of a 10x HDF5 file's matrix: float32 values and int32 indices."""
    with _open_hdf5(path) as f:
        group = _10x_metadata(f, path, genome)[0]
        return 8 * _dataset(group, "data", path).shape[0] + 8 * _dataset(group, "indptr", path).shape[0]


def prepare_input(path: str, format: str = "auto", *, stream: str = "auto", stream_above_gb: float = STREAM_ABOVE_GB,
                  genome: str | None = None, layer: str | None = None, use_raw: bool = False,
                  labels: str | None = None, round_counts: bool = False, min_counts_cell: int = 0,
                  min_counts_gene: int = 0, block_nonzeros: int = STREAM_BLOCK_NONZEROS,
                  top_genes: int | None = None, batch: str | None = None) -> Counts | StreamedPlan:
    """Read and check counts for `prepare`, writing nothing: in memory (Counts), or for a 10x HDF5 file with
    stream 'on' (or 'auto' and more than stream_above_gb GiB in memory) the first pass of the block-by-block
    conversion (StreamedPlan). Either has .cells and goes to write_prepared. top_genes: keep that many genes of
    highest binomial deviance after the count filters (select_genes); None keeps all."""
    path = os.fspath(path)
    if top_genes is not None:
        _genes.check_count(top_genes)  # before reading anything
    if stream not in ("auto", "on", "off"):
        raise _error(path, f"unknown stream setting {stream!r}; choose auto, on or off")
    fmt = detect_format(path) if format == "auto" and os.path.exists(path) else format
    if stream == "on" and fmt != "10x-h5":
        raise _error(path, f"block-by-block conversion (stream on) reads 10x HDF5 files only, not {fmt}")
    if fmt == "10x-h5" and labels is None and batch is None and (
            stream == "on" or (stream == "auto" and _10x_bytes_in_memory(path, genome) > stream_above_gb * 2 ** 30)):
        log.info("%s: converting block by block (stream %s)", path, stream)
        return plan_10x_streamed(path, genome=genome, round_counts=round_counts, min_counts_cell=min_counts_cell,
                                 min_counts_gene=min_counts_gene, block_nonzeros=block_nonzeros, top_genes=top_genes)
    return read_counts(path, fmt, genome=genome, layer=layer, use_raw=use_raw, labels=labels,
                       round_counts=round_counts, min_counts_cell=min_counts_cell, min_counts_gene=min_counts_gene,
                       top_genes=top_genes, batch=batch)


def write_prepared(prepared: Counts | StreamedPlan, out: str) -> dict:
    """Write what prepare_input returned as the canonical h5ad (atomically); returns its summary."""
    if isinstance(prepared, StreamedPlan):
        return write_10x_streamed(prepared, out)
    summary = summarize(prepared)
    write_canonical(prepared, out)
    return summary


# --- splits ---------------------------------------------------------------------------------------

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
    _write_text_atomic(path, "cell\tsubset\n" + "".join(lines))


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
