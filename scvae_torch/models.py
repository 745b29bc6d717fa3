"""MLP blocks, the VAE and the Gaussian-mixture VAE (GMVAE); each forward pass returns its ELBO terms per cell."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributions as D
from .config import CLUSTER_POSTERIORS, ModelConfig

# Bounds on decoder log-parameters: exp(20) = 4.9e8 is far above any count, and keeps exp() finite in float32.
LOG_MEAN_BOUNDS = (-30.0, 20.0)
LOG_THETA_BOUNDS = (-15.0, 15.0)
LOG_VAR_BOUNDS = (-15.0, 15.0)


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) for diagonal Gaussians, summed over the last axis."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0).sum(-1)


def _float32(t: Tensor) -> Tensor:
    """t in float32 when autocast made it float16/bfloat16 (ELBO terms are never summed in half precision)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def bounded(t: Tensor, low: float, high: float) -> Tensor:
    """t.clamp(low, high), same values and gradients; t itself when nothing needs clamping (the usual case).

    clamp's backward masks the gradient (3-4 passes over a cells x genes tensor); on the CPU one min/max pass
    decides that no mask is needed. On a GPU (reading the min/max would make the host wait for the device)
    and inside torch.compile (which fuses the mask) it is clamp.
    """
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return t.clamp(low, high)
    t_min, t_max = torch.aminmax(t.detach())
    return t if low <= t_min.item() and t_max.item() <= high else t.clamp(low, high)


