"""Test ELBO, importance-weighted log-likelihood, latent means, GMVAE clusters, ARI/AMI."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .batches import Source, open_source
from .config import DECODE_SAMPLES, IW_SAMPLES
from .models import GMVAE, VAE
from .training import batch_tensor, evaluate_terms

CountSource = sp.csr_matrix | Source  # the counts, in memory or read from the file minibatch by minibatch


def default_batch_size(n_genes: int, copies: int = 1) -> int:
    """Cells per minibatch that keep `copies` dense cells x genes tensors under 2^23 values, at most 1024 (32 MB
    for 28,000 genes)."""
    return max(1, min(1024, (1 << 23) // max(n_genes * copies, 1)))


def _batches(X: CountSource, rows: np.ndarray, device: torch.device | str, batch_size: int | None,
             batch_codes: np.ndarray | None = None):
    """The given cells as (sparse CSR count tensor, batch codes tensor or None) on the device, batch_size at a
    time, in order (default: default_batch_size)."""
    batch_size = batch_size or default_batch_size(X.shape[1])
    device = torch.device(device)
    source = open_source(X, device)
    for s in range(0, len(rows), batch_size):
        part = np.asarray(rows[s:s + batch_size])
        yield source.batch(part).counts, batch_tensor(batch_codes, part, device)


@torch.no_grad()
def _per_cell(encode, model: VAE, X: CountSource, rows: np.ndarray, device: torch.device | str,
              batch_size: int | None, width: int, batch_codes: np.ndarray | None = None) -> np.ndarray:
    """Apply a per-cell function of the model (of counts and batch codes) to the given cells, in eval mode and
    in minibatches."""
    model.eval()
    # Written into one array made up front: a list of small per-batch results, each allocated between the
    # batches' large temporaries, fragmented the heap so much that memory grew with the number of cells.
    out = np.empty((len(rows), width), np.float32)
    start = 0
    for x, b in _batches(X, rows, device, batch_size, batch_codes):
        part = encode(x, b)
        out[start:start + part.shape[0]] = part.cpu().numpy()
        start += part.shape[0]
    return out


def latent_means(model: VAE, X: CountSource, rows: np.ndarray, device: torch.device | str = "cpu",
                 batch_size: int | None = None, batch_codes: np.ndarray | None = None) -> np.ndarray:
    """Latent representation (mean of q(z|x), mixed over q(y|x) for a GMVAE) of the given cells.

    batch_codes: each cell's batch code (one per row of X), for a model with a batch covariate."""
    return _per_cell(model.latent, model, X, rows, device, batch_size, model.cfg.latent, batch_codes)


def responsibilities(model: GMVAE, X: CountSource, rows: np.ndarray, device: torch.device | str = "cpu",
                     batch_size: int | None = None, batch_codes: np.ndarray | None = None) -> np.ndarray:
    """q(y|x) of a GMVAE for the given cells, shape (cells, K)."""
    return _per_cell(model.responsibilities, model, X, rows, device, batch_size, model.cfg.components,
                     batch_codes)


def cluster_probabilities(model: GMVAE, X: CountSource, rows: np.ndarray, device: torch.device | str = "cpu",
                          batch_size: int | None = None, batch_codes: np.ndarray | None = None,
                          posterior: str | None = None) -> np.ndarray:
    """The probabilities a GMVAE's clusters are read from (GMVAE.cluster_probabilities), shape (cells, K).

    q*(y|x) decodes every cell K times: the default minibatch keeps K x cells x genes under 2^23 values."""
    K = model.cfg.components
    return _per_cell(lambda x, b: model.cluster_probabilities(x, b, posterior), model, X, rows, device,
                     batch_size or default_batch_size(X.shape[1], K), K, batch_codes)


