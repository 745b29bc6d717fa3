"""Study: the SCVAE defaults against the old ones (and single changes), on data they were not tuned on.

Usage:
  SCVAE_SHARED_DATA=../shared/data python benchmarks/defaults_study.py [--sets mouse_bladder_2100,...]
      [--variants old,new,...] [--model vae] [--likelihood nb] [--seeds 0] [--threads 2] [--out FILE.tsv]

Each (data set, variant, seed) keeps the --top-genes most informative genes (binomial deviance), trains
`scvae_torch.SCVAE` on the 81/9/10 split (seeded) and prints one row:
the test ELBO per cell, the importance-weighted log-likelihood (--iw samples) on the test cells, the ARI/AMI of
k-means (k = number of labels) on the latent of all cells and, for a GMVAE, of its own clusters, the epochs
run and the seconds. Data sets: the shared labelled sets in the MTX layout (read by the project's reader,
genes with no count dropped) and `sim-sc` / `poisson-check` (the project's simulations).
Variants (each a set of SCVAE/train options; "new" is the library's defaults):
  old       lr 1e-4, 100 epochs, no early stopping, raw encoder input, no GMVAE pre-training (the previous defaults)
  new       the defaults
  lr1e-4    the defaults but lr 1e-4;  lr3e-3: lr 3e-3
  raw       the defaults but the encoders see raw counts
  patience10 / patience60: early stopping patience 10 / 60
  latent10  latent size 10
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

VARIANTS = {
    "old": ({"log1p_input": False}, {"lr": 1e-4, "max_epochs": 100, "early_stopping": False, "pretrain_epochs": 0}),
    "new": ({}, {}),
    "lr1e-4": ({}, {"lr": 1e-4}),
    "lr3e-3": ({}, {"lr": 3e-3}),
    "raw": ({"log1p_input": False}, {}),
    "patience10": ({}, {"patience": 10}),
    "patience60": ({}, {"patience": 60}),
    "latent10": ({"latent": 10}, {}),
}


def load(name: str, top_genes: int | None = None):
    """An AnnData (raw counts, obs['label']) of a shared set or a simulation."""
    if name not in ("sim-sc", "poisson-check"):
        from shared_sets import load_shared

        return load_shared(name, top_genes, singlets=False)
    import anndata as ad
    import scipy.sparse as sp

    from scvae_torch import simulate

    sim = simulate.single_cell(5000, 2000, 6, seed=0) if name == "sim-sc" else simulate.poisson_check(2000, 10)
    X, labels = sp.csr_matrix(sim.X, dtype=np.float32), sim.labels
    keep = np.asarray(X.sum(0)).ravel() > 0
    if top_genes and keep.sum() > top_genes:  # the most informative genes (binomial deviance), as prepare does
        from scvae_torch.genes import top_genes as top

        keep = np.zeros(X.shape[1], bool)
        keep[top(X, top_genes)] = True
    adata = ad.AnnData(X[:, keep].tocsr())
    adata.obs_names = [f"cell{i}" for i in range(X.shape[0])]
    adata.var_names = np.asarray([f"gene{j}" for j in range(X.shape[1])])[keep]
    if labels is not None:
        adata.obs["label"] = np.asarray(labels, dtype=str)
    return adata


def run(adata, variant: str, model: str, likelihood: str, seed: int, iw: int, components: int | None) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    from scvae_torch import SCVAE

    model_opts, train_opts = VARIANTS[variant]
    labels = adata.obs["label"].to_numpy() if "label" in adata.obs else None
    k = len(set(labels)) if labels is not None else 1
    extra = {"components": components or k} if model == "gmvae" else {}
    t0 = time.perf_counter()
    m = SCVAE(adata, model=model, likelihood=likelihood, **extra, **model_opts)
    m.train(train_size=0.81, validation_size=0.09, seed=seed, **train_opts)
    seconds = time.perf_counter() - t0
    row = {"epochs": len(m.history), "best_epoch": m.metrics.get("best_epoch"), "seconds": round(seconds, 1),
           "test_elbo": m.get_elbo(indices=m.test_indices)}
    if iw:
        row["test_iw_ll"] = m.get_marginal_ll(indices=m.test_indices, n_samples=iw)
    if labels is not None and k > 1:
        z = adata.obsm["X_scvae"]
        pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
        row["kmeans_ari"] = adjusted_rand_score(labels, pred)
        row["kmeans_ami"] = adjusted_mutual_info_score(labels, pred)
        if model == "gmvae":
            clusters = adata.obs["scvae_cluster"].to_numpy()
            row["cluster_ari"] = adjusted_rand_score(labels, clusters)
            row["cluster_ami"] = adjusted_mutual_info_score(labels, clusters)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="mouse_bladder_2100,cellbench_celseq2_3cl")
    p.add_argument("--variants", default="old,new")
    p.add_argument("--model", default="vae")
    p.add_argument("--likelihood", default="nb")
    p.add_argument("--components", type=int, default=None, help="GMVAE K (default: number of labels)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--top-genes", type=int, default=2000, help="keep this many genes by binomial deviance (0: all)")
    p.add_argument("--iw", type=int, default=100, help="importance samples for the test log-likelihood (0: off)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also append the rows to this TSV")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"# load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; {args.threads} threads", flush=True)
    header = None
    for name in args.sets.split(","):
        adata = load(name, args.top_genes)
        for variant in args.variants.split(","):
            for seed in map(int, args.seeds.split(",")):
                row = {"dataset": name, "cells": adata.n_obs, "genes": adata.n_vars, "model": args.model,
                       "likelihood": args.likelihood, "variant": variant, "seed": seed,
                       **run(adata.copy(), variant, args.model, args.likelihood, seed, args.iw, args.components)}
                if header is None:
                    header = list(row)
                    print("\t".join(header), flush=True)
                line = "\t".join(f"{row.get(k, ''):.4f}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                                 for k in header)
                print(line, flush=True)
                if args.out:
                    new = not os.path.exists(args.out)
                    with open(args.out, "a") as fh:
                        if new:
                            fh.write("\t".join(header) + "\n")
                        fh.write(line + "\n")


if __name__ == "__main__":
    main()
