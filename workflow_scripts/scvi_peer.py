"""Rule peer_scvi: scVI on scvae-torch's data, split, latent size and epochs; test ELBO, marginal LL, ARI, AMI.

Run as a command (not a Snakemake script) so that it can use another interpreter, one with scvi-tools.
"""

import argparse  # noqa: I001 (_common must come before scvae_torch: it puts this checkout on sys.path)
import json
import sys
from pathlib import Path

import numpy as np

import _common  # noqa: F401  (puts this checkout on sys.path where scvae_torch is not installed)

from scvae_torch import data, evaluation, peers  # noqa: E402
from scvae_torch.config import default_epochs  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
for name in ("--data", "--split", "--model", "--likelihood", "--out"):
    parser.add_argument(name, required=True)
parser.add_argument("--iw-samples", type=int, default=100)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()

try:
    counts = data.load_canonical(args.data)
    subsets = data.read_split(args.split, counts.cells)
except data.DataError as err:
    print(f"error: {err}")
    sys.exit(1)
if counts.labels is None:
    print(f"error: {args.data}: no labels to score the clustering against")
    sys.exit(1)
ours = json.loads(Path(args.model).read_text())  # the scvae-torch VAE this run is matched to
epochs = ours.get("train_epochs") or default_epochs(len(subsets["train"]))
result = peers.scvi_fit(counts.X, subsets, args.likelihood, n_latent=ours["latent"], max_epochs=epochs,
                        batch_size=ours["train_batch_size"], lr=ours["train_lr"], kl_warmup=ours["train_kl_warmup"],
                        early_stopping=ours["train_early_stopping"], patience=ours["train_patience"],
                        seed=args.seed, n_mc_samples=args.iw_samples, threads=args.threads)
labels = np.asarray(counts.labels).astype(str)
k = len(set(labels))
test = subsets["test"]
clusters = evaluation.kmeans_labels(result.pop("latent").astype("float64"), k, args.seed)
metrics = {**result, "likelihood": args.likelihood, "latent": ours["latent"], "max_epochs": epochs, "k": k,
           "iw_samples": args.iw_samples, "test_cells": int(len(test)),
           **evaluation.cluster_scores(labels[test], clusters[test])}
_common.write_text(args.out, json.dumps(metrics, indent=2) + "\n")
print(json.dumps(metrics, indent=2))
