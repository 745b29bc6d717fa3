"""The canonical counts.h5ad (X = CSR float32 counts, obs['label'] optional): write and load it."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import genes as _genes
from .atomic import atomic_path, write_text
from .h5ad import _counts_elsewhere
from .validation import Counts, DataError, _error, _finish, _short

log = logging.getLogger(__name__)


def write_summary(summary: dict, path: str) -> None:
    """Write a summary dict as JSON, atomically."""
    write_text(path, json.dumps(summary, indent=2) + "\n")


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
    with atomic_path(path, suffix=".h5ad") as tmp:
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
