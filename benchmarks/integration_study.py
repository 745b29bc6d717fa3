"""Batch correction measured on real data with known truth (the CellBench mixtures in the shared data folder).

For each data set: the singlets (demuxlet_cls == SNG), the top genes by binomial deviance within batches
(--pooled-genes: of the pooled cells), and three embeddings,
each scored by scvae_torch.integration (cell-type ARI/AMI of the clusters, kNN batch entropy, batch silhouette,
type silhouette):

- ``gmvae+batch``: the GMVAE conditioned on the batch (SCVAE(..., batch_key="batch")), clusters argmax q(y|x);
- ``gmvae``: the same model without the covariate;
- ``pca``: 30 principal components of log-normalised counts, k-means clusters;

with K = number of cell lines. Prints the table (mean and sd over seeds) and writes it with --out.

    SCVAE_SHARED_DATA=/work/shared/data python3 benchmarks/integration_study.py --seeds 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

DATASETS = ("cellbench_3cl_2platforms", "cellbench_5cl_3plates")


def load(folder: str | Path, name: str, top: int = 2000, within_batches: bool = True):
    """The data set's singlets on its `top` genes by binomial deviance (summed within batches, or of the pooled
    cells), as an AnnData with obs 'label' (the cell line) and 'batch'."""
    from shared_sets import load_shared

    return load_shared(name, top, singlets=True, within_batches=within_batches, folder=folder)


def run_methods(adata, seed: int, threads: int = 1, methods: tuple[str, ...] = ("gmvae+batch", "gmvae", "pca"),
                max_epochs: int | None = None, **model_options) -> dict[str, dict]:
    """Scores (and embeddings) of each method on one data set and seed: {method: {"scores", "Z", "seconds"}}."""
    import torch

    from scvae_torch import SCVAE
    from scvae_torch.integration import integration_scores, log_pca

    torch.set_num_threads(threads)
    labels, batch = adata.obs["label"].to_numpy(), adata.obs["batch"].to_numpy()
    k = len(np.unique(labels))
    out = {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "pca":
            Z, clusters = log_pca(adata.X, 30, seed), None
        else:
            model = SCVAE(adata, model="gmvae", components=k, batch_key="batch" if method.endswith("+batch") else None,
                          **model_options)
            model.train(seed=seed, threads=threads, max_epochs=max_epochs)
            Z, clusters = model.get_latent_representation(), model.predict_clusters()
        scores = integration_scores(Z, labels, batch, clusters, seed=seed)
        out[method] = {"scores": scores, "Z": Z, "seconds": time.perf_counter() - t0}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("SCVAE_SHARED_DATA"),
                        help="shared data folder (default: $SCVAE_SHARED_DATA)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--top-genes", type=int, default=2000)
    parser.add_argument("--pooled-genes", action="store_true",
                        help="rank the genes by the deviance of the pooled cells (default: within batches)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on epochs (default: SCVAE's)")
    parser.add_argument("--options", default="{}", help="model options as JSON, e.g. '{\"library_size\": true}'")
    parser.add_argument("--out", help="write the per-seed table here (TSV)")
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("give --data or set SCVAE_SHARED_DATA")
    rows = []
    for name in args.datasets:
        adata = load(args.data, name, args.top_genes, within_batches=not args.pooled_genes)
        for seed in args.seeds:
            for method, result in run_methods(adata, seed, args.threads, max_epochs=args.max_epochs,
                                              **json.loads(args.options)).items():
                rows.append({"dataset": name, "method": method, "seed": seed, **result["scores"],
                             "seconds": round(result["seconds"], 1)})
                scores = "\t".join(f"{k} {v:.3f}" for k, v in result["scores"].items())
                print(f"{name}\t{method}\tseed {seed}\t{scores}", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    if args.out:
        table.to_csv(args.out, sep="\t", index=False, float_format="%.4f")
    summary = table.drop(columns="seed").groupby(["dataset", "method"], sort=False).agg(["mean", "std"])
    summary.columns = [f"{a}_{b}" for a, b in summary.columns]
    print(summary.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
