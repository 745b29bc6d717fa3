"""scvae_torch.SCVAE on an AnnData: counts checked, results in the AnnData, expression and samples right,
save/load exact, early stopping, epochs from the data size, per-epoch lines of the CLI."""

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats as st
import torch

from scvae_torch import SCVAE, simulate
from scvae_torch import distributions as D
from scvae_torch.config import MAX_EPOCHS, TrainConfig, default_batch_size, default_epochs
from scvae_torch.data import DataError
from scvae_torch.training import fit, load_checkpoint

SMALL = dict(encoder=[32], decoder=[32], latent=3)


def _adata(n=300, g=40, types=3, seed=0) -> ad.AnnData:
    sim = simulate.single_cell(n, g, types, seed=seed)
    adata = ad.AnnData(sp.csr_matrix(sim.X, dtype=np.float32))
    adata.obs_names = [f"cell{i}" for i in range(n)]
    adata.var_names = [f"gene{j}" for j in range(g)]
    adata.obs["type"] = sim.labels
    return adata


@pytest.fixture(scope="module")
def trained():
    """A small GMVAE trained for a few epochs (shared by the read-only checks)."""
    adata = _adata()
    model = SCVAE(adata, model="gmvae", components=3, **SMALL)
    model.train(max_epochs=4, seed=1)
    return adata, model


# ---- counts ---------------------------------------------------------------------------------------------

def test_canonical_csr_counts_are_used_in_place():
    adata = _adata()
    assert SCVAE(adata, **SMALL)._X is adata.X


@pytest.mark.parametrize("value, problem", [(-1.0, "negative"), (0.5, "non-integer"), (np.nan, "NaN")])
def test_bad_counts_are_one_line_naming_where(value, problem):
    adata = _adata()
    X = adata.X.tolil()
    X[3, 4] = value
    adata.X = X.tocsr()
    with pytest.raises(DataError, match=rf"^adata\.X: .*{problem}") as err:
        SCVAE(adata, **SMALL)
    assert "\n" not in str(err.value)


def test_normalised_x_points_to_the_counts_layer():
    adata = _adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()
    with pytest.raises(DataError, match="layer='counts'"):
        SCVAE(adata, **SMALL)
    assert SCVAE(adata, layer="counts", **SMALL)._X is adata.layers["counts"]


def test_setup_anndata_records_the_layer():
    adata = _adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()
    SCVAE.setup_anndata(adata, layer="counts", labels_key="type")
    model = SCVAE(adata, **SMALL)
    assert model.layer == "counts" and model.labels_key == "type"


def test_unknown_option_and_duplicate_cells_are_refused():
    adata = _adata()
    with pytest.raises(ValueError, match="unknown model option.*wrong"):
        SCVAE(adata, wrong=1)
    adata.obs_names = ["same"] * adata.n_obs
    with pytest.raises(DataError, match="duplicate cell ids"):
        SCVAE(adata)


# ---- results in the AnnData -----------------------------------------------------------------------------

def test_train_writes_latent_and_clusters_into_the_anndata(trained):
    adata, model = trained
    assert adata.obsm["X_scvae"].shape == (adata.n_obs, 3)
    np.testing.assert_array_equal(adata.obsm["X_scvae"], model.get_latent_representation())
    probabilities = adata.obsm["scvae_cluster_probabilities"]
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    assert list(adata.obs["scvae_cluster"].astype(int)) == list(probabilities.argmax(1))
    np.testing.assert_array_equal(model.predict_clusters(), probabilities.argmax(1))
    assert isinstance(model.history, pd.DataFrame) and len(model.history) == 4
    sizes = [len(model.train_indices), len(model.validation_indices), len(model.test_indices)]
    assert sizes == [270, 30, 0]
    assert model.train_config.batch_size == 16  # 300 cells: the small-set minibatch (default_batch_size)


def test_vae_has_no_clusters():
    model = SCVAE(_adata(), **SMALL)
    with pytest.raises(ValueError, match="no clusters"):
        model.predict_clusters()


def test_normalized_expression_is_the_decoded_mean_on_a_common_library_size(trained):
    adata, model = trained
    means = model.get_normalized_expression(library_size=None)
    with torch.no_grad():  # the decoder's NB mean exp(log_mean) at the latent mean, computed here by hand
        x = torch.from_numpy(adata.X.toarray())
        params = model.module.decode(model.module.latent(x), x)
        expected = params["log_mean"].exp().numpy()
    np.testing.assert_allclose(means, expected, rtol=1e-5)
    scaled = model.get_normalized_expression(library_size=1e4, layer="scvae_normalized")
    np.testing.assert_allclose(scaled.sum(1), 1e4, rtol=1e-4)
    np.testing.assert_allclose(scaled, expected / expected.sum(1, keepdims=True) * 1e4, rtol=1e-4)
    assert adata.layers["scvae_normalized"] is scaled


