"""Peers of the real-data benchmark (scvae_torch.peers): the scanpy route and scVI.

References: log-normalisation by hand on a dense matrix, scanpy's own functions where installed, the known
cell types of simulated data, and the bound ELBO <= importance-weighted log-likelihood for scVI.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scvae_torch import peers, simulate
from scvae_torch.evaluation import cluster_scores, log_normalise


@pytest.fixture(scope="module")
def cells():
    """400 single-cell-like cells of 3 well separated types."""
    return simulate.single_cell(n_cells=400, n_genes=200, n_types=3, seed=1)


def test_log_normalise_matches_the_formula_by_hand():
    X = sp.csr_matrix(np.array([[1, 0, 3], [0, 0, 0], [10, 5, 5]], dtype=np.int32))
    dense = X.toarray().astype(float)
    totals = dense.sum(1, keepdims=True)
    expected = np.log1p(np.divide(dense * 1e4, totals, out=np.zeros_like(dense), where=totals > 0))
    np.testing.assert_allclose(log_normalise(X).toarray(), expected, rtol=1e-6)


@pytest.mark.skipif(not peers.installed("scanpy"), reason="scanpy is not installed")
def test_log_normalise_is_scanpys_normalize_total_and_log1p():
    import anndata as ad
    import scanpy as sc

    X = simulate.single_cell(n_cells=50, n_genes=30, n_types=2, seed=0).X
    adata = ad.AnnData(X.astype(np.float32))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    np.testing.assert_allclose(log_normalise(X).toarray(), adata.X.toarray(), rtol=1e-5, atol=1e-6)


def test_scikit_learn_route_recovers_the_cell_types(cells, monkeypatch):
    monkeypatch.setattr(peers, "installed", lambda module: False)  # as without scanpy
    result = peers.scanpy_route(cells.X, 3, n_pcs=10, seed=0)
    assert result["implementation"] == "scikit-learn" and result["leiden"] is None
    assert cluster_scores(cells.labels, result["kmeans"])["ari"] > 0.9


@pytest.mark.skipif(not peers.installed("scanpy"), reason="scanpy is not installed")
def test_scanpy_route_agrees_with_the_scikit_learn_route(cells, monkeypatch):
    with_scanpy = peers.scanpy_route(cells.X, 3, n_pcs=10, seed=0, leiden=peers.installed("leidenalg"))
    assert with_scanpy["implementation"] == "scanpy"
    monkeypatch.setattr(peers, "installed", lambda module: False)
    plain = peers.scanpy_route(cells.X, 3, n_pcs=10, seed=0)
    # the same PCs up to sign, so the same k-means partition
    assert cluster_scores(plain["kmeans"], with_scanpy["kmeans"])["ari"] > 0.99
    if with_scanpy["leiden"] is not None:
        from sklearn.metrics import homogeneity_score

        # at resolution 1 Leiden may split a type, but each of its clusters holds one type
        assert homogeneity_score(cells.labels, with_scanpy["leiden"]) > 0.9


@pytest.mark.skipif(not peers.installed("scvi"), reason="scvi-tools is not installed")
def test_scvi_is_trained_on_the_given_split_and_scored_on_its_test_cells(cells):
    rng = np.random.default_rng(0)
    order = rng.permutation(cells.X.shape[0])
    # 301 training cells in batches of 100: a last batch of 1 cell, which batch norm cannot train on
    subsets = {"train": order[:301], "validation": order[301:360], "test": order[360:]}
    result = peers.scvi_fit(cells.X, subsets, "nb", n_latent=3, max_epochs=4, n_mc_samples=20)
    assert result["latent"].shape == (400, 3) and result["epochs_trained"] == 4
    # a lower bound per cell: the importance-weighted estimate is at least the ELBO, both negative
    assert result["test_elbo"] < 0 and result["test_elbo"] <= result["test_iw_log_lik"] + 1e-3


def test_scvi_refuses_a_likelihood_it_does_not_have(cells):
    with pytest.raises(ValueError, match="scVI has no 'zip' likelihood"):
        peers.scvi_fit(cells.X, {"train": np.arange(10), "validation": np.arange(0), "test": np.arange(0)},
                       "zip", n_latent=2, max_epochs=1)
