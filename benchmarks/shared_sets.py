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


# sets whose cells table lacks demuxlet's calls, and the set whose table has them for the same cells (cell ids
# prefixed): cellbench_celseq2_3cl's 274 cells are the celseq2 platform of cellbench_3cl_2platforms, whose
# demuxlet_cls marks the 34 doublets its README lists
DEMUXLET_CALLS_IN = {"cellbench_celseq2_3cl": ("cellbench_3cl_2platforms", "celseq2_")}


def demuxlet_calls(name: str, cells: np.ndarray, folder: str | Path | None = None) -> np.ndarray | None:
    """demuxlet_cls (SNG / DBL) of a set's cells read from the set that annotates them, or None if none does."""
    import pandas as pd

    if name not in DEMUXLET_CALLS_IN:
        return None
    other, prefix = DEMUXLET_CALLS_IN[name]
    path = shared_folder(folder) / f"{other}.cells.tsv.gz"
    table = pd.read_csv(path, sep="\t", dtype=str).set_index("cell_id")["demuxlet_cls"]
    ids = np.char.add(prefix, np.asarray(cells, dtype=str))
    missing = np.setdiff1d(ids, table.index)
    if missing.size:
        sys.exit(f"{path}: no demuxlet call for {missing.size} cells of {name} (e.g. {missing[0]})")
    return table.loc[ids].to_numpy()


def load_shared(name: str, top_genes: int | None = 2000, singlets: bool = True, within_batches: bool = False,
                folder: str | Path | None = None):
    """A shared set as an AnnData: raw counts (CSR float32), obs['label'] and, where the set has one, obs['batch'].

    singlets: keep the cells demuxlet calls singlets (sets with a demuxlet_cls column, or whose calls another
    set's table holds: DEMUXLET_CALLS_IN). Genes without counts are
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
    calls = table["demuxlet_cls"].to_numpy() if "demuxlet_cls" in table else demuxlet_calls(name, counts.cells,
                                                                                             folder)
    if singlets and calls is not None:
        rows = np.flatnonzero(calls == "SNG")
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