def test_posterior_predictive_mean_and_variance_match_the_likelihood(trained):
    """Samples at the latent mean: mean within sampling error of the decoded mean, variance mu + mu^2/theta."""
    adata, model = trained
    rows = np.arange(20)
    S = 400
    torch.manual_seed(0)
    draws = model.posterior_predictive_sample(indices=rows, n_samples=S, use_latent_mean=True)
    assert draws.shape == (S, 20, adata.n_vars) and np.array_equal(draws, np.round(draws)) and draws.min() >= 0
    mu = model.get_normalized_expression(indices=rows, library_size=None).astype(np.float64)
    theta = model.module.decoder.log_theta.exp().detach().numpy().astype(np.float64)
    var = mu + mu ** 2 / theta
    z = (draws.mean(0) - mu) / np.sqrt(var / S)
    assert np.abs(z).max() < 5.5 and abs(z.mean()) < 0.1
    ratio = draws.var(0, ddof=1) / var
    assert 0.9 < np.median(ratio) < 1.1


@pytest.mark.parametrize("likelihood", ["poisson", "nb", "zip", "zinb"])
def test_sampled_counts_follow_scipy(likelihood):
    """distributions.sample against scipy.stats: mean, variance and P(x = 0)."""
    mu, theta, pi = 4.0, 1.5, 0.3
    n = 200_000
    params = {"log_mean": torch.full((n,), np.log(mu)), "log_theta": torch.full((n,), np.log(theta)),
              "logit_pi": torch.full((n,), np.log(pi / (1 - pi)))}
    params = {k: params[k] for k in D.PARAMETERS[likelihood]}
    torch.manual_seed(0)
    x = D.sample(likelihood, params).numpy()
    base = st.poisson(mu) if likelihood in ("poisson", "zip") else st.nbinom(theta, theta / (theta + mu))
    w = 1 - pi if likelihood.startswith("zi") else 1.0
    mean = w * base.mean()
    var = w * (base.var() + base.mean() ** 2) - mean ** 2
    p0 = (1 - w) + w * base.pmf(0)
    assert abs(x.mean() - mean) < 5 * np.sqrt(var / n)
    assert abs(x.var() / var - 1) < 0.03
    assert abs((x == 0).mean() - p0) < 5 * np.sqrt(p0 * (1 - p0) / n)


def test_elbo_and_marginal_ll_on_given_cells(trained):
    adata, model = trained
    elbo = model.get_elbo(indices=np.arange(50))
    torch.manual_seed(0)
    ll = model.get_marginal_ll(indices=np.arange(50), n_samples=50)
    assert np.isfinite(elbo) and elbo < 0 and ll >= elbo - 1.0  # the importance-weighted bound is tighter


