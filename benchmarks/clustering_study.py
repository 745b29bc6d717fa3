"""Study: do the GMVAE's own clusters (and the latents) find the cell types? Each option on and off, several seeds.

Usage:
  SCVAE_SHARED_DATA=../shared/data python benchmarks/clustering_study.py [--sets hard-sim,cellbench_celseq2_3cl,...]
      [--variants gmvae,gmvae+lib,...] [--seeds 0,1,2] [--max-epochs N] [--scvi] [--threads 1] [--out FILE.tsv]
      [--misplaced] [--posteriors]

For each data set: the most informative --top-genes genes (binomial deviance; the simulation keeps all), the
cells' labels (the CellBench sets: singlets only, plates ignored), K = the number of labels. Baselines, once per
seed: k-means on 50 principal components of log-normalised counts (scanpy's route, peers.scanpy_route) and, with
--scvi, k-means on scVI's latent (10 dimensions, NB, same split). Then each variant trains `scvae_torch.SCVAE` on
the seeded 81/9/10 split and prints one row: the GMVAE's own clusters (as its cluster_posterior reads them; also
argmax of the encoder's q(y|x) as encoder_clusters and of q*(y|x) as elbo_clusters) and k-means (k = K) on its
latent, as ARI and AMI on all cells; the best validation ELBO and the test ELBO per cell; epochs and seconds.
--misplaced also prints, for each clustering, the cells it places apart from their label (clusters matched to
labels one to one), with their library sizes and where those rank among all cells' (a shallow cell has little
evidence of its type), how many nats the chosen cluster's log-probability is above the label's, and each
p(z|y)'s variance. --posteriors adds two readings of a GMVAE's clusters without the plug-in
(sampled_component_scores) as mc_ and iw_clusters.
Nothing here looks at the labels but the scores: initialisations are chosen by validation ELBO.

Variants: a model (vae | gmvae) and options joined by "+":
  lib       library_size=True: decoded mean = observed library size x softmax over genes (scVI's scaling)
  norm      normalise_input=True: the encoders see log1p of counts per 10,000
  learned   prior_y="learned": mixture weights p(y) learned (scVAE's "learn")
  sharedvar prior_z_variance="shared": one diagonal variance for every p(z|y) (compvar: each its own)
  rN        init_restarts=N: N k-means initialisations of p(z|y), the best validation ELBO kept
  ldN       lr_drops=N: at early stopping, cut the learning rate tenfold and train on from best.pt, N times
  mrN       mixture_restarts=N: restarts of the trained mixture from k-means of its latent (0: none)
  latN      latent size N
  dropN     dropout N % in the hidden layers
  preN      pretrain_epochs=N: N epochs of VAE pre-training before the mixture prior is set
  epN       at most N epochs for this variant (--max-epochs caps every model, scVI's too)
  bsN       batch_size=N: minibatches of N cells
  kwN       kl_warmup=N: the KL terms' weight rises linearly from 0 to 1 over the first N epochs
  qelbo     cluster_posterior="elbo": clusters from the ELBO-optimal q*(y|x) (default: the encoder's q(y|x))
  qenc      cluster_posterior="encoder" (the default since the study of docs/clustering.md)
  defaults  nothing changed (the library's defaults, whatever they are)
  paper     the paper's GMVAE as config/paper.yaml trains it (uniform p(y), no library size, raw input)
Data sets: hard-sim (simulate.single_cell(3000, 1000, 6, hard=True)), and the shared sets by name.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

SHARED = ("mouse_bladder_2100", "cellbench_celseq2_3cl", "cellbench_5cl_3plates")


def load(name: str, top_genes: int = 2000, within_batches: bool = False):
    """An AnnData (raw counts CSR, obs['label']) of the hard simulation or a shared set; within_batches: rank the
    genes by their deviance within the set's batches (plates, platforms), where it has a batch column."""
    if name != "hard-sim":
        from shared_sets import load_shared

        return load_shared(name, top_genes, singlets=True, within_batches=within_batches)
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from scvae_torch import simulate

    sim = simulate.single_cell(3000, 1000, 6, seed=0, hard=True)
    X, labels = sp.csr_matrix(sim.X, dtype=np.float32), np.asarray(sim.labels)
    cells, genes = np.array([f"cell{i}" for i in range(X.shape[0])]), np.array([f"g{j}" for j in range(X.shape[1])])
    return ad.AnnData(X, obs=pd.DataFrame({"label": labels.astype(str)}, index=cells),
                      var=pd.DataFrame(index=genes))


