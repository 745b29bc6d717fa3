"""The GMVAE's options: learned mixture weights p(y) recover unequal type shares; k-means initialisations of
p(z|y) are chosen by validation ELBO (never labels). Their ELBO terms: tests/test_models.py, test_evaluation.py."""

import os
import signal

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

from scvae_torch import training
from scvae_torch.evaluation import latent_means, responsibilities
from scvae_torch.mixture_init import restart_mixture
from scvae_torch.models import GMVAE, ModelConfig
from scvae_torch.training import TrainConfig, evaluate_terms, fit, init_mixture_prior, load_checkpoint, load_model

SHARES = np.array([0.6, 0.3, 0.1])


def _mixture(n=1500, seed=0):
    """Poisson counts of three well-separated types in shares 0.6 / 0.3 / 0.1, with their labels."""
    rng = np.random.default_rng(seed)
    rates = np.array([[20, 2, 2, 8, 1, 1, 5, 5], [2, 20, 2, 1, 8, 1, 5, 5], [2, 2, 20, 1, 1, 8, 5, 5]], float)
    types = rng.choice(3, size=n, p=SHARES)
    return sp.csr_matrix(rng.poisson(rates[types]).astype(np.float32)), types


@pytest.mark.parametrize("prior_y", ["learned", "uniform"])
def test_learned_mixture_weights_recover_unequal_type_shares(tmp_path, prior_y):
    X, types = _mixture()
    rows = np.arange(X.shape[0])
    cfg = dict(model="gmvae", likelihood="poisson", encoder=[32], decoder=[32], latent=2, components=3,
               prior_y=prior_y, library_size=False)
    # no pre-training, so no k-means start: p(y) starts uniform and has to be learned
    fit(X, rows[:1300], rows[1300:], cfg, TrainConfig(epochs=40, lr=1e-2, batch_size=100, seed=0, pretrain_epochs=0,
                                                       early_stopping=False), tmp_path)
    model = load_model(tmp_path)
    qy = responsibilities(model, X, rows)
    assert adjusted_rand_score(types, qy.argmax(1)) > 0.95
    if prior_y == "learned":  # p(y) is the mixture's weights: close to the true shares (matched by size)
        weights = np.sort(torch.softmax(model.prior_y_logits.detach(), -1).numpy())[::-1]
        assert np.all(np.abs(weights - SHARES) < 0.04), weights
        # and it is the M-step's fixed point: the mean responsibility of the cells
        assert np.all(np.abs(np.sort(qy.mean(0))[::-1] - weights) < 0.03)
    else:
        assert not hasattr(model, "prior_y_logits")


def test_initialisation_restarts_keep_the_one_with_the_best_validation_elbo():
    X, _ = _mixture(n=600, seed=1)
    rows = np.arange(X.shape[0])
    torch.manual_seed(0)
    model = GMVAE(ModelConfig(n_features=8, model="gmvae", likelihood="poisson", encoder=[16], decoder=[16],
                              latent=2, components=3, prior_y="learned"))
    seen = []

    def score() -> float:  # the validation ELBO with a fixed noise, so a state's score can be recomputed
        torch.manual_seed(123)
        value = evaluate_terms(model, X, rows[500:], torch.device("cpu"))["elbo"]
        seen.append((value, model.prior_mu.detach().clone(), model.prior_y_logits.detach().clone()))
        return value

    kept = init_mixture_prior(model, X, rows[:500], torch.device("cpu"), seed=0, restarts=4, score=score)
    assert len(seen) == 4
    assert len({round(v, 6) for v, _, _ in seen}) > 1  # the initialisations differ, so the choice matters
    best = int(np.argmax([v for v, _, _ in seen]))
    assert kept == best
    torch.testing.assert_close(model.prior_mu.detach(), seen[best][1])
    torch.testing.assert_close(model.prior_y_logits.detach(), seen[best][2])
    # the learned p(y) starts at the k-means clusters' shares
    shares = torch.softmax(model.prior_y_logits.detach(), -1).numpy()
    assert shares.min() > 0 and abs(shares.sum() - 1) < 1e-6


