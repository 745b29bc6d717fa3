"""Rule cluster: GMVAE clusters, k-means on each VAE latent and on PCA of log-normalised counts (test cells)."""

import anndata as ad
import numpy as np
import pandas as pd

import _common

_common.start(snakemake)

from scvae_torch import data, evaluation  # noqa: E402

p = snakemake.params
counts = data.load_canonical(snakemake.input.data)
subsets = data.read_split(snakemake.input.split, counts.cells)
subset = np.empty(len(counts.cells), dtype=object)
for name, rows in subsets.items():
    subset[rows] = name
labels = None if counts.labels is None else np.asarray(counts.labels).astype(str)
k = len(np.unique(labels)) if labels is not None else p.k
assign = pd.DataFrame({"cell": counts.cells, "subset": subset})
if labels is not None:
    assign["label"] = labels

methods = []  # (column, method, run, model settings)
for run, path in zip(p.runs, snakemake.input.latents):
    latent = ad.read_h5ad(path)
    if not np.array_equal(latent.obs_names.to_numpy(dtype=str), np.asarray(counts.cells, dtype=str)):
        raise SystemExit(f"error: {path}: cells differ from {snakemake.input.data}")
    settings = latent.uns.get("scvae", {})
    if "scvae_cluster" in latent.obs:
        assign[run] = latent.obs["scvae_cluster"].astype(int).to_numpy()
        methods.append((run, "gmvae_clusters", run, settings))
    else:
        assign[run] = evaluation.kmeans_labels(np.asarray(latent.obsm["X_scvae"], dtype=np.float64), k, p.seed)
        methods.append((run, "kmeans_vae_latent", run, settings))
if labels is not None:  # the classical baseline only matters where it can be scored
    assign["pca_lognorm"] = evaluation.pca_kmeans_baseline(counts.X, k, n_pcs=p.n_pcs, seed=p.seed)
    methods.append(("pca_lognorm", "kmeans_pca_lognorm", "-", {}))

rows = []
if labels is not None:
    test = subsets["test"]
    for column, method, run, settings in methods:
        pred = assign[column].to_numpy()[test]
        scores = evaluation.cluster_scores(labels[test], pred)
        rows.append({"dataset": snakemake.wildcards.dataset, "method": method, "run": run,
                     "likelihood": settings.get("likelihood", "-"),
                     "y_regularisation": run.split("-y")[1] if "-y" in run else "-",
                     "k": k, "clusters_found": int(len(np.unique(pred))), "test_cells": int(len(test)), **scores})
scores = pd.DataFrame(rows, columns=["dataset", "method", "run", "likelihood", "y_regularisation", "k",
                                     "clusters_found", "test_cells", "ari", "ami"])
_common.write_table(scores, snakemake.output.scores)
_common.write_table(assign, snakemake.output.assignments)
print(scores.to_string() if len(scores) else "no labels: assignments only")