# ---- save / load ----------------------------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_outputs(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    settings = json.loads((tmp_path / "m" / "settings.json").read_text())
    assert settings["genes"] == list(adata.var_names)
    torch.load(tmp_path / "m" / "model.pt", weights_only=True)  # plain tensors and dicts only
    loaded = SCVAE.load(tmp_path / "m", adata=adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    np.testing.assert_array_equal(loaded.get_cluster_probabilities(), model.get_cluster_probabilities())
    np.testing.assert_array_equal(loaded.get_normalized_expression(), model.get_normalized_expression())
    pd.testing.assert_frame_equal(loaded.history, model.history)
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")


def test_a_shared_variance_gmvae_saves_and_loads_exactly(tmp_path):
    """prior_z_variance 'shared' (one p(z|y) variance for every y) survives save/load: same clusters and latent."""
    adata = _adata(n=120)
    model = SCVAE(adata, model="gmvae", components=3, prior_z_variance="shared", **SMALL)
    model.train(max_epochs=3, seed=2)
    model.save(tmp_path / "m")
    loaded = SCVAE.load(tmp_path / "m", adata=adata)
    assert loaded.module.cfg.prior_z_variance == "shared"
    np.testing.assert_array_equal(loaded.get_cluster_probabilities(), model.get_cluster_probabilities())
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_load_reorders_genes_by_name_and_refuses_other_genes(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    reversed_genes = adata[:, adata.var_names[::-1]].copy()
    loaded = SCVAE.load(tmp_path / "m", adata=reversed_genes)
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation(), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(DataError, match="genes are missing"):
        SCVAE.load(tmp_path / "m", adata=adata[:, :-1].copy())


# ---- defaults: epochs, early stopping -------------------------------------------------------------------

def test_epochs_come_from_the_number_of_cells():
    assert default_epochs(2_000) == default_epochs(20_000) == MAX_EPOCHS == 400
    assert default_epochs(200_000) == 40 and default_epochs(10**8) == 1
    # below 1,000 cells: 400,000 cells' worth of passes (rounded up), at most 2,000 epochs
    assert default_epochs(1_000) == 400 and default_epochs(999) == 401
    assert default_epochs(240) == 1667 and default_epochs(571) == 701
    assert default_epochs(200) == default_epochs(10) == default_epochs(0) == 2_000
    tc = TrainConfig().resolved(2_000, "gmvae")
    assert (tc.epochs, tc.pretrain_epochs) == (400, 20)
    assert TrainConfig().resolved(2_000, "vae").pretrain_epochs == 0
    assert TrainConfig(epochs=12).resolved(2_000, "gmvae").pretrain_epochs == 4


def test_minibatch_size_comes_from_the_number_of_cells():
    """100 cells per minibatch from 1,000 cells up, 16 below (docs/defaults.md); a given size is kept."""
    assert default_batch_size(1_000) == default_batch_size(10**6) == 100
    assert default_batch_size(999) == default_batch_size(240) == default_batch_size(1) == 16
    assert TrainConfig().resolved(240, "vae").batch_size == 16
    assert TrainConfig().resolved(2_000, "gmvae").batch_size == 100
    assert TrainConfig(batch_size=7).resolved(240, "vae").batch_size == 7


def _noisy(n=200, g=15, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(rng.negative_binomial(2, 0.3, size=(n, g)).astype(np.float32))
    idx = rng.permutation(n)
    return X, idx[:120], idx[120:]


EARLY = dict(batch_size=20, lr=3e-2, seed=3, checkpoint_every=1, patience=3, epochs=60)
BIG_VAE = {"model": "vae", "likelihood": "nb", "encoder": [64], "decoder": [64], "latent": 8}


def test_early_stopping_stops_patience_epochs_after_the_best_and_keeps_its_weights(tmp_path):
    X, tr, va = _noisy()
    metrics = fit(X, tr, va, BIG_VAE, TrainConfig(**EARLY), tmp_path)
    h = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    best = int(h["val_elbo"].idxmax()) + 1
    assert metrics["stopped_early"] and metrics["best_epoch"] == best
    assert len(h) == metrics["epochs_trained"] == best + EARLY["patience"] < EARLY["epochs"]
    assert (h["val_elbo"].iloc[best:] <= h["val_elbo"].iloc[best - 1]).all()
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == best
    # run again: nothing more is trained
    again = fit(X, tr, va, BIG_VAE, TrainConfig(**EARLY), tmp_path)
    assert again["epochs_this_run"] == 0 and again["epochs_trained"] == len(h)


def test_killed_run_with_early_stopping_resumes_bit_identical(tmp_path):
    X, tr, va = _noisy()
    fit(X, tr, va, BIG_VAE, TrainConfig(**EARLY), tmp_path / "a")
    stop = pd.read_csv(tmp_path / "a" / "history.tsv", sep="\t").shape[0]
    fit(X, tr, va, BIG_VAE, TrainConfig(**{**EARLY, "epochs": stop - 2}), tmp_path / "b")  # "killed" 2 before
    fit(X, tr, va, BIG_VAE, TrainConfig(**EARLY), tmp_path / "b")
    for name in ("checkpoint.pt", "best.pt"):
        a, b = (load_checkpoint(tmp_path / r / name)["model_state"] for r in ("a", "b"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ha, hb = (pd.read_csv(tmp_path / r / "history.tsv", sep="\t").drop(columns="seconds") for r in ("a", "b"))
    pd.testing.assert_frame_equal(ha, hb)


def test_api_keeps_the_best_weights(tmp_path):
    adata = _adata(n=200, g=15)
    model = SCVAE(adata, **BIG_VAE)
    model.train(max_epochs=60, lr=3e-2, batch_size=20, patience=3, seed=3, checkpoint_dir=tmp_path)
    best = load_checkpoint(tmp_path / "best.pt")
    assert model.metrics["stopped_early"] and best["epoch"] == model.metrics["best_epoch"] < len(model.history)
    state = model.module.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in best["model_state"].items())
    assert (tmp_path / "split.tsv").exists()


# ---- command line ---------------------------------------------------------------------------------------

def test_train_prints_one_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path):
    adata = _adata(n=100, g=10)
    adata.write_h5ad(tmp_path / "d.h5ad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "scvae_torch.cli", "train", "--data", str(tmp_path / "d.h5ad"),
                             "--out", str(tmp_path / "run"), "--encoder", "8", "--decoder", "8", "--latent", "2",
                             "--epochs", "3"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if " epoch " in f" {line.split(': ', 1)[-1]}"]
    assert [line.split(": ", 1)[1].split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