@pytest.mark.parametrize("prior_z_variance", ["component", "shared"])
def test_initial_mixture_components_match_their_cells_aggregate_posterior(prior_z_variance):
    """p(z|y=k) after the k-means start has the mean and variance of z drawn from its cells' q(z|x) (law of total
    variance: the spread of the means plus the mean posterior variance), checked against a Monte-Carlo sample;
    with one shared variance, that of every draw around its own component's mean (the pooled variance)."""
    X, _ = _mixture(n=400, seed=2)
    rows = np.arange(X.shape[0])
    torch.manual_seed(0)
    model = GMVAE(ModelConfig(n_features=8, model="gmvae", likelihood="poisson", encoder=[16], decoder=[16],
                              latent=3, components=3, prior_z_variance=prior_z_variance)).eval()
    with torch.no_grad():  # q(z|x) as pre-training left it: the uniform mixture over y of q(z|x,y)
        mu, logvar = model.encode_z(torch.as_tensor(X.toarray()).to_sparse_csr(), None)
    init_mixture_prior(model, X, rows, torch.device("cpu"), seed=0)
    prior_mu, prior_var = model.prior_mu.detach().double(), model.prior_logvar.detach().double().exp()
    # k-means' fixed point: every cell belongs to its nearest centre, and the centres are the members' means
    labels = torch.cdist(mu.double().mean(1), prior_mu).argmin(1)
    gen = torch.Generator().manual_seed(1)
    draws = 2000
    y = torch.randint(0, 3, (len(rows), draws), generator=gen)
    picked_mu = torch.gather(mu.double(), 1, y[..., None].expand(-1, -1, 3))
    picked_sd = torch.gather((0.5 * logvar.double()).exp(), 1, y[..., None].expand(-1, -1, 3))
    z = picked_mu + picked_sd * torch.randn(picked_mu.shape, generator=gen, dtype=torch.float64)
    for k in range(3):
        members = z[labels == k].reshape(-1, 3)
        assert len(members) > 50 * draws
        torch.testing.assert_close(members.mean(0), prior_mu[k], atol=0.02, rtol=0)
        if prior_z_variance == "component":
            torch.testing.assert_close(members.var(0), prior_var[k], rtol=0.03, atol=0)
    if prior_z_variance == "shared":
        assert prior_var.shape == (1, 3)
        pooled = ((z - prior_mu[labels][:, None, :]) ** 2).reshape(-1, 3).mean(0)
        torch.testing.assert_close(pooled, prior_var[0], rtol=0.03, atol=0)


def _trained_gmvae(tmp_path, X, **train):
    rows = np.arange(X.shape[0])
    cfg = dict(model="gmvae", likelihood="poisson", encoder=[32], decoder=[32], latent=2, components=3,
               library_size=False)
    fit(X, rows[:1000], rows[1000:1200], cfg,
        TrainConfig(**{**dict(epochs=25, lr=1e-2, batch_size=100, seed=0, pretrain_epochs=8), **train}), tmp_path)
    return load_model(tmp_path), rows


