"""Peers for the real-data benchmark: the standard scanpy route and scVI, run on scvae-torch's data and split.

Neither scanpy nor scvi-tools is a dependency: each is imported inside the function that needs it. The
scanpy route falls back to scikit-learn (same normalisation, PCA and k-means) when scanpy is missing; Leiden
needs scanpy and leidenalg. Nothing here imports torch at module level, so the scVI job can run under
another interpreter (one with scvi-tools) that sees this checkout on its path.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import scipy.sparse as sp

SCVI_LIKELIHOODS = {"nb": "nb", "zinb": "zinb", "poisson": "poisson"}  # scvae-torch name -> scVI gene_likelihood


def installed(module: str) -> bool:
    """Whether `module` can be imported by this interpreter (without importing it)."""
    return importlib.util.find_spec(module) is not None


def scanpy_route(X: sp.spmatrix, k: int, n_pcs: int = 50, seed: int = 0, leiden: bool = True,
                 n_neighbors: int = 15, resolution: float = 1.0) -> dict:
    """The standard scanpy clustering route on raw counts: log-normalise, PCA, k-means (k clusters), Leiden.

    Parameters
    ----------
    X
        Cells x genes raw counts.
    k
        Clusters for k-means (the number of labels).
    n_pcs
        Principal components (capped at min(cells, genes) - 1).
    seed
        Seed of PCA, k-means and Leiden.
    leiden
        Also cluster with Leiden on the kNN graph of the PCs, when scanpy and leidenalg are installed.
    n_neighbors, resolution
        kNN graph size and Leiden resolution (scanpy's defaults).

    Returns
    -------
    dict
        ``kmeans`` (labels per cell), ``leiden`` (labels or None), ``implementation`` ("scanpy" or
        "scikit-learn"), ``n_pcs`` used and ``seconds`` per step.
    """
    from .evaluation import kmeans_labels, log_normalise

    n_pcs = max(1, min(n_pcs, min(X.shape) - 1))
    seconds = {}
    started = time.perf_counter()
    if installed("scanpy"):
        import anndata as ad
        import scanpy as sc

        adata = ad.AnnData(sp.csr_matrix(X, dtype=np.float32))
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.pca(adata, n_comps=n_pcs, random_state=seed)
        pcs, implementation = adata.obsm["X_pca"], "scanpy"
    else:
        from sklearn.decomposition import PCA

        pcs = PCA(n_components=n_pcs, random_state=seed, svd_solver="arpack").fit_transform(log_normalise(X))
        implementation = "scikit-learn"
    seconds["pca"] = time.perf_counter() - started
    started = time.perf_counter()
    result = {"kmeans": kmeans_labels(np.asarray(pcs, dtype=np.float64), k, seed), "leiden": None,
              "implementation": implementation, "n_pcs": int(n_pcs)}
    seconds["kmeans"] = time.perf_counter() - started
    if leiden and implementation == "scanpy" and installed("leidenalg"):
        started = time.perf_counter()
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X_pca", random_state=seed)
        sc.tl.leiden(adata, resolution=resolution, random_state=seed, flavor="leidenalg")
        result["leiden"] = adata.obs["leiden"].astype(int).to_numpy()
        seconds["leiden"] = time.perf_counter() - started
    result["seconds"] = seconds
    return result


def scvi_fit(X: sp.spmatrix, subsets: dict[str, np.ndarray], likelihood: str, n_latent: int, max_epochs: int,
             batch_size: int = 100, lr: float = 1e-3, kl_warmup: int = 0, early_stopping: bool = True,
             patience: int = 30, seed: int = 0, n_mc_samples: int = 100, threads: int = 1) -> dict:
    """Train scVI (scvi-tools) on the given split and score it on the test cells.

    Parameters
    ----------
    X
        Cells x genes raw counts.
    subsets
        Row indices of ``train``, ``validation`` and ``test`` (scvae-torch's split, passed to scVI unchanged).
    likelihood
        ``nb``, ``zinb`` or ``poisson`` (scVI's ``gene_likelihood``).
    n_latent, max_epochs, batch_size, lr
        As the scvae-torch model it is compared with; scVI's hidden layers keep its defaults.
    kl_warmup
        Epochs of linear KL warm-up (0 = none; scVI's own default is 400).
    early_stopping, patience
        Stop when the validation ELBO has not improved for ``patience`` epochs.
    seed
        scvi-tools' global seed.
    n_mc_samples
        Importance samples of ``get_marginal_ll``.
    threads
        torch threads.

    Returns
    -------
    dict
        ``test_elbo`` and ``test_iw_log_lik`` (means per test cell, from ``get_elbo`` and ``get_marginal_ll``),
        ``latent`` (cells x n_latent means), ``epochs_trained``, ``seconds`` and ``scvi_version``.
    """
    if likelihood not in SCVI_LIKELIHOODS:
        raise ValueError(f"scVI has no {likelihood!r} likelihood; choose one of {', '.join(SCVI_LIKELIHOODS)}")
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(max(1, int(threads)))
    scvi.settings.seed = seed
    adata = ad.AnnData(sp.csr_matrix(X, dtype=np.float32))
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, n_latent=n_latent, gene_likelihood=SCVI_LIKELIHOODS[likelihood])
    started = time.perf_counter()
    split = [np.asarray(subsets[name], dtype=np.int64) for name in ("train", "validation", "test")]
    has_val = len(split[1]) > 0
    # a last training batch of 1 cell breaks batch norm in training: drop a last batch of fewer than 3 cells
    drop_last = 0 < len(split[0]) % batch_size < 3
    model.train(max_epochs=max_epochs, batch_size=batch_size, accelerator="cpu", devices=1,
                early_stopping=bool(early_stopping and has_val), early_stopping_monitor="elbo_validation",
                early_stopping_patience=patience, check_val_every_n_epoch=1 if has_val else None,
                datasplitter_kwargs={"external_indexing": split, "drop_last": drop_last},
                plan_kwargs={"lr": lr, "n_epochs_kl_warmup": kl_warmup or None},
                enable_progress_bar=False)
    seconds = time.perf_counter() - started
    test = split[2]
    history = model.history.get("elbo_train")
    return {
        "test_elbo": float(model.get_elbo(indices=test, batch_size=batch_size)),
        "test_iw_log_lik": float(model.get_marginal_ll(indices=test, n_mc_samples=n_mc_samples,
                                                       batch_size=batch_size)),
        "latent": np.asarray(model.get_latent_representation()),
        "epochs_trained": int(len(history)) if history is not None else None,
        "seconds": seconds, "scvi_version": scvi.__version__,
    }
