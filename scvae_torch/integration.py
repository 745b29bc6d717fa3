"""Whether batch correction worked: cluster agreement with the cell types, batch mixing and type separation of a
latent space (scikit-learn throughout).

Scores, each in [0, 1] with 1 best:

- ``ari`` / ``ami``: adjusted Rand index / adjusted mutual information of the clusters against the cell types.
- ``batch_entropy``: kNN batch mixing. For each cell, the entropy of the batches among its k nearest neighbours
  (Euclidean, itself excluded), divided by the entropy of the batches' overall proportions, averaged over cells
  and capped at 1: 1 when every neighbourhood is as mixed as the data set, 0 when neighbours share the cell's batch.
- ``batch_asw``: silhouette by batch within each cell type (scIB's batch ASW): 1 - |s| per cell, averaged per
  type, then over types; 1 = the batches overlap within every type.
- ``type_asw``: silhouette by cell type, rescaled (s + 1) / 2; 1 = types compact and apart.
"""

from __future__ import annotations

import numpy as np

from .evaluation import cluster_scores, kmeans_labels, log_normalise

SCORES = ("ari", "ami", "batch_entropy", "batch_asw", "type_asw")


def _codes(values: np.ndarray) -> np.ndarray:
    """Integer codes 0..n-1 of any labels."""
    return np.unique(np.asarray(values).astype(str), return_inverse=True)[1]


def batch_entropy(Z: np.ndarray, batch: np.ndarray, k: int = 30) -> float:
    """Mean normalised entropy of the batches among each cell's k nearest neighbours (see the module docstring).

    Parameters
    ----------
    Z
        Cells x dimensions embedding.
    batch
        Each cell's batch.
    k
        Neighbours per cell (at most cells - 1).

    Returns
    -------
    float in [0, 1]; nan with one batch.
    """
    from sklearn.neighbors import NearestNeighbors

    codes = _codes(batch)
    n_batches = codes.max() + 1 if codes.size else 0
    if n_batches < 2:
        return float("nan")
    k = max(1, min(k, len(codes) - 1))
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(Z).kneighbors(Z, return_distance=False)
    neighbours = neighbours[:, 1:]  # the cell itself first (distance 0) - dropped
    counts = np.zeros((len(codes), n_batches))
    np.add.at(counts, (np.repeat(np.arange(len(codes)), k), codes[neighbours].ravel()), 1.0)
    p = counts / k
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    overall = np.bincount(codes, minlength=n_batches) / len(codes)
    h_max = -(overall * np.log(overall)).sum()
    return float(np.minimum(h / h_max, 1.0).mean())


def batch_asw(Z: np.ndarray, batch: np.ndarray, labels: np.ndarray) -> float:
    """scIB's batch silhouette: mean over cell types of the mean of 1 - |silhouette by batch| within the type.

    Types present in a single batch are skipped; nan when no type spans two batches.
    """
    from sklearn.metrics import silhouette_samples

    batch, labels = np.asarray(batch).astype(str), np.asarray(labels).astype(str)
    per_type = []
    for t in np.unique(labels):
        cells = labels == t
        if len(np.unique(batch[cells])) < 2 or cells.sum() < 3:
            continue
        s = silhouette_samples(Z[cells], batch[cells])
        per_type.append(float(np.mean(1.0 - np.abs(s))))
    return float(np.mean(per_type)) if per_type else float("nan")