def test_a_merged_mixture_is_restarted_at_the_clusters_of_its_latent(tmp_path):
    """restart_mixture: a mixture whose q(y|x) puts every cell in one component (the merge the restart is for) is
    restarted so that its clusters follow its latent again; one that agrees with its latent is left as it is."""
    X, types = _mixture(n=1200, seed=3)
    model, rows = _trained_gmvae(tmp_path, X)
    assert adjusted_rand_score(types, responsibilities(model, X, rows).argmax(1)) > 0.95  # the setting works
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert restart_mixture(model, X, rows, torch.device("cpu"), seed=0) >= 0.98
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # merge: q(y|x) = component 0 for every cell
        model.y_logits.weight.zero_()
        model.y_logits.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    assert np.all(responsibilities(model, X, rows).argmax(1) == 0)
    Z = latent_means(model, X, rows)  # the latent the restart clusters
    assert restart_mixture(model, X, rows, torch.device("cpu"), seed=0) < 0.5
    qy = responsibilities(model, X, rows)
    assert adjusted_rand_score(types, qy.argmax(1)) > 0.95
    # each p(z|y) sits at the latent mean of one true type, and p(y) holds that type's share
    centres = np.stack([Z[types == t].mean(0) for t in range(3)])
    match = np.argmin(np.linalg.norm(model.prior_mu.detach().numpy()[:, None] - centres[None], axis=2), axis=1)
    assert sorted(match) == [0, 1, 2]
    spread = np.linalg.norm(Z - Z.mean(0), axis=1).mean()
    assert np.linalg.norm(model.prior_mu.detach().numpy() - centres[match], axis=1).max() < 0.2 * spread
    shares = torch.softmax(model.prior_y_logits.detach(), -1).numpy()
    np.testing.assert_allclose(shares, np.bincount(types, minlength=3)[match] / len(types), atol=0.03)


