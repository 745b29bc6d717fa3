"""Evaluation: importance-weighted log p(x) against a quadrature of the exact marginal; clustering scores."""

import math

import numpy as np
import pytest
import torch
from test_models import _log_py  # log p(y) from torch.distributions

from scvae_torch import distributions as D
from scvae_torch.evaluation import cluster_scores, kmeans_labels
from scvae_torch.models import gaussian_log_prob


def _quadrature_log_px(model, x, grid):
    """log p(x) = log sum_y p(y) int p(x|z) p(z|y) dz by the trapezoid rule on a 1-D latent grid."""
    z = grid[:, None]
    dz = float(grid[1] - grid[0])
    out = []
    for i in range(x.shape[0]):
        xi = x[i].expand(len(grid), -1)
        log_px_z = D.log_prob(model.cfg.likelihood, xi, model.decode(z, xi)).sum(-1)
        if model.cfg.model == "vae":
            log_prior = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))[None]
        else:
            mu, lv = model.prior_mu, model.prior_logvar
            log_prior = torch.stack([gaussian_log_prob(z, mu[k].expand_as(z), lv[k].expand_as(z))
                                     for k in range(model.cfg.components)])
            log_prior = log_prior + _log_py(model)[:, None]
        out.append(torch.logsumexp(torch.logsumexp(log_prior + log_px_z[None], 0) + math.log(dz), 0))
    return torch.stack(out)


def _trained(model_name, tmp_path):
    """A small model trained briefly, so that q is a reasonable proposal (as after real training)."""
    import scipy.sparse as sp

    from scvae_torch.training import TrainConfig, fit, load_model

    rng = np.random.default_rng(0)
    rates = rng.uniform(0.5, 8, size=(3, 8))
    X = sp.csr_matrix(rng.poisson(rates[rng.integers(0, 3, 600)]).astype(np.float32))
    cfg = dict(model=model_name.split("-")[0], likelihood="nb", encoder=[16], decoder=[16], latent=1, components=3,
               prior_y="learned" if model_name.endswith("learned") else "uniform")
    fit(X, np.arange(500), np.arange(500, 600), cfg,
        TrainConfig(epochs=30, batch_size=50, lr=1e-2, seed=0), tmp_path)
    return load_model(tmp_path).double(), torch.from_numpy(X[:6].toarray()).double()


@pytest.mark.parametrize("model_name", ["vae", "gmvae", "gmvae-learned"])
def test_importance_weighted_estimate_rises_towards_exact_log_likelihood(model_name, tmp_path):
    model, x = _trained(model_name, tmp_path)
    torch.manual_seed(2)
    torch.set_grad_enabled(False)
    truth = _quadrature_log_px(model, x, torch.linspace(-15, 15, 6001, dtype=torch.float64))
    n = x.shape[0]
    reps = lambda r: x.repeat(r, 1)  # noqa: E731  (independent Monte-Carlo repetitions in one batch)
    elbos = model(reps(4000))["elbo"].reshape(4000, n)
    elbo, elbo_se = elbos.mean(0), elbos.std(0) / math.sqrt(4000)
    one = model.iw_log_likelihood(reps(4000), 1).reshape(4000, n)
    hundred = model.iw_log_likelihood(reps(50), 100).reshape(50, n)
    many = model.iw_log_likelihood(x, 5000)
    assert (elbo <= truth + 4 * elbo_se).all()
    if model_name == "vae":  # K=1 is the ELBO in expectation
        se = one.std(0) / math.sqrt(one.shape[0]) + elbo_se
        assert ((one.mean(0) - elbo).abs() < 5 * se).all()
    se = one.std(0) / math.sqrt(one.shape[0]) + hundred.std(0) / math.sqrt(hundred.shape[0])
    assert (hundred.mean(0) >= one.mean(0) - 4 * se).all()       # the bound rises with K ...
    assert (many >= hundred.mean(0) - 4 * hundred.std(0)).all()
    gap = (truth - many).abs()
    assert gap.max() < 0.05                                       # ... towards the exact log p(x)
    assert (gap <= (truth - elbo).abs() + 4 * elbo_se).all()
    torch.set_grad_enabled(True)


def test_cluster_scores_know_perfect_and_permuted_and_random():
    true = np.repeat(np.arange(4), 50)
    assert cluster_scores(true, (true + 1) % 4) == {"ari": 1.0, "ami": 1.0}
    rng = np.random.default_rng(0)
    random = cluster_scores(true, rng.integers(0, 4, size=200))
    assert abs(random["ari"]) < 0.05 and abs(random["ami"]) < 0.05


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    labels = np.repeat(np.arange(3), 100)
    Z = centres[labels] + rng.normal(size=(300, 2))
    assert cluster_scores(labels, kmeans_labels(Z, 3, seed=0))["ari"] == 1.0


@pytest.mark.parametrize("model_name", ["vae", "gmvae"])
def test_streamed_evaluation_equals_in_memory(model_name, tmp_path):
    """evaluate with the counts read from the file minibatch by minibatch (what keeps 1.3 M cells in flat
    memory) writes exactly what it writes with the counts in memory."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    from scvae_torch import data
    from scvae_torch.runs import evaluate_dataset, train_dataset
    from scvae_torch.training import TrainConfig

    rng = np.random.default_rng(1)
    rates = rng.uniform(0.05, 4, size=(3, 30))
    groups = rng.integers(0, 3, 700)
    X = sp.csr_matrix(rng.poisson(rates[groups]).astype(np.float32))
    data.write_canonical(data.Counts(X=X, genes=np.array([f"g{i}" for i in range(30)], dtype=object),
                                     cells=np.array([f"c{i}" for i in range(700)], dtype=object),
                                     labels=groups.astype(str).astype(object)), tmp_path / "counts.h5ad")
    cfg = dict(model=model_name, likelihood="nb", encoder=[16], decoder=[16], latent=2, components=3)
    train_dataset(str(tmp_path / "counts.h5ad"), str(tmp_path / "run"), cfg, TrainConfig(epochs=2, batch_size=64))
    outs = {}
    for stream in ("off", "on"):
        out = tmp_path / stream
        metrics = evaluate_dataset(str(tmp_path / "run"), str(tmp_path / "counts.h5ad"), str(out / "metrics.json"),
                                   str(out / "latent.h5ad"), iw_samples=5, feature_means_path=str(out / "means.tsv"),
                                   device="cpu", stream=stream)
        outs[stream] = (metrics, anndata.read_h5ad(out / "latent.h5ad"), pd.read_csv(out / "means.tsv", sep="\t"))
    (m_off, l_off, f_off), (m_on, l_on, f_on) = outs["off"], outs["on"]
    assert m_on == m_off and m_on["n_cells"] == 70
    assert np.array_equal(l_on.obsm["X_scvae"], l_off.obsm["X_scvae"]) and list(l_on.obs_names) == list(l_off.obs_names)
    pd.testing.assert_frame_equal(f_on, f_off)
    expected = np.asarray(X[np.sort(data.read_split(str(tmp_path / "run" / "split.tsv"),
                                                     np.array([f"c{i}" for i in range(700)]))["test"])].mean(0)).ravel()
    np.testing.assert_allclose(f_on["observed_mean"], expected, rtol=1e-6)
