"""An in-memory AnnData's counts, labels and batches, checked as `prepare` checks a file (the SCVAE API's input)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..batches import SourceError, batch_column
from .validation import DataError, refuse_bad_counts


def _describe(layer: str | None) -> str:
    """Where the counts are, as a user would write it."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def counts(adata, layer: str | None) -> sp.csr_matrix:
    """The raw counts of an AnnData (X or a layer) as CSR, checked like `prepare` checks a file; no copy of a
    CSR matrix in canonical form."""
    where = _describe(layer)
    if layer is not None and layer not in adata.layers:
        raise DataError(f"{where}: no such layer (layers: {', '.join(map(str, adata.layers)) or 'none'})")
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise DataError(f"{where}: empty; give the layer that holds the raw counts (layer=...)")
    if sp.issparse(X):
        X = sp.csr_matrix(X) if not isinstance(X, sp.csr_matrix) else X
    elif isinstance(X, np.ndarray):
        X = sp.csr_matrix(X)
    else:
        raise DataError(f"{where}: a {type(X).__name__}; expected a numpy array or a scipy sparse matrix "
                        "(a backed AnnData: load it with adata.to_memory())")
    if X.dtype.kind not in "iuf":
        raise DataError(f"{where}: values of type {X.dtype}; expected counts (integers or whole floats)")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{where}: {X.shape[0]} cells x {X.shape[1]} genes; nothing to train on")
    others = [name for name in adata.layers if name != layer]
    hint = (f"are the raw counts in {', '.join(f'layer={n!r}' for n in others)}?" if others
            else "give the raw counts (adata.raw, or a layer with layer=...)")
    refuse_bad_counts(X.data, where, integer_source=X.dtype.kind in "iu", hint=hint)
    if not X.has_canonical_format:  # duplicate entries would be counted apart by the sparse-aware likelihood
        X = X.copy()
        X.sum_duplicates()
    return X


def labels(adata, labels_key: str | None) -> np.ndarray | None:
    """obs[labels_key] as strings, or None; missing values are an error."""
    if labels_key is None:
        return None
    if labels_key not in adata.obs:
        raise DataError(f"adata.obs: no column {labels_key!r} (labels_key)")
    column = adata.obs[labels_key]
    missing = int(column.isna().sum())
    if missing:
        raise DataError(f"adata.obs[{labels_key!r}]: {missing} cells without a label")
    return column.astype(str).to_numpy()


def batch_names(adata, batch_key: str | None) -> np.ndarray | None:
    """obs[batch_key] as strings, or None; a missing column or a cell without a batch is a DataError."""
    if batch_key is None:
        return None
    if batch_key not in adata.obs:
        raise DataError(f"adata.obs: no column {batch_key!r} (batch_key)")
    try:
        return batch_column(adata.obs[batch_key], f"adata.obs[{batch_key!r}]")
    except SourceError as err:
        raise DataError(str(err)) from None
