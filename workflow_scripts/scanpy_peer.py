"""Rule peer_scanpy: log-normalise, PCA, k-means (k = labels) and Leiden on all cells; ARI and AMI on test cells."""

import json

import numpy as np

import _common

_common.start(snakemake)

from scvae_torch import data, evaluation, peers  # noqa: E402

p = snakemake.params
counts = data.load_canonical(snakemake.input.data)
test = data.read_split(snakemake.input.split, counts.cells)["test"]
if counts.labels is None:
    raise SystemExit(f"error: {snakemake.input.data}: no labels to score the clustering against")
labels = np.asarray(counts.labels).astype(str)
k = len(np.unique(labels))
result = peers.scanpy_route(counts.X, k, n_pcs=p.n_pcs, seed=p.seed, leiden=p.leiden)
methods = {"kmeans_pca_lognorm": result["kmeans"]}
if result["leiden"] is not None:
    methods["leiden_knn"] = result["leiden"]
scores = {name: {**evaluation.cluster_scores(labels[test], pred[test]), "clusters_found": int(len(np.unique(pred)))}
          for name, pred in methods.items()}
metrics = {"implementation": result["implementation"], "n_pcs": result["n_pcs"], "k": k,
           "test_cells": int(len(test)), "seconds": result["seconds"], "methods": scores}
_common.write_text(snakemake.output[0], json.dumps(metrics, indent=2) + "\n")
print(json.dumps(metrics, indent=2))
