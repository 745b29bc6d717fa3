"""The GMVAE's prior set after pre-training: k-means of the pre-trained latent gives p(z|y), a learned p(y) and the
clusters q(y|x) starts at; restarts scored by the validation ELBO (docs/clustering.md)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from .batches import Source, batch_tensor, open_source
from .models import GMVAE

log = logging.getLogger("scvae_torch.training")

Y_ENCODER_EPOCHS = 5  # epochs of cross-entropy that start q(y|x) at the k-means clusters
RESTART_AGREEMENT = 0.98  # restart_mixture: ARI between k-means of the latent and argmax q(y|x) taken as agreeing

@torch.no_grad()
def init_mixture_prior(model: GMVAE, X: sp.csr_matrix | Source, rows: np.ndarray, device: torch.device,
                       seed: int, batch_codes: np.ndarray | None = None, restarts: int = 1,
                       score: Callable[[], float] | None = None) -> int:
    """Set p(z|y) (and a learned p(y)) from k-means clusters of the pre-trained latent means, and start q(y|x)
    at those clusters (Y_ENCODER_EPOCHS of cross-entropy on q(y|x)'s own parameters).

    With restarts > 1, k-means runs with seeds seed, seed + 1, ...; each initialisation is scored by `score`
    (the validation ELBO: never labels) and the best is kept. Returns the index of the restart kept.
    """
    from sklearn.cluster import KMeans

    model.eval()
    source = open_source(X, device)
    Z, V, _ = _posterior_moments(model, source, rows, device, batch_codes)
    K = model.cfg.components
    best, best_state = -math.inf, None
    for r in range(restarts):
        labels = KMeans(n_clusters=K, n_init=10, random_state=seed + r).fit_predict(Z)
        _start_mixture(model, source, rows, labels, Z, V, device, seed + r, batch_codes)
        if restarts == 1 or score is None:
            return 0
        value = score()
        log.info("k-means initialisation %d of %d: validation ELBO %.6g", r + 1, restarts, value)
        if value > best:
            best, best_r = value, r
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return best_r


@torch.no_grad()
def restart_mixture(model: GMVAE, X: sp.csr_matrix | Source, rows: np.ndarray, device: torch.device, seed: int,
                    batch_codes: np.ndarray | None = None, agreement: float = RESTART_AGREEMENT) -> float:
    """Restart a trained GMVAE's mixture from k-means of its own latent, where its clusters disagree with it.

    k-means (k = K) of the cells' latent means (mixed over q(y|x)) is compared with argmax q(y|x) by ARI; below
    `agreement`, p(z|y), a learned p(y) and q(y|x) are set from the k-means clusters as after pre-training
    (the caller trains on and keeps whichever fits the validation cells better). Returns the ARI.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    model.eval()
    source = open_source(X, device)
    Z, V, clusters = _posterior_moments(model, source, rows, device, batch_codes, mixed=True)
    labels = KMeans(n_clusters=model.cfg.components, n_init=10, random_state=seed).fit_predict(Z)
    ari = float(adjusted_rand_score(clusters, labels))
    if ari < agreement:
        _start_mixture(model, source, rows, labels, Z, V, device, seed, batch_codes)
    return ari


def _start_mixture(model: GMVAE, source, rows: np.ndarray, labels: np.ndarray, Z: np.ndarray, V: np.ndarray,
                   device: torch.device, seed: int, batch_codes: np.ndarray | None) -> None:
    """Set p(z|y), a learned p(y) and q(y|x) from clusters (labels) of the cells' posterior means Z, variances V."""
    K = model.cfg.components
    means, logvars = np.zeros((K, Z.shape[1])), np.zeros((K, Z.shape[1]))
    sizes = np.bincount(labels, minlength=K)
    for k in range(K):
        members = Z[labels == k]
        means[k] = members.mean(0) if len(members) else Z.mean(0)
        if len(members) > 1:  # the members' aggregate posterior: Var(z) = Var(E[z|x]) + E[Var(z|x)]
            logvars[k] = np.log(members.var(0) + V[labels == k].mean(0) + 1e-4)
    if model.cfg.prior_z_variance == "shared":  # the clusters' pooled variance: their variances weighted by size
        weights = np.where(sizes > 1, sizes, 0)[:, None]  # clusters of one cell have no variance of their own
        logvars = np.log((weights * np.exp(logvars)).sum(0) / max(weights.sum(), 1))[None, :]
    model.prior_mu.copy_(torch.as_tensor(means, dtype=model.prior_mu.dtype))
    model.prior_logvar.copy_(torch.as_tensor(logvars, dtype=model.prior_logvar.dtype))
    if model.cfg.prior_y == "learned":  # the clusters' shares, never below half a cell
        model.prior_y_logits.copy_(torch.as_tensor(np.log(np.maximum(sizes, 0.5) / len(Z)),
                                                   dtype=model.prior_y_logits.dtype))
    # q(y|x) was held uniform in pre-training, so its network is untrained: left so, the first epochs pull
    # every q(z|x,y) towards its p(z|y) and the mixture collapses onto a few components (measured in
    # docs/clustering.md); started at the clusters, q(y|x) keeps them apart
    _fit_y_encoder(model, source, rows, labels, device, seed, Y_ENCODER_EPOCHS, batch_codes)


def _posterior_moments(model: GMVAE, source, rows: np.ndarray, device: torch.device,
                       batch_codes: np.ndarray | None,
                       mixed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean and variance of each cell's q(z|x) per latent dimension: the mixture over y of q(z|x,y) with weights
    q(y|x) (mixed) or uniform (as pre-training holds q(y|x)); with mixed, also each cell's argmax q(y|x)."""
    means, variances, clusters = [], [], []
    for s in range(0, len(rows), 1024):
        x, b = source.batch(rows[s:s + 1024]).counts, batch_tensor(batch_codes, rows[s:s + 1024], device)
        mu, logvar = model.encode_z(x, b)
        mu, var = mu.double(), logvar.double().exp()
        K = mu.shape[1]
        w = model.responsibilities(x, b).double()[:, :, None] if mixed else torch.full_like(mu[:, :, :1], 1 / K)
        mean = (w * mu).sum(1)  # law of total variance over the mixture: E[Var(z|y)] + Var(E[z|y])
        means.append(mean.cpu())
        variances.append(((w * (var + mu ** 2)).sum(1) - mean ** 2).clamp_min(0).cpu())
        clusters.append(w[:, :, 0].argmax(1).cpu())
    return (torch.cat(means).numpy(), torch.cat(variances).numpy(),
            torch.cat(clusters).numpy() if mixed else None)


def _fit_y_encoder(model: GMVAE, source, rows: np.ndarray, labels: np.ndarray, device: torch.device, seed: int,
                   epochs: int, batch_codes: np.ndarray | None = None) -> None:
    """Start q(y|x) at the k-means clusters: a few epochs of cross-entropy on its own parameters only."""
    params = [*model.y_encoder.parameters(), *model.y_logits.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.as_tensor(labels, dtype=torch.long, device=device)
    gen = np.random.default_rng(seed)
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = gen.permutation(len(rows))
            for s in range(0, len(order), 128):
                part = order[s:s + 128]
                if len(part) < 2:
                    continue
                log_qy = model.y_log_probs(source.batch(rows[part]).counts,
                                           batch_tensor(batch_codes, rows[part], device))
                loss = torch.nn.functional.nll_loss(log_qy, target[part])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