def tile_rows(counts: Tensor, times: int) -> Tensor:
    """counts (cells x genes, dense or sparse CSR) stacked `times` times: row t * cells + i is row i."""
    if counts.layout == torch.strided:
        return counts.repeat(times, 1)
    if counts.layout != torch.sparse_csr:
        counts = counts.to_sparse_csr()
    crow, col, values = counts.crow_indices(), counts.col_indices(), counts.values()
    nnz = values.shape[0]
    # row offsets of copy t are those of the original shifted by t * nnz; no loop over cells or copies
    shifts = torch.arange(times, device=crow.device, dtype=crow.dtype)[:, None] * nnz
    crow = torch.cat([(crow[None, :-1] + shifts).reshape(-1), crow.new_full((1,), times * nnz)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(crow, col.repeat(times), values.repeat(times),
                                       (times * counts.shape[0], counts.shape[1]), check_invariants=False)


def log_px(likelihood: str, counts: Tensor, params: dict[str, Tensor], zero_part: Callable | None = None) -> Tensor:
    """Per-cell log p(x | params) (counts dense or sparse CSR), always outside autocast: sums stay float32.

    zero_part: a compiled distributions.dense_zero_part (see VAE.zero_part)."""
    device_type = params["log_mean"].device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return D.log_prob_cells(likelihood, counts, {k: _float32(v) for k, v in params.items()}, zero_part)
    return D.log_prob_cells(likelihood, counts, params, zero_part)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z | mu, diag exp(logvar)), summed over the last axis."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)


class MLP(nn.Module):
    """Hidden layers Linear -> BatchNorm -> ReLU -> Dropout; `n_out` is the last width."""

    def __init__(self, n_in: int, sizes: list[int], batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for n in sizes:
            layers.append(nn.Linear(n_in, n))
            if batch_norm:
                layers.append(nn.BatchNorm1d(n))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            n_in = n
        self.net = nn.Sequential(*layers)
        self.n_out = n_in

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def with_batch(t: Tensor, batch: Tensor | None, n_batches: int) -> Tensor:
    """t with the one-hot batch codes appended as columns (a conditional VAE's input); t when n_batches is 0.

    batch: integer codes, one per row of t (0 .. n_batches - 1)."""
    if not n_batches:
        return t
    if batch is None:
        raise ValueError("this model has a batch covariate: give each cell's batch code (batch=)")
    return torch.cat([t, F.one_hot(batch, n_batches).to(t.dtype)], dim=-1)


class Decoder(nn.Module):
    """p(x|z, b): an MLP from z (and the one-hot batch b, when the model has one) to the likelihood's parameters
    in log / logit space."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.likelihood = cfg.likelihood
        self.library_size = cfg.library_size
        self.n_batches = cfg.n_batches
        self.mlp = MLP(cfg.latent + cfg.n_batches, cfg.decoder, cfg.batch_norm, cfg.dropout)
        names = D.PARAMETERS[cfg.likelihood]
        self.per_gene_theta = "log_theta" in names and cfg.dispersion in ("gene", "gene-batch")
        self.per_batch_theta = self.per_gene_theta and cfg.dispersion == "gene-batch"
        self.heads = nn.ModuleDict({
            name: nn.Linear(self.mlp.n_out, cfg.n_features)
            for name in names if not (name == "log_theta" and self.per_gene_theta)
        })
        if self.per_gene_theta:
            shape = (cfg.n_batches, cfg.n_features) if self.per_batch_theta else (cfg.n_features,)
            self.log_theta = nn.Parameter(torch.zeros(shape))

    def forward(self, z: Tensor, log_library: Tensor | None = None, batch: Tensor | None = None) -> dict[str, Tensor]:
        h = self.mlp(with_batch(z, batch, self.n_batches))
        params = {name: _float32(head(h)) for name, head in self.heads.items()}
        if self.library_size:
            # mean = library size x softmax over genes (scVI-style scaling)
            params["log_mean"] = torch.log_softmax(params["log_mean"], dim=-1) + log_library
        params["log_mean"] = bounded(params["log_mean"], *LOG_MEAN_BOUNDS)
        if self.per_batch_theta:  # one row per cell: its batch's dispersions
            params["log_theta"] = self.log_theta.clamp(*LOG_THETA_BOUNDS)[batch]
        elif self.per_gene_theta:
            params["log_theta"] = self.log_theta.clamp(*LOG_THETA_BOUNDS)
        elif "log_theta" in params:
            params["log_theta"] = bounded(params["log_theta"], *LOG_THETA_BOUNDS)
        return params


def _normal(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws of like's shape, dtype and device."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def _log_library(x: Tensor) -> Tensor:
    """log of each cell's total count (at least 1), shape (cells, 1); x dense or sparse CSR."""
    if x.layout == torch.strided:
        total = x.sum(-1, keepdim=True)
    else:
        offsets, _, _, values = D.sparse_entries(x)
        total = torch.segment_reduce(values, "sum", offsets=offsets)[:, None]
    return torch.log(total.clamp_min(1.0))


NORMALISED_TOTAL = 1e4  # normalise_input: counts per 10,000 (scanpy's normalize_total)


def encoder_input(x: Tensor, log1p: bool, normalise: bool = False) -> Tensor:
    """The encoders' dense input: x or log(1 + x), of the counts or (normalise) of the counts per NORMALISED_TOTAL;
    a sparse CSR x is densified here, log1p taken of its stored values only (log1p(0) = 0), which costs half of
    densifying and then taking log1p."""
    if x.layout == torch.strided:
        if normalise:
            x = x * (NORMALISED_TOTAL / x.sum(-1, keepdim=True).clamp_min(1.0))
        return torch.log1p(x) if log1p else x
    offsets, rows, cols, values = D.sparse_entries(x)
    if normalise:
        total = torch.segment_reduce(values, "sum", offsets=offsets).clamp_min(1.0)
        values = values * (NORMALISED_TOTAL / total)[rows]
    dense = torch.zeros(x.shape, dtype=values.dtype, device=values.device)
    # a plain write (no accumulation: the entries of a CSR minibatch are distinct), faster than index_add_
    return dense.index_put_((rows, cols), torch.log1p(values) if log1p else values)


class VAE(nn.Module):
    """q(z|x) = N(mu(x), diag sigma^2(x)), p(z) = N(0, I), p(x|z) from the decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Built in this order (the GMVAE's parts in between), so a seed gives the same initial weights.
        self.encoder = self._build_encoder()
        self.z_mu = nn.Linear(self.encoder.n_out, cfg.latent)
        self.z_logvar = nn.Linear(self.encoder.n_out, cfg.latent)
        self._build_prior()
        self.decoder = Decoder(cfg)
        # A compiled distributions.dense_zero_part, set by training's `compile` option (None: eager).
        self.zero_part: Callable | None = None

    @staticmethod
    def _encoder_batches(cfg: ModelConfig) -> int:
        """Extra encoder inputs: the one-hot batch when the encoders are conditioned on it."""
        return cfg.n_batches if cfg.batch_encoder else 0

    def _build_encoder(self) -> MLP:
        """The MLP whose output gives the mean and log-variance of q(z|x) (of q(z|x,b) when the encoder sees
        the one-hot batch b too)."""
        cfg = self.cfg
        return MLP(cfg.n_features + self._encoder_batches(cfg), cfg.encoder, cfg.batch_norm, cfg.dropout)

    def _build_prior(self) -> None:
        """Parameters of p(z): none, it is N(0, I)."""

    def _input(self, x: Tensor, batch: Tensor | None = None) -> Tensor:
        return with_batch(encoder_input(x, self.cfg.log1p_input, self.cfg.normalise_input), batch,
                          self._encoder_batches(self.cfg))

    def encode(self, x: Tensor, batch: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x) (q(z|x,b) when the encoder is conditioned on the batch)."""
        h = self.encoder(self._input(x, batch))
        return _float32(self.z_mu(h)), _float32(self.z_logvar(h)).clamp(*LOG_VAR_BOUNDS)

    def latent(self, x: Tensor, batch: Tensor | None = None) -> Tensor:
        """Latent representation of each cell: the mean of q(z|x)."""
        return self.encode(x, batch)[0]

    def sample_z(self, x: Tensor, batch: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """One draw z ~ q(z|x) per cell (generator: a seeded torch.Generator on x's device, for reproducible draws)."""
        mu, logvar = self.encode(x, batch)
        return mu + _normal(mu, generator) * (0.5 * logvar).exp()

    def decode(self, z: Tensor, x: Tensor, batch: Tensor | None = None) -> dict[str, Tensor]:
        """Likelihood parameters for each row of z (x supplies the library size when that option is on; batch,
        the batch codes to decode in, when the model has a batch covariate)."""
        return self.decoder(z, _log_library(x) if self.cfg.library_size else None, batch)

    def pretraining(self, epoch: int, pretrain_epochs: int) -> bool:
        """Whether 0-based `epoch` trains as a plain VAE before the model's own prior is set: never for a VAE."""
        return False

    def initialise_after_pretraining(self, epoch: int, pretrain_epochs: int) -> bool:
        """Whether the prior is to be initialised (init_mixture_prior) before 0-based `epoch`: never for a VAE."""
        return False

    def forward(self, x: Tensor, kl_weight: float = 1.0, labels: Tensor | None = None, pretrain: bool = False,
                counts: Tensor | None = None, batch: Tensor | None = None) -> dict[str, Tensor]:
        """ELBO terms per cell, and the minibatch loss (negative ELBO per cell, KL weighted).

        labels and pretrain are the GMVAE's (unused here, so that training calls every model alike);
        x: the counts, dense or a sparse CSR tensor (which makes the likelihood sparse-aware: same values);
        counts, the same cells as a sparse CSR tensor, does that for a dense x (default: x itself);
        batch: each cell's batch code (models with a batch covariate only).
        """
        mu, logvar = self.encode(x, batch)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        params = self.decode(z, x, batch)
        log_lik = log_px(self.cfg.likelihood, x if counts is None else counts, params, self.zero_part)
        kl_z = gaussian_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar))
        kl_y = torch.zeros_like(kl_z)
        kl_z_loss = kl_z.clamp_min(self.cfg.free_nats) if self.cfg.free_nats > 0 else kl_z
        loss = -(log_lik - kl_weight * kl_z_loss).mean()
        return {"elbo": log_lik - kl_z, "log_lik": log_lik, "kl_z": kl_z, "kl_y": kl_y, "loss": loss,
                "params": params}

    def iw_log_likelihood(self, x: Tensor, samples: int, counts: Tensor | None = None,
                          batch: Tensor | None = None) -> Tensor:
        """Importance-weighted estimate of log p(x) per cell with `samples` draws from q(z|x)."""
        mu, logvar = self.encode(x, batch)
        counts = x if counts is None else counts
        log_library = _log_library(x) if self.cfg.library_size else None
        terms = []
        for s in _sample_chunks(samples, x.shape[0] * x.shape[1]):
            z = mu + torch.randn((s, *mu.shape), dtype=mu.dtype, device=mu.device) * (0.5 * logvar).exp()
            params = self.decoder(z.reshape(-1, mu.shape[-1]),
                                  None if log_library is None else log_library.repeat(s, 1),
                                  None if batch is None else batch.repeat(s))
            log_p = log_px(self.cfg.likelihood, tile_rows(counts, s), params, self.zero_part).reshape(s, x.shape[0])
            log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
            terms.append(log_p + log_pz - gaussian_log_prob(z, mu, logvar))
        return torch.logsumexp(torch.cat(terms), dim=0) - math.log(samples)


def _sample_chunks(samples: int, elements_per_sample: int, budget: int = 2 ** 24) -> list[int]:
    """Split `samples` Monte-Carlo draws into chunks of at most ~budget decoded elements each."""
    step = max(1, budget // max(elements_per_sample, 1))
    return [min(step, samples - start) for start in range(0, samples, step)]


class GMVAE(VAE):
    """Gaussian-mixture VAE (scVAE): q(y|x) q(z|x,y), p(z|y) learned Gaussians, p(y) uniform or learned.

    The ELBO sums over all K values of y exactly, weighted by q(y|x) (no sampling of y):
      ELBO = sum_y q(y|x) [E_q(z|x,y) log p(x|z) - KL(q(z|x,y) || p(z|y))] - KL(q(y|x) || p(y)).
    A learned p(y) is maximised by the mean of q(y|x) over the cells (the M-step of a mixture's weights).
    """

    def _build_encoder(self) -> MLP:
        """q(y|x), and the MLP of q(z|x,y) on [x, onehot(y)], whose first linear layer is split so that x is
        multiplied once: that layer is z_first (+ z_first_rest), the rest is returned. With a batch-conditioned
        encoder, x is [x, onehot(b)] in both."""
        cfg, K = self.cfg, self.cfg.components
        n_in = cfg.n_features + self._encoder_batches(cfg)  # x, and the one-hot batch when the encoders see it
        self.y_encoder = MLP(n_in, cfg.encoder, cfg.batch_norm, cfg.dropout)
        self.y_logits = nn.Linear(self.y_encoder.n_out, K)
        self.z_first = nn.Linear(n_in + K, cfg.encoder[0])
        rest: list[nn.Module] = []
        if cfg.batch_norm:
            rest.append(nn.BatchNorm1d(cfg.encoder[0]))
        rest.append(nn.ReLU())
        if cfg.dropout > 0:
            rest.append(nn.Dropout(cfg.dropout))
        self.z_first_rest = nn.Sequential(*rest)
        return MLP(cfg.encoder[0], cfg.encoder[1:], cfg.batch_norm, cfg.dropout)

    def _build_prior(self) -> None:
        """p(z|y): on a one-hot input an MLP is a lookup table of per-component means and log-variances (one
        log-variance row for all components when prior_z_variance is "shared")."""
        K, L = self.cfg.components, self.cfg.latent
        self.prior_mu = nn.Parameter(torch.randn(K, L))
        self.prior_logvar = nn.Parameter(torch.zeros(K if self.cfg.prior_z_variance == "component" else 1, L))
        if self.cfg.prior_y == "learned":  # mixture weights p(y) = softmax(logits), learned with the rest
            self.prior_y_logits = nn.Parameter(torch.zeros(K))

    def log_prior_y(self, uniform: bool = False) -> Tensor:
        """log p(y), shape (K,): the learned mixture weights, or uniform (by configuration, or when asked)."""
        K = self.cfg.components
        if self.cfg.prior_y == "learned" and not uniform:
            return torch.log_softmax(self.prior_y_logits.float(), dim=-1)
        return torch.full((K,), -math.log(K), device=self.prior_mu.device)

    def pretraining(self, epoch: int, pretrain_epochs: int) -> bool:
        """The first pretrain_epochs epochs train as a plain VAE (q(y|x) uniform, p(z|y) = N(0, I))."""
        return epoch < pretrain_epochs

    def initialise_after_pretraining(self, epoch: int, pretrain_epochs: int) -> bool:
        """p(z|y) (and p(y)) are set from the pre-trained latent before the first epoch after pre-training."""
        return pretrain_epochs > 0 and epoch == pretrain_epochs

    def y_log_probs(self, x: Tensor, batch: Tensor | None = None) -> Tensor:
        """log q(y|x), shape (cells, K)."""
        return torch.log_softmax(_float32(self.y_logits(self.y_encoder(self._input(x, batch)))), dim=-1)

    def responsibilities(self, x: Tensor, batch: Tensor | None = None) -> Tensor:
        """q(y|x), shape (cells, K)."""
        return self.y_log_probs(x, batch).exp()

    def component_elbos(self, x: Tensor, batch: Tensor | None = None) -> Tensor:
        """log p(y) + ELBO of each cell given each component y, shape (cells, K): log p(x|z) at the mean of
        q(z|x,y) (a plug-in for its expectation) - KL(q(z|x,y) || p(z|y)) + log p(y).

        For fixed q(z|x,y), the q(y|x) that maximises the ELBO is softmax over y of these (the ELBO's y sum is
        a KL to it: ELBO = log sum_y exp(.) - KL(q(y|x) || q*(y|x))); the encoder's q(y|x) approximates it.
        """
        mu, logvar = self.encode_z(x, batch)
        p_mu, p_logvar = self._prior()
        return (self.log_prior_y() + self._log_px_per_component(x, mu, batch=batch)
                - gaussian_kl(mu, logvar, p_mu[None], p_logvar[None]))

    def cluster_probabilities(self, x: Tensor, batch: Tensor | None = None, posterior: str | None = None) -> Tensor:
        """Each cell's probability of each component, shape (cells, K): the ELBO-optimal q*(y|x)
        (component_elbos; posterior "elbo") or the encoder's q(y|x) ("encoder"); None: cfg.cluster_posterior."""
        posterior = posterior or self.cfg.cluster_posterior
        if posterior not in CLUSTER_POSTERIORS:
            raise ValueError(f"unknown posterior {posterior!r} (choose from {', '.join(CLUSTER_POSTERIORS)})")
        if posterior == "encoder":
            return self.responsibilities(x, batch)
        return torch.softmax(self.component_elbos(x, batch), dim=-1)

    def encode_z(self, x: Tensor, batch: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x,y) for every y, shape (cells, K, L)."""
        n, K = x.shape[0], self.cfg.components
        w = self.z_first.weight
        n_in = self.cfg.n_features + self._encoder_batches(self.cfg)
        h = F.linear(self._input(x, batch), w[:, :n_in], self.z_first.bias)
        h = (h[:, None, :] + w[:, n_in:].T[None, :, :]).reshape(n * K, -1)
        h = self.encoder(self.z_first_rest(h))
        mu = _float32(self.z_mu(h)).reshape(n, K, -1)
        logvar = _float32(self.z_logvar(h)).reshape(n, K, -1).clamp(*LOG_VAR_BOUNDS)
        return mu, logvar

    def latent(self, x: Tensor, batch: Tensor | None = None) -> Tensor:
        """Latent representation: E_q(y|x)[mean of q(z|x,y)]."""
        mu, _ = self.encode_z(x, batch)
        return (self.responsibilities(x, batch)[:, :, None] * mu).sum(1)

    def sample_z(self, x: Tensor, batch: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """One draw per cell of y ~ q(y|x), then z ~ q(z|x,y)."""
        mu, logvar = self.encode_z(x, batch)
        y = torch.multinomial(self.responsibilities(x, batch), 1, generator=generator)[:, 0]
        rows = torch.arange(len(y), device=y.device)
        mu, logvar = mu[rows, y], logvar[rows, y]
        return mu + _normal(mu, generator) * (0.5 * logvar).exp()

    def _prior(self) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of each p(z|y), shape (K, L) both."""
        return self.prior_mu, self.prior_logvar.clamp(*LOG_VAR_BOUNDS).expand_as(self.prior_mu)

    def _log_px_per_component(self, x: Tensor, z: Tensor, counts: Tensor | None = None,
                              batch: Tensor | None = None) -> Tensor:
        """log p(x|z_k) for z of shape (cells, K, L); returns (cells, K). counts: x as sparse CSR, optional."""
        n, K, L = z.shape
        # decoded component-major (row k * n + i), so that the counts are K stacked copies of the minibatch
        log_library = _log_library(x).repeat(K, 1) if self.cfg.library_size else None
        params = self.decoder(z.transpose(0, 1).reshape(K * n, L), log_library,
                              None if batch is None else batch.repeat(K))
        counts = tile_rows(x if counts is None else counts, K)
        return log_px(self.cfg.likelihood, counts, params, self.zero_part).reshape(K, n).T

    def forward(self, x: Tensor, kl_weight: float = 1.0, labels: Tensor | None = None,
                pretrain: bool = False, counts: Tensor | None = None, batch: Tensor | None = None) -> dict[str, Tensor]:
        """ELBO terms per cell, and the minibatch loss (negative ELBO per cell, KL weighted).

        pretrain=True trains it as a plain VAE: q(y|x) held uniform and p(z|y) = N(0, I) for every y.
        counts: x as a sparse CSR tensor for the sparse-aware likelihood (as in VAE.forward); batch: as there.
        """
        K = self.cfg.components
        log_qy = self.y_log_probs(x, batch)
        if pretrain:
            log_qy = torch.full_like(log_qy, -math.log(K))
        qy = log_qy.exp()
        mu, logvar = self.encode_z(x, batch)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        log_px_k = self._log_px_per_component(x, z, counts, batch)      # (cells, K)
        p_mu, p_logvar = self._prior()
        if pretrain:
            p_mu, p_logvar = torch.zeros_like(p_mu), torch.zeros_like(p_logvar)
        kl_zk = gaussian_kl(mu, logvar, p_mu[None], p_logvar[None])     # (cells, K)
        log_lik = (qy * log_px_k).sum(-1)
        kl_z = (qy * kl_zk).sum(-1)
        log_py = self.log_prior_y(uniform=pretrain)
        kl_y = (qy * (log_qy - log_py)).sum(-1)                         # KL(q(y|x) || p(y))
        elbo = log_lik - kl_z - kl_y
        reg = "none" if pretrain else self.cfg.y_regularisation
        if reg == "kl":
            y_term = kl_y.clamp_min(self.cfg.free_nats) if self.cfg.free_nats > 0 else kl_y
            y_term = kl_weight * y_term
        elif reg == "none":
            y_term = torch.zeros_like(kl_y)
        elif labels is None and not self.training:
            y_term = torch.zeros_like(kl_y)  # evaluation without labels: the ELBO terms need none
        else:
            if labels is None:
                raise ValueError("y_regularisation='supervised' needs labels")
            y_term = F.nll_loss(log_qy, labels, reduction="none")
        loss = -(log_lik - kl_weight * kl_z - y_term).mean()
        return {"elbo": elbo, "log_lik": log_lik, "kl_z": kl_z, "kl_y": kl_y, "loss": loss,
                "params": None, "qy": qy}

    def iw_log_likelihood(self, x: Tensor, samples: int, counts: Tensor | None = None,
                          batch: Tensor | None = None) -> Tensor:
        """Importance-weighted log p(x): y summed exactly, z drawn from q(z|x,y) `samples` times per y."""
        mu, logvar = self.encode_z(x, batch)
        p_mu, p_logvar = self._prior()
        K = self.cfg.components
        log_py = self.log_prior_y()
        terms = []
        for s in _sample_chunks(samples, K * x.shape[0] * x.shape[1]):
            for _ in range(s):
                z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
                # p(x) = sum_y E_q(z|x,y)[p(x|z) p(z|y) p(y) / q(z|x,y)]: y enumerated, not sampled
                terms.append(self._log_px_per_component(x, z, counts, batch)
                             + gaussian_log_prob(z, p_mu[None], p_logvar[None])
                             + log_py - gaussian_log_prob(z, mu, logvar))
        return torch.logsumexp(torch.cat(terms, dim=-1), dim=-1) - math.log(samples)


def build_model(config: ModelConfig | dict) -> VAE:
    """A VAE or GMVAE for the given configuration."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    return GMVAE(cfg) if cfg.model == "gmvae" else VAE(cfg)
