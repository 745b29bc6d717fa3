"""VAE and GMVAE: KL terms against closed forms and brute-force Monte Carlo, gradients, configuration checks."""

import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from scvae_torch import distributions as D
from scvae_torch.models import GMVAE, VAE, ModelConfig, build_model, gaussian_kl, gaussian_log_prob


def _counts(n=64, g=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(n, g, generator=gen) * 8, generator=gen)


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    mq, mp, lq, lp = (torch.randn(50, 7, generator=gen, dtype=torch.float64) for _ in range(4))
    ours = gaussian_kl(mq, lq, mp, lp)
    ref = kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(mp, (0.5 * lp).exp())).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ref_lp = Normal(mp, (0.5 * lp).exp()).log_prob(mq).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(mq, mp, lp), ref_lp, rtol=1e-10, atol=1e-10)


def test_vae_kl_is_the_closed_form_against_standard_normal():
    torch.manual_seed(0)
    model = VAE(ModelConfig(n_features=12, likelihood="nb", encoder=[16], decoder=[16], latent=3)).double().eval()
    x = _counts().double()
    out = model(x)
    mu, logvar = model.encode(x)
    closed = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)
    torch.testing.assert_close(out["kl_z"], closed)
    torch.testing.assert_close(out["elbo"], out["log_lik"] - out["kl_z"])


def _log_py(model):
    """log p(y) from torch.distributions: uniform, or the learned weights' logits."""
    K = model.cfg.components
    logits = model.prior_y_logits if model.cfg.prior_y == "learned" else torch.zeros(K, dtype=torch.float64)
    return Categorical(logits=logits.double()).logits


def _prior_logvar_row(model, y):
    """log-variance of p(z|y) read from the parameter itself: row y, or the one shared row."""
    return model.prior_logvar[y if model.cfg.prior_z_variance == "component" else 0]


@torch.no_grad()
@pytest.mark.parametrize("prior_y,prior_z_variance", [("uniform", "component"), ("learned", "component"),
                                                      ("learned", "shared")])
def test_gmvae_kl_terms_against_brute_force_monte_carlo(prior_y, prior_z_variance):
    torch.manual_seed(0)
    cfg = ModelConfig(n_features=12, model="gmvae", likelihood="poisson", encoder=[16], decoder=[16], latent=2,
                      components=4, prior_y=prior_y, prior_z_variance=prior_z_variance)
    model = GMVAE(cfg).double().eval()
    model.prior_logvar.normal_(0, 0.5)
    if prior_y == "learned":
        model.prior_y_logits.normal_(0, 1.0)
    log_py = _log_py(model)
    x = _counts(n=8).double()
    out = model(x)
    S = 200_000
    log_qy = model.y_log_probs(x)
    mu, logvar = model.encode_z(x)
    gen = torch.Generator().manual_seed(5)
    for i in range(x.shape[0]):
        y = torch.multinomial(log_qy[i].exp(), S, replacement=True, generator=gen)
        z = mu[i, y] + torch.randn(S, cfg.latent, generator=gen, dtype=torch.float64) * (0.5 * logvar[i, y]).exp()
        log_q = gaussian_log_prob(z, mu[i, y], logvar[i, y])
        log_p = gaussian_log_prob(z, model.prior_mu[y], _prior_logvar_row(model, y))
        sample = log_q - log_p
        se = sample.std() / math.sqrt(S)
        assert abs(sample.mean() - out["kl_z"][i]) < 5 * se + 1e-9
        kl_y_samples = log_qy[i, y] - log_py[y]
        assert abs(kl_y_samples.mean() - out["kl_y"][i]) < 5 * kl_y_samples.std() / math.sqrt(S) + 1e-9
        ref_kl_y = kl_divergence(Categorical(logits=log_qy[i]), Categorical(logits=log_py))
        torch.testing.assert_close(out["kl_y"][i], ref_kl_y)


@torch.no_grad()
@pytest.mark.parametrize("prior_y,prior_z_variance", [("uniform", "component"), ("learned", "component"),
                                                      ("learned", "shared")])
