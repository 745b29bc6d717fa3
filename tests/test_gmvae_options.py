"""The GMVAE's options: learned mixture weights p(y) recover unequal type shares; k-means initialisations of
p(z|y) are chosen by validation ELBO (never labels). Their ELBO terms: tests/test_models.py, test_evaluation.py."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

from scvae_torch.evaluation import responsibilities
from scvae_torch.models import GMVAE, ModelConfig
from scvae_torch.training import TrainConfig, evaluate_terms, fit, init_mixture_prior, load_model

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


def test_initial_mixture_components_match_their_cells_aggregate_posterior():
    """p(z|y=k) after the k-means start has the mean and variance of z drawn from its cells' q(z|x) (law of total
    variance: the spread of the means plus the mean posterior variance), checked against a Monte-Carlo sample."""
    X, _ = _mixture(n=400, seed=2)
    rows = np.arange(X.shape[0])
    torch.manual_seed(0)
    model = GMVAE(ModelConfig(n_features=8, model="gmvae", likelihood="poisson", encoder=[16], decoder=[16],
                              latent=3, components=3)).eval()
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
        torch.testing.assert_close(members.var(0), prior_var[k], rtol=0.03, atol=0)