def test_training_restarts_a_disagreeing_mixture_keeps_the_best_elbo_and_resumes_exactly(tmp_path, monkeypatch):
    """With every check taken as a disagreement, fit restarts the mixture at early stopping and trains on, keeps
    best.pt at the best validation ELBO of the whole run, and a run stopped by a signal just after the restart
    resumes to the uninterrupted run's weights and history."""
    monkeypatch.setattr(training, "RESTART_AGREEMENT", 1.5)  # ARI <= 1: always a restart
    X, _ = _mixture(n=1200, seed=4)
    rows = np.arange(X.shape[0])
    cfg = dict(model="gmvae", likelihood="poisson", encoder=[16], decoder=[16], latent=2, components=3,
               library_size=False)
    tc = dict(lr=1e-2, batch_size=100, seed=0, pretrain_epochs=4, patience=3)
    full = fit(X, rows[:1000], rows[1000:], cfg, TrainConfig(epochs=60, **tc), tmp_path / "a")
    (check,) = full["mixture_restarts"]
    assert check["restarted"] and check["epoch"] < full["epochs_trained"] - 2
    h = pd.read_csv(tmp_path / "a" / "history.tsv", sep="\t")
    assert full["best_val_elbo"] == pytest.approx(h["val_elbo"][4:].max())
    assert load_checkpoint(tmp_path / "a" / "best.pt")["epoch"] == int(h["val_elbo"][4:].idxmax()) + 1

    real = training._restart

    def restart_then_signal(*args, **kwargs):  # SLURM's warning arrives just after the restart
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(training, "_restart", restart_then_signal)
    with pytest.raises(training.TrainingInterrupted):
        fit(X, rows[:1000], rows[1000:], cfg, TrainConfig(epochs=60, **tc), tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == check["epoch"]
    monkeypatch.setattr(training, "_restart", real)
    fit(X, rows[:1000], rows[1000:], cfg, TrainConfig(epochs=60, **tc), tmp_path / "b")
    a, b = (load_checkpoint(tmp_path / r / "checkpoint.pt") for r in "ab")
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    assert a["restarts"] == b["restarts"]
    pd.testing.assert_frame_equal(h.drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "b" / "history.tsv", sep="\t").drop(columns="seconds"))

    # without restarts (and without the learning-rate cut that would follow) the run stops where the check came
    none = fit(X, rows[:1000], rows[1000:], cfg, TrainConfig(epochs=60, mixture_restarts=0, lr_drops=0, **tc),
               tmp_path / "c")
    assert none["mixture_restarts"] == [] and none["epochs_trained"] == check["epoch"]
    # without early stopping the check comes restart_epochs before the end, and the run keeps its epochs
    end = fit(X, rows[:1000], rows[1000:], cfg, TrainConfig(epochs=12, early_stopping=False, **tc), tmp_path / "d")
    assert [r["epoch"] for r in end["mixture_restarts"]] == [12 - min(2 * 3, (12 - 4) // 2)]
    assert end["epochs_trained"] == 12


@pytest.mark.parametrize("library_size", [False, True])
def test_elbo_cluster_posterior_maximises_the_elbo_over_q_y(monkeypatch, library_size):
    """softmax(component_elbos) is the q(y|x) that maximises the ELBO of the model's own forward pass (z at the mean
    of q(z|x,y)): its ELBO is log sum_y exp(component_elbos), and no other q(y|x) (the encoder's, random ones, one-hot
    ones) does better."""
    X, _ = _mixture(n=64, seed=3)
    x = torch.as_tensor(X.toarray())
    torch.manual_seed(1)
    model = GMVAE(ModelConfig(n_features=8, model="gmvae", likelihood="nb", encoder=[16], decoder=[16], latent=2,
                              components=3, prior_y="learned", library_size=library_size))
    with torch.no_grad():
        model.prior_y_logits.copy_(torch.tensor([0.5, -0.3, 0.1]))
    model.eval()
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # forward's z = the mean of q(z|x,y)

    def elbo_with(log_q: torch.Tensor) -> torch.Tensor:
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(model, "y_log_probs", lambda x, batch=None: log_q)
            return model(x)["elbo"]

    with torch.no_grad():
        scores = model.component_elbos(x)
        q_star = model.cluster_probabilities(x, posterior="elbo")
        encoder = model.cluster_probabilities(x, posterior="encoder")
    torch.testing.assert_close(q_star, torch.softmax(scores, -1))
    torch.testing.assert_close(encoder, model.responsibilities(x).detach())
    best = elbo_with(q_star.log())
    torch.testing.assert_close(best, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-3)
    gen = torch.Generator().manual_seed(0)
    others = [encoder, *(torch.softmax(3 * torch.randn(x.shape[0], 3, generator=gen), -1) for _ in range(5)),
              *(torch.nn.functional.one_hot(torch.full((x.shape[0],), k), 3).float() for k in range(3))]
    for q in others:
        assert torch.all(elbo_with(q.clamp_min(1e-30).log()) <= best + 1e-3)
    assert torch.any(elbo_with(encoder.log()) < best - 1e-2)  # the encoder (untrained) is not already optimal


def test_predict_clusters_reads_the_configured_posterior(tmp_path):
    """cluster_posterior 'encoder' (default) and 'elbo' give argmax of q(y|x) and of q*(y|x) (softmax of
    component_elbos); both find the types of a well-separated mixture."""
    from scvae_torch import SCVAE

    X, types = _mixture(n=600, seed=2)
    adata = __import__("anndata").AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]))
    model = SCVAE(adata, model="gmvae", likelihood="poisson", encoder=[16], decoder=[16], latent=2, components=3)
    assert model.model_config.cluster_posterior == "encoder"
    model.train(max_epochs=30, seed=0, train_size=0.9, validation_size=0.1)
    X_rows = np.arange(X.shape[0])
    q = responsibilities(model.module, X, X_rows)
    default = model.predict_clusters()
    np.testing.assert_array_equal(default, q.argmax(1))
    np.testing.assert_array_equal(adata.obs["scvae_cluster"].astype(int).to_numpy(), default)
    elbo = model.predict_clusters(posterior="elbo")
    model.module.eval()
    with torch.no_grad():
        scores = model.module.component_elbos(torch.as_tensor(X.toarray()))
    np.testing.assert_array_equal(elbo, scores.argmax(1).numpy())
    np.testing.assert_array_equal(adata.obs["scvae_cluster"].astype(int).to_numpy(), elbo)
    assert adjusted_rand_score(types, elbo) > 0.95 and adjusted_rand_score(types, q.argmax(1)) > 0.95
    with pytest.raises(ValueError, match="unknown cluster_posterior 'mean'"):
        SCVAE(adata, model="gmvae", components=3, cluster_posterior="mean")
    with pytest.raises(ValueError, match="unknown posterior 'q'"):
        model.predict_clusters(posterior="q")
