"""Test ELBO, importance-weighted log-likelihood, latent means, GMVAE clusters, ARI/AMI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import provenance
from .batches import (
    Source,
    SourceError,
    StreamSource,
    load_counts,
    open_source,
    read_annotations,
    read_batches,
)
from .batches import batch_codes as to_batch_codes
from .config import DECODE_SAMPLES, IW_SAMPLES, TrainConfig
from .io.atomic import write_h5ad, write_text
from .models import GMVAE, VAE
from .training import (
    TrainingError,
    batch_tensor,
    evaluate_terms,
    load_model,
    resolve_device,
    select_genes,
    streams,
)

CountSource = sp.csr_matrix | Source  # the counts, in memory or read from the file minibatch by minibatch


def _batches(X: CountSource, rows: np.ndarray, device: torch.device | str, batch_size: int | None,
             batch_codes: np.ndarray | None = None):
    """The given cells as (sparse CSR count tensor, batch codes tensor or None) on the device, batch_size at a
    time, in order (default: as many as keep a dense cells x genes tensor under 2^23 values, at most 1024: 32 MB
    for 28,000 genes)."""
    batch_size = batch_size or max(1, min(1024, (1 << 23) // max(X.shape[1], 1)))
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


def pca_kmeans_baseline(X: sp.csr_matrix, k: int, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """The classical baseline: k-means on the first PCs of log1p counts (sparse-safe truncated SVD after centring)."""
    from sklearn.decomposition import PCA

    logged = X.astype(np.float32).log1p()
    n_pcs = max(1, min(n_pcs, min(logged.shape) - 1))
    pcs = PCA(n_components=n_pcs, random_state=seed, svd_solver="arpack" if sp.issparse(logged) else "auto") \
        .fit_transform(logged)
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


def evaluate_dataset(model_dir: str, data_path: str, metrics_path: str, latent_path: str,
                     split_path: str | None = None, iw_samples: int = IW_SAMPLES, seed: int = 0,
                     feature_means_path: str | None = None, device: str = "auto", stream: str = "auto",
                     stream_above_gb: float = TrainConfig.stream_above_gb) -> dict:
    """Evaluate a run folder on the test split; write metrics JSON, latent.h5ad and optional feature means.

    stream as in training: 'on' (or 'auto' above stream_above_gb GiB) reads the counts from the file
    minibatch by minibatch instead of holding them (compactly) in memory."""
    dev = resolve_device(device)
    model = load_model(model_dir, dev)  # first: a damaged or unsafe model file is named as such
    provenance.check_evaluable(model_dir)  # not locked by a training, checkpointed, trained
    provenance.check_canonical_file(data_path)
    if streams(data_path, TrainConfig(stream=stream, stream_above_gb=stream_above_gb)):
        try:  # the same one line as `train` for a file that cannot be streamed
            cells, labels, genes = read_annotations(data_path)
            X = StreamSource(data_path, dev)
        except SourceError as err:
            raise TrainingError(str(err)) from None
    else:
        counts, cells, labels, genes = load_counts(data_path)  # whole counts held compactly (memory)
        X = None
    try:
        provenance.check_cell_ids(data_path, cells)
        order = provenance.align_genes(model_dir, genes, data_path)  # the model's gene order, by name
        if X is None:
            X = open_source(counts if order is None else select_genes(counts, order), dev)  # once, for every pass
        elif order is not None:
            X = select_genes(X, order)
        if order is not None:
            genes = genes[order]
        codes = None
        if model.cfg.n_batches:  # names -> the codes the model was trained with; an unseen batch is refused
            codes = to_batch_codes(read_batches(data_path), model.cfg.batches, f"{data_path}: obs['batch']")
        return _evaluate(model, X, cells, labels, genes, model_dir, metrics_path, latent_path, split_path,
                         iw_samples, seed, feature_means_path, dev, codes)
    except SourceError as err:  # a streamed block that cannot be read or holds no counts
        raise TrainingError(f"{err}; nothing was written") from None
    finally:
        if isinstance(X, StreamSource):
            X.close()


def _evaluate(model: VAE, X: CountSource, cells: np.ndarray, labels: np.ndarray | None, genes: np.ndarray,
              model_dir: str, metrics_path: str, latent_path: str, split_path: str | None, iw_samples: int,
              seed: int, feature_means_path: str | None, dev: torch.device,
              codes: np.ndarray | None = None) -> dict:
    """evaluate_dataset's work on counts already opened."""
    import anndata as ad

    from . import data

    split = Path(split_path) if split_path else Path(model_dir) / "split.tsv"
    subsets = data.read_split(str(split), cells)
    provenance.check_evaluation_split(model_dir, cells, subsets, str(split))  # test cells it never trained on
    test = subsets["test"]
    metrics = {"model": model.cfg.model, "likelihood": model.cfg.likelihood,
               **evaluate_model(model, X, test, iw_samples=iw_samples, seed=seed, device=dev,
                               batch_codes=codes)}

    everyone = np.arange(X.shape[0])
    obs = pd.DataFrame(index=pd.Index(cells.astype(str), name="cell"))
    subset_of = np.empty(len(everyone), dtype=object)
    for name, rows in subsets.items():
        subset_of[rows] = name
    obs["subset"] = pd.Categorical(subset_of)
    if labels is not None:
        obs["label"] = pd.Categorical(labels.astype(str))
    if codes is not None:
        obs["batch"] = pd.Categorical(np.asarray(model.cfg.batches)[codes], categories=model.cfg.batches)
    latent = ad.AnnData(X=sp.csr_matrix((len(everyone), 0), dtype=np.float32), obs=obs)
    latent.obsm["X_scvae"] = latent_means(model, X, everyone, dev, batch_codes=codes)
    if isinstance(model, GMVAE):
        resp = responsibilities(model, X, everyone, dev, batch_codes=codes)
        latent.obsm["scvae_responsibilities"] = resp
        latent.obs["scvae_cluster"] = pd.Categorical(resp.argmax(1).astype(str))
        if labels is not None:
            metrics["test_cluster"] = cluster_scores(labels[test], resp[test].argmax(1))
    latent.uns["scvae"] = {"model": model.cfg.model, "likelihood": model.cfg.likelihood}
    write_h5ad(latent, latent_path)
    if feature_means_path:
        table = pd.DataFrame({"feature": genes.astype(str),
                              "observed_mean": observed_feature_means(X, test),
                              "decoded_mean": decoded_feature_means(model, X, test, dev, batch_codes=codes,
                                                                     seed=seed)})
        write_text(feature_means_path, table.to_csv(sep="\t", index=False))
    write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return metrics

