"""The shared labelled data sets (the MTX layout of SCVAE_SHARED_DATA) as AnnData, for the benchmark studies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np


def shared_folder(folder: str | Path | None = None) -> Path:
    """The shared data folder: `folder`, else $SCVAE_SHARED_DATA; exits with one line when neither is given."""
    folder = folder or os.environ.get("SCVAE_SHARED_DATA")
    if not folder:
        sys.exit("set SCVAE_SHARED_DATA to the folder of the shared data sets")
    return Path(folder)


def load_shared(name: str, top_genes: int | None = 2000, singlets: bool = True, within_batches: bool = False,
                folder: str | Path | None = None):
    """A shared set as an AnnData: raw counts (CSR float32), obs['label'] and, where the set has one, obs['batch'].

    singlets: keep the cells demuxlet calls singlets (sets with a demuxlet_cls column). Genes without counts are
    dropped; top_genes keeps that many of highest binomial deviance (within the set's batches when
    within_batches), in their order.
    """
    import anndata as ad
    import pandas as pd

    from scvae_torch.data import read_mtx
    from scvae_torch.genes import top_genes as top

    counts = read_mtx(str(shared_folder(folder) / f"{name}.counts.mtx.gz"), labels="cell_type")
    table = counts.obs if counts.obs is not None else pd.DataFrame()
    rows = np.arange(counts.X.shape[0])
    if singlets and "demuxlet_cls" in table:
        rows = np.flatnonzero((table["demuxlet_cls"] == "SNG").to_numpy())
    X = counts.X[rows].tocsr()
    batch = table["batch"].astype(str).to_numpy()[rows] if "batch" in table else None
    keep = np.flatnonzero(np.asarray(X.sum(0)).ravel() > 0)
    if top_genes and keep.size > top_genes:
        keep = np.sort(top(X, top_genes, batch=batch if within_batches else None))
    obs = pd.DataFrame({"label": np.asarray(counts.labels)[rows].astype(str)},
                       index=np.asarray(counts.cells)[rows].astype(str))
    if batch is not None:
        obs["batch"] = batch.astype(str)
    adata = ad.AnnData(X[:, keep].astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=np.asarray(counts.genes)[keep].astype(str)))
    adata.var_names_make_unique()
    return adata