@torch.no_grad()
def decoded_feature_means(model: VAE, X: CountSource, rows: np.ndarray, device: torch.device | str = "cpu",
                          batch_size: int | None = None, batch_codes: np.ndarray | None = None,
                          n_samples: int = DECODE_SAMPLES, seed: int = 0) -> np.ndarray:
    """Mean over cells of the model's expected count per feature, E_q(z|x)[E[x|z]], averaged over n_samples
    seeded draws z ~ q(z|x) per cell (n_samples 0: decoded at the mean of q(z|x) only).

    The decoder is non-linear, so decoding at the posterior mean is not the posterior mean of the decoded
    rate: where q(z|x) stays wide (a latent that carries little), the plug-in value is biased towards the
    decoder's value at the prior mean (measured on the review's Poisson check data: docs/defaults.md).
    """
    from . import distributions as D

    model.eval()
    total = torch.zeros(X.shape[1], dtype=torch.float64)
    generator = None
    draws = max(n_samples, 1)
    for x, b in _batches(X, rows, device, batch_size, batch_codes):
        if generator is None and n_samples:  # on the device the counts arrive on (a Source keeps its own)
            generator = torch.Generator(device=x.device).manual_seed(seed)
        for _ in range(draws):
            z = model.sample_z(x, b, generator) if n_samples else model.latent(x, b)
            total += D.mean(model.cfg.likelihood, model.decode(z, x, b)).double().sum(0).cpu() / draws
    return (total / max(len(rows), 1)).numpy()


def observed_feature_means(X: CountSource, rows: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Mean over the given cells of each feature's observed count."""
    from .distributions import sparse_entries

    total = torch.zeros(X.shape[1], dtype=torch.float64)
    for x, _ in _batches(X, rows, "cpu", batch_size):  # a Source keeps its own device: the sums come to the CPU
        _, _, cols, values = sparse_entries(x)
        total.index_add_(0, cols.cpu(), values.double().cpu())
    return (total / max(len(rows), 1)).numpy()


def cluster_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Adjusted Rand index and adjusted mutual information of a clustering against known labels."""
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    return {"ari": float(adjusted_rand_score(true, pred)), "ami": float(adjusted_mutual_info_score(true, pred))}


def kmeans_labels(Z: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means (scikit-learn, 10 restarts) cluster labels of the rows of Z."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(Z)


def log_normalise(X: sp.spmatrix, target_sum: float = 1e4, dtype=np.float32) -> sp.csr_matrix:
    """log(1 + counts scaled to target_sum per cell): scanpy's normalize_total(target_sum) then log1p.

    Cells without counts stay zero.
    """
    X = sp.csr_matrix(X, dtype=dtype)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return (sp.diags(scale.astype(dtype)) @ X).log1p().tocsr()


def pca_kmeans_baseline(X: sp.csr_matrix, k: int, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """The classical baseline: k-means on the first PCs of log-normalised counts (`log_normalise`: scanpy's
    route), by a sparse-safe truncated SVD after centring."""
    from sklearn.decomposition import PCA

    logged = log_normalise(X)
    n_pcs = max(1, min(n_pcs, min(logged.shape) - 1))
    pcs = PCA(n_components=n_pcs, random_state=seed, svd_solver="arpack").fit_transform(logged)
    return kmeans_labels(pcs, k, seed)


def evaluate_model(model: VAE, X: CountSource, rows: np.ndarray, iw_samples: int = IW_SAMPLES, seed: int = 0,
                   device: torch.device | str = "cpu", batch_size: int = 256,
                   batch_codes: np.ndarray | None = None) -> dict[str, float]:
    """Mean test ELBO and its parts per cell, and the importance-weighted log-likelihood with iw_samples draws."""
    torch.manual_seed(seed)
    terms = evaluate_terms(model, X, rows, torch.device(device), batch_size=batch_size, iw_samples=iw_samples,
                           batch_codes=batch_codes)
    result = {k: terms[k] for k in ("elbo", "log_lik", "kl_z", "kl_y")}
    if iw_samples:
        result["iw_log_lik"] = terms["iw_log_lik"]
    result.update(iw_samples=iw_samples, n_cells=int(len(rows)))
    return result