def options(variant: str) -> tuple[str, dict, dict]:
    """(model, SCVAE options, train options) of a variant name."""
    model, *parts = variant.split("+")
    model_opts: dict = {}
    train_opts: dict = {}
    for part in parts:
        if part == "lib":
            model_opts["library_size"] = True
        elif part == "nolib":
            model_opts["library_size"] = False
        elif part == "norm":
            model_opts["normalise_input"] = True
        elif part == "learned":
            model_opts["prior_y"] = "learned"
        elif part in ("qenc", "qelbo"):
            model_opts["cluster_posterior"] = "encoder" if part == "qenc" else "elbo"
        elif part == "uniform":
            model_opts["prior_y"] = "uniform"
        elif part in ("sharedvar", "compvar"):
            model_opts["prior_z_variance"] = "shared" if part == "sharedvar" else "component"
        elif part == "paper":
            model_opts.update(library_size=False, prior_y="uniform", log1p_input=False)
        elif part.startswith("drop") and part[4:].isdigit():
            model_opts["dropout"] = int(part[4:]) / 100
        elif part.startswith("lat"):
            model_opts["latent"] = int(part[3:])
        elif part.startswith("pre") and part[3:].isdigit():
            train_opts["pretrain_epochs"] = int(part[3:])
        elif part.startswith("ep") and part[2:].isdigit():
            train_opts["max_epochs"] = int(part[2:])
        elif part.startswith("bs") and part[2:].isdigit():
            train_opts["batch_size"] = int(part[2:])
        elif part.startswith("kw") and part[2:].isdigit():
            train_opts["kl_warmup"] = int(part[2:])
        elif part.startswith("ld") and part[2:].isdigit():
            train_opts["lr_drops"] = int(part[2:])
        elif part.startswith("mr") and part[2:].isdigit():
            train_opts["mixture_restarts"] = int(part[2:])
        elif part.startswith("r") and part[1:].isdigit():
            train_opts["init_restarts"] = int(part[1:])
        elif part != "defaults":
            raise SystemExit(f"unknown variant part {part!r} in {variant!r}")
    return model, model_opts, train_opts


def scores(labels: np.ndarray, predicted: np.ndarray, prefix: str) -> dict:
    """ARI and AMI (evaluation.cluster_scores) under column names that say what was clustered."""
    from scvae_torch.evaluation import cluster_scores

    return {f"{prefix}_{name}": value for name, value in cluster_scores(labels, predicted).items()}