def type_asw(Z: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette by cell type, rescaled to [0, 1] as (s + 1) / 2."""
    from sklearn.metrics import silhouette_score

    return float((silhouette_score(Z, np.asarray(labels).astype(str)) + 1.0) / 2.0)


def integration_scores(Z: np.ndarray, labels: np.ndarray, batch: np.ndarray, clusters: np.ndarray | None = None,
                       k: int = 30, seed: int = 0) -> dict[str, float]:
    """All SCORES of an embedding; clusters default to k-means on Z with as many clusters as cell types.

    Parameters
    ----------
    Z
        Cells x dimensions embedding (a latent space, or principal components).
    labels, batch
        Each cell's type and batch.
    clusters
        The method's own clusters (e.g. a GMVAE's argmax q(y|x)); None: k-means.
    k
        Neighbours for `batch_entropy`.
    """
    Z = np.asarray(Z, dtype=np.float64)
    if clusters is None:
        clusters = kmeans_labels(Z, len(np.unique(np.asarray(labels).astype(str))), seed)
    return {**cluster_scores(np.asarray(labels).astype(str), clusters), "batch_entropy": batch_entropy(Z, batch, k),
            "batch_asw": batch_asw(Z, batch, labels), "type_asw": type_asw(Z, labels)}


def log_pca(X, n_pcs: int = 30, seed: int = 0) -> np.ndarray:
    """The classical embedding: the first principal components of log(1 + counts per 10,000)."""
    from sklearn.decomposition import PCA

    logged = log_normalise(X, dtype=np.float64)
    n_pcs = max(1, min(n_pcs, min(logged.shape) - 1))
    return PCA(n_components=n_pcs, random_state=seed).fit_transform(logged.toarray())


def compare(latents: dict[str, str], data_path: str, n_pcs: int = 30, neighbours: int = 30, seed: int = 0):
    """Score trained models' latents and the PCA baseline on one data set (all its cells); the pipeline's
    integration table.

    Parameters
    ----------
    latents
        {method: latent.h5ad of an evaluated run} (obsm 'X_scvae'; a GMVAE's own clusters in obs
        'scvae_cluster', else k-means with as many clusters as cell types).
    data_path
        The canonical counts.h5ad with obs 'label' and 'batch'; its log-normalised counts give the method
        'pca' (`log_pca` with n_pcs components, then k-means).

    Returns
    -------
    (scores, embeddings): a DataFrame with one row per method (method; clusters: gmvae or kmeans; cell_types;
    cells; SCORES), and an AnnData of the cells with obs 'label' and 'batch', each method's embedding in
    obsm[method] and the methods in order in uns['methods'].
    """
    import anndata as ad
    import pandas as pd

    from .batches import SourceError, read_batches
    from .io.canonical import load_canonical
    from .io.validation import DataError

    counts = load_canonical(data_path)
    if counts.labels is None:
        raise DataError(f"{data_path}: no obs['label'] column; integration scores need the cell types")
    try:
        batch = read_batches(data_path)
    except SourceError as err:
        raise DataError(str(err)) from None
    labels = np.asarray(counts.labels).astype(str)
    cells = np.asarray(counts.cells, dtype=str)
    k = len(np.unique(labels))
    found: dict[str, tuple[np.ndarray, np.ndarray | None, str]] = {}
    for method, path in latents.items():
        latent = ad.read_h5ad(path)
        if not np.array_equal(latent.obs_names.to_numpy(dtype=str), cells):
            raise DataError(f"{path}: its cells differ from those of {data_path}")
        own = latent.obs["scvae_cluster"].to_numpy() if "scvae_cluster" in latent.obs else None
        found[method] = (np.asarray(latent.obsm["X_scvae"], dtype=np.float64), own, "gmvae" if own is not None
                         else "kmeans")
    found["pca"] = (log_pca(counts.X, n_pcs, seed), None, "kmeans")
    rows = []
    embeddings = ad.AnnData(obs=pd.DataFrame({"label": pd.Categorical(labels), "batch": pd.Categorical(batch)},
                                             index=pd.Index(cells)))
    for method, (Z, clusters, how) in found.items():
        scores = integration_scores(Z, labels, batch, clusters, k=neighbours, seed=seed)
        rows.append({"method": method, "clusters": how, "cell_types": k, "cells": len(cells), **scores})
        embeddings.obsm[method] = Z
    embeddings.uns["methods"] = list(found)
    return pd.DataFrame(rows, columns=["method", "clusters", "cell_types", "cells", *SCORES]), embeddings
