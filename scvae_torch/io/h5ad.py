"""The AnnData .h5ad reader: X, a layer or raw.X; labels from an obs column."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .hdf5 import _open_hdf5, _read_compressed
from .validation import _CHUNK, Counts, DataError, _batch_values, _error, _finish, _short


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
        raise _error(path, f"{what} has an unsupported encoding {encoding!r} "
                           "(expected csr_matrix, csc_matrix or dense)")
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


def read_obs_columns(path: str, columns: list[str], what: str = "the cell filter") -> dict[str, np.ndarray]:
    """The values of some obs columns of an h5ad file (one per cell), by name."""
    with _open_hdf5(path) as f:
        if not isinstance(f.get("obs"), h5py.Group):
            raise _error(path, "not an AnnData .h5ad file (no 'obs' group)")
        return {column: _h5ad_labels(f["obs"], column, path, what) for column in columns}


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
            raise _error(path, "obs/var without an index: an old or foreign h5ad layout; "
                               "re-save it with anndata >= 0.8")
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