def matched_labels(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Each cluster's label under the one-to-one matching that agrees on most cells (Hungarian)."""
    import pandas as pd
    from scipy.optimize import linear_sum_assignment

    table = pd.crosstab(pd.Series(predicted, name="cluster"), pd.Series(labels, name="label"))
    rows, cols = linear_sum_assignment(-table.to_numpy())
    return {table.index[r]: table.columns[c] for r, c in zip(rows, cols)}


def misplaced(adata, predicted: np.ndarray, what: str, probabilities: np.ndarray | None = None) -> list[str]:
    """One line per cell whose cluster, matched one to one with the labels (Hungarian on the contingency table),
    is not its label: name, label, matched label, library size and its percentile among all cells; given the
    clusters' probabilities (cells x K), also how many nats the chosen cluster's log-probability is above that
    of the cluster matched to the cell's label."""
    labels = adata.obs["label"].to_numpy().astype(str)
    match = matched_labels(labels, predicted)
    cluster_of = {label: cluster for cluster, label in match.items()}
    placed = np.array([match.get(c, "(unmatched)") for c in predicted])
    library = np.asarray(adata.X.sum(axis=1)).ravel()
    percentile = 100.0 * library.argsort().argsort() / max(len(library) - 1, 1)
    lines = []
    for i in np.flatnonzero(placed != labels):
        line = (f"# misplaced by {what}: {adata.obs_names[i]} {labels[i]} -> {placed[i]}, library {library[i]:.0f} "
                f"(percentile {percentile[i]:.0f}; median {np.median(library):.0f})")
        if probabilities is not None and labels[i] in cluster_of:
            log_p = np.log(np.maximum(probabilities[i], np.finfo(np.float64).tiny))
            line += f", log-probability {log_p[predicted[i]] - log_p[cluster_of[labels[i]]]:.1f} nats above its label's"
        lines.append(line)
    return lines


def baselines(adata, seed: int, scvi: bool, max_epochs: int | None, threads: int) -> dict:
    """k-means on PCA of log-normalised counts, and on scVI's latent (when asked and installed)."""
    from scvae_torch import peers
    from scvae_torch.evaluation import kmeans_labels
    from scvae_torch.io.splits import make_split

    labels, k = adata.obs["label"].to_numpy(), adata.obs["label"].nunique()
    row = scores(labels, peers.scanpy_route(adata.X, k, seed=seed, leiden=False)["kmeans"], "pca_kmeans")
    if scvi and peers.installed("scvi"):
        subset = make_split(np.asarray(adata.obs_names, dtype=str), fractions=(0.81, 0.09, 0.10), seed=seed)
        subsets = {name: np.flatnonzero(subset.to_numpy() == name) for name in ("train", "validation", "test")}
        fit = peers.scvi_fit(adata.X, subsets, "nb", n_latent=10, max_epochs=max_epochs or 400, seed=seed,
                             n_mc_samples=10, threads=threads)
        row.update(scores(labels, kmeans_labels(fit["latent"].astype(np.float64), k, seed), "scvi_kmeans"))
        row["scvi_test_elbo"] = fit["test_elbo"]
    return row


def sampled_component_scores(module, X, samples: int = 20, seed: int = 0) -> dict:
    """Two readings of a trained GMVAE's clusters other than the plug-in q*(y|x), as log-scores (cells x K):
    "mc_clusters", log p(y) + E_q(z|x,y)[log p(x|z)] (from `samples` draws) - KL(q(z|x,y) || p(z|y)); and
    "iw_clusters", log p(y) + the importance-weighted log p(x|y) from `samples` draws of q(z|x,y) per component."""
    import math

    import torch

    from scvae_torch.models import gaussian_kl, gaussian_log_prob

    x = torch.as_tensor(X.toarray(), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mu, logvar = module.encode_z(x)
        p_mu, p_logvar = module._prior()
        log_px, weights = [], []
        for _ in range(samples):
            z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp()
            log_px.append(module._log_px_per_component(x, z))
            weights.append(log_px[-1] + gaussian_log_prob(z, p_mu[None], p_logvar[None])
                           - gaussian_log_prob(z, mu, logvar))
        log_py = module.log_prior_y()
        mc = log_py + torch.stack(log_px).mean(0) - gaussian_kl(mu, logvar, p_mu[None], p_logvar[None])
        iw = log_py + torch.logsumexp(torch.stack(weights), 0) - math.log(samples)
    return {"mc_clusters": mc.double().numpy(), "iw_clusters": iw.double().numpy()}


def run(adata, variant: str, seed: int, max_epochs: int | None, report_misplaced: bool = False,
        posteriors: bool = False) -> dict:
    """Train one variant on one seed; its scores (and, report_misplaced, the misplaced cells printed; posteriors,
    a GMVAE's clusters read two more ways: sampled_component_scores)."""
    from scvae_torch import SCVAE
    from scvae_torch.evaluation import kmeans_labels

    labels, k = adata.obs["label"].to_numpy(), adata.obs["label"].nunique()
    model, model_opts, train_opts = options(variant)
    extra = {"components": k} if model == "gmvae" else {}
    started = time.perf_counter()
    m = SCVAE(adata, model=model, **extra, **model_opts)
    max_epochs = train_opts.pop("max_epochs", max_epochs)
    m.train(max_epochs=max_epochs, train_size=0.81, validation_size=0.09, seed=seed, **train_opts)
    row = {"epochs": len(m.history), "best_epoch": m.metrics.get("best_epoch"),
           "seconds": round(time.perf_counter() - started, 1),
           "val_elbo": float(np.nanmax(m.history["val_elbo"])) if "val_elbo" in m.history else np.nan,
           "test_elbo": m.get_elbo(indices=m.test_indices),
           # the mixture checks: epoch, ARI of argmax q(y|x) with k-means of the latent, restarted or not
           "restarts": " ".join(f"{r['epoch']}:{r['agreement']:.3f}:{'restarted' if r['restarted'] else 'kept'}"
                                for r in m.metrics.get("mixture_restarts", []))}
    z = m.get_latent_representation()
    clusterings = {"latent_kmeans": (kmeans_labels(np.asarray(z, dtype=np.float64), k, seed), None)}
    if model == "gmvae":  # the clusters as the model reads them (cluster_posterior), and both readings by name
        for what, posterior in (("clusters", None), ("encoder_clusters", "encoder"), ("elbo_clusters", "elbo")):
            probabilities = m.get_cluster_probabilities(posterior=posterior)
            clusterings[what] = (probabilities.argmax(1), probabilities)
        if posteriors:
            for what, log_scores in sampled_component_scores(m.module.cpu().eval(), adata.X, seed=seed).items():
                probabilities = np.exp(log_scores - log_scores.max(1, keepdims=True))
                clusterings[what] = (log_scores.argmax(1), probabilities / probabilities.sum(1, keepdims=True))
    for what, (predicted, probabilities) in clusterings.items():
        row.update(scores(labels, predicted, what))
        if report_misplaced:
            for line in misplaced(adata, np.asarray(predicted), f"{variant} seed {seed} {what}", probabilities):
                print(line, flush=True)
    if report_misplaced and model == "gmvae":  # how broad each component is (a broad one takes the outliers)
        variance = np.exp(m.module.prior_logvar.detach().double().cpu().numpy().mean(1))
        match = matched_labels(labels.astype(str), clusterings["clusters"][0])
        print(f"# p(z|y) variance of {variant} seed {seed}, geometric mean over the latent: "
              + (f"shared {variance[0]:.3f}" if len(variance) == 1 else
                 ", ".join(f"{match.get(y, y)} {v:.3f}" for y, v in enumerate(variance))), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="hard-sim," + ",".join(SHARED))
    p.add_argument("--variants", default="vae,vae+lib,gmvae+paper,gmvae+nolib,gmvae+lib,gmvae+lib+learned")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-epochs", type=int, default=None, help="cap on epochs (default: the library's)")
    p.add_argument("--top-genes", type=int, default=2000)
    p.add_argument("--within-batches", action="store_true",
                   help="rank the genes by their deviance within the set's batches (sets with a batch column)")
    p.add_argument("--scvi", action="store_true", help="also k-means on scVI's latent (needs scvi-tools)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also append the rows to this TSV")
    p.add_argument("--posteriors", action="store_true",
                   help="GMVAE: also clusters from the ELBO given y with sampled z (mc_clusters) and from the "
                        "importance-weighted p(y|x) (iw_clusters), 20 draws each")
    p.add_argument("--misplaced", action="store_true",
                   help="print each clustering's misplaced cells with their library sizes")
    args = p.parse_args()

    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    print(f"# load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; {args.threads} threads", flush=True)
    rows = []
    for name in args.sets.split(","):
        adata = load(name, args.top_genes, args.within_batches)
        for seed in map(int, args.seeds.split(",")):
            base = {"dataset": name, "cells": adata.n_obs, "genes": adata.n_vars, "K": adata.obs["label"].nunique(),
                    "seed": seed, **baselines(adata, seed, args.scvi, args.max_epochs, args.threads)}
            for variant in args.variants.split(","):
                row = {**base, "variant": variant, **run(adata.copy(), variant, seed, args.max_epochs, args.misplaced,
                                                           args.posteriors)}
                rows.append(row)
                print("\t".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
                if args.out:
                    pd.DataFrame(rows).to_csv(args.out, sep="\t", index=False)
    table = pd.DataFrame(rows)
    cols = [c for c in table.columns if c.endswith(("_ari", "_ami")) or c in ("val_elbo", "test_elbo", "epochs")]
    print("\n# mean over seeds")
    print(table.groupby(["dataset", "variant"], sort=False)[cols].mean().round(3).to_string())


if __name__ == "__main__":
    main()
