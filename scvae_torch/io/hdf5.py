"""Opening HDF5 files and reading their compressed sparse matrices, with one-line errors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import h5py
import numpy as np
import scipy.sparse as sp

from .validation import _error, _short


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