def test_gmvae_elbo_equals_sampled_y_monte_carlo_elbo(prior_y, prior_z_variance):
    """Summing over y exactly must agree with the textbook ELBO estimated by sampling y and z."""
    torch.manual_seed(3)
    cfg = ModelConfig(n_features=6, model="gmvae", likelihood="nb", encoder=[8], decoder=[8], latent=2, components=3,
                      prior_y=prior_y, prior_z_variance=prior_z_variance)
    model = GMVAE(cfg).double().eval()
    model.prior_logvar.normal_(0, 0.5)
    if prior_y == "learned":
        model.prior_y_logits.normal_(0, 1.0)
    log_py = _log_py(model)
    x = _counts(n=4, g=6).double()
    exact = torch.stack([model(x)["elbo"] for _ in range(400)])
    exact_mean = exact.mean(0)
    S = 40_000
    log_qy = model.y_log_probs(x)
    mu, logvar = model.encode_z(x)
    gen = torch.Generator().manual_seed(9)
    for i in range(x.shape[0]):
        y = torch.multinomial(log_qy[i].exp(), S, replacement=True, generator=gen)
        z = mu[i, y] + torch.randn(S, cfg.latent, generator=gen, dtype=torch.float64) * (0.5 * logvar[i, y]).exp()
        params = model.decode(z, x[i].expand(S, -1))
        log_px = D.log_prob("nb", x[i].expand(S, -1), params).sum(-1)
        terms = (log_px + gaussian_log_prob(z, model.prior_mu[y], _prior_logvar_row(model, y)) + log_py[y]
                 - log_qy[i, y] - gaussian_log_prob(z, mu[i, y], logvar[i, y]))
        se = math.sqrt(terms.var() / S + exact[:, i].var() / exact.shape[0])
        assert abs(terms.mean() - exact_mean[i]) < 5 * se


@pytest.mark.parametrize("model_name", ["vae", "gmvae", "gmvae-learned", "gmvae-shared"])
@pytest.mark.parametrize("likelihood,dispersion", [("poisson", "gene"), ("nb", "gene"), ("nb", "gene-cell"),
                                                   ("zip", "gene"), ("zinb", "gene-cell")])
def test_gradients_reach_every_parameter(model_name, likelihood, dispersion):
    torch.manual_seed(0)
    model = build_model(dict(n_features=12, model=model_name.split("-")[0], likelihood=likelihood,
                             dispersion=dispersion, encoder=[16, 8], decoder=[8, 16], latent=3, components=3,
                             prior_y="learned" if model_name.endswith("learned") else "uniform",
                             prior_z_variance="shared" if model_name.endswith("shared") else "component"))
    model.train()
    out = model(_counts())
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient at {name}"


def test_gmvae_first_layer_split_equals_concatenated_input():
    """q(z|x,y) is an MLP of [x, onehot(y)]; the split first layer must compute exactly that."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_features=5, model="gmvae", encoder=[7], decoder=[7], latent=2, components=3, batch_norm=False,
                      log1p_input=False)  # the encoders see x itself, as the reference below
    model = GMVAE(cfg).double().eval()
    x = _counts(n=4, g=5).double()
    mu, _ = model.encode_z(x)
    for k in range(3):
        onehot = torch.zeros(4, 3, dtype=torch.float64)
        onehot[:, k] = 1
        h = model.z_first_rest(model.z_first(torch.cat([x, onehot], 1)))
        torch.testing.assert_close(mu[:, k], model.z_mu(model.encoder(h)))


@pytest.mark.parametrize("bad,match", [
    (dict(likelihood="gauss"), "unknown likelihood"),
    (dict(latent=0), "latent size"),
    (dict(model="gmvae", components=0), "components"),
    (dict(encoder=[10, 0]), "layer sizes"),
    (dict(dispersion="cell"), "unknown dispersion"),
])
def test_bad_model_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(n_features=10, **bad)


def test_unknown_model_option_is_refused():
    with pytest.raises(ValueError, match="unknown model option"):
        ModelConfig.from_dict({"n_features": 3, "latnt": 4})


def test_extreme_decoder_outputs_stay_finite():
    """A decoder pushed to huge log-rates must not overflow exp() in float32 (the review's Poisson failure)."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(n_features=12, likelihood="poisson", encoder=[8], decoder=[8], latent=2))
    with torch.no_grad():
        model.decoder.heads["log_mean"].bias.fill_(500.0)
    out = model(_counts() * 1000)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("normalise", [False, True])
def test_encoder_input_of_sparse_and_dense_counts_is_log1p_of_counts_or_counts_per_10000(normalise):
    """normalise_input: log(1 + 10,000 x / library size), scanpy's normalize_total + log1p, computed in numpy."""
    import numpy as np

    from scvae_torch.models import encoder_input

    x = _counts(n=20, g=9, seed=3).float()
    x[4] = 0  # a cell without counts stays all zero
    lib = x.numpy().sum(1, keepdims=True)
    expected = np.log1p(x.numpy() * 1e4 / np.maximum(lib, 1)) if normalise else np.log1p(x.numpy())
    for given in (x, x.to_sparse_csr()):
        np.testing.assert_allclose(encoder_input(given, True, normalise).numpy(), expected, rtol=1e-5, atol=1e-6)
