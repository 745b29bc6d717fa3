"""Count log-likelihoods in log space: Poisson, NB, ZIP, ZINB.

One implementation, used by training and evaluation alike.  Every parameter
arrives in log / logit space (docs/models.md): ``log_mean`` (all four), ``log_theta``
(NB inverse dispersion; per gene ``[genes]`` or per cell and gene) and
``logit_pi`` (zero-inflation probability).  No probability is formed and
exponentiated back: log p is built from softplus / logaddexp / lgamma terms.

Every log-pmf is written as ``log p(0) + delta(x)`` with ``delta(0) == 0`` exactly,
so that a sparse count matrix needs ``log p(0)`` densely but ``delta`` only at its
non-zero entries (``log_prob_cells``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .config import LIKELIHOODS

# Names of the decoder outputs each likelihood needs ("log_theta" may instead be a per-gene parameter).
PARAMETERS: dict[str, tuple[str, ...]] = {
    "poisson": ("log_mean",),
    "nb": ("log_mean", "log_theta"),
    "zip": ("log_mean", "logit_pi"),
    "zinb": ("log_mean", "log_theta", "logit_pi"),
}


def _softplus(t: Tensor) -> Tensor:
    """log(1 + exp(t)), switching to the identity only where exp(-t) is below the dtype's precision."""
    # torch's default threshold (20) drops exp(-20) ~ 2e-9: fine for float32, too early for float64.
    return F.softplus(t, threshold=40.0 if t.dtype == torch.float64 else 20.0)


# ---- log p(0) and delta(x) = log p(x) - log p(0) of the base distributions ----


def _poisson_log_p0(log_mean: Tensor) -> Tensor:
    """log Poisson(0 | mu) = -mu."""
    return -torch.exp(log_mean)


def _poisson_delta(x: Tensor, log_mean: Tensor) -> Tensor:
    """log Poisson(x | mu) - log Poisson(0 | mu) = x log mu - log x!."""
    return x * log_mean - torch.lgamma(x + 1)


def _nb_log_p0(log_mean: Tensor, log_theta: Tensor) -> Tensor:
    """log NB(0 | mu, theta) = theta log(theta / (theta + mu)) = -theta softplus(log mu - log theta)."""
    return -torch.exp(log_theta) * _softplus(log_mean - log_theta)


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64, except on Apple MPS, which has none: for sums of large lgamma terms and of per-cell terms."""
    return torch.float32 if device.type == "mps" else torch.float64


def _wide(t: Tensor) -> Tensor:
    """t in float64 (unless on Apple MPS, which has no float64), for sums of large lgamma terms."""
    return t.to(wide_dtype(t.device))


def _lgamma_theta(log_theta: Tensor) -> Tensor:
    """log Gamma(theta), in float64."""
    return torch.lgamma(torch.exp(_wide(log_theta)))


def _lgamma_ratio(x: Tensor, log_theta: Tensor, lgamma_theta: Tensor | None = None) -> Tensor:
    """log Gamma(x + theta) - log Gamma(theta), evaluated in float64 whatever the input dtype."""
    # The difference is ~ x log theta, but each lgamma is ~ theta log theta: in float32 their rounding
    # (~1e-7 theta log theta, i.e. ~1 at theta = 1e6) would not cancel. One float64 pass costs little.
    if lgamma_theta is None:
        lgamma_theta = _lgamma_theta(log_theta)
    theta = torch.exp(_wide(log_theta))
    return (torch.lgamma(_wide(x) + theta) - lgamma_theta).to(log_theta.dtype)


def _nb_delta(
    x: Tensor, log_mean: Tensor, log_theta: Tensor, lgamma_theta: Tensor | None = None
) -> Tensor:
    """log NB(x) - log NB(0) = log Gamma(x+theta) - log Gamma(theta) - log x! + x log(mu / (theta + mu))."""
    # log(mu / (theta + mu)) = -softplus(log theta - log mu); the lgamma ratio is exactly 0 at x = 0.
    return (
        _lgamma_ratio(x, log_theta, lgamma_theta)
        - torch.lgamma(x + 1)
        - x * _softplus(log_theta - log_mean)
    )


# ---- element-wise log-pmfs ----


def poisson_log_prob(x: Tensor, log_mean: Tensor) -> Tensor:
    """Element-wise log Poisson(x | exp(log_mean))."""
    return _poisson_log_p0(log_mean) + _poisson_delta(x, log_mean)


def nb_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor) -> Tensor:
    """Element-wise log NB(x | mean exp(log_mean), inverse dispersion exp(log_theta))."""
    return _nb_log_p0(log_mean, log_theta) + _nb_delta(x, log_mean, log_theta)


def _zero_inflate(x: Tensor, base_log_p0: Tensor, base_delta: Tensor, logit_pi: Tensor) -> Tensor:
    """Element-wise log of pi * [x = 0] + (1 - pi) * p(x), given the base log p(0) and delta(x)."""
    log_pi = -_softplus(-logit_pi)  # log sigmoid(logit_pi)
    log_1m_pi = -_softplus(logit_pi)  # log (1 - sigmoid(logit_pi))
    zero = torch.logaddexp(log_pi, log_1m_pi + base_log_p0)
    nonzero = log_1m_pi + base_log_p0 + base_delta
    return torch.where(x == 0, zero, nonzero)


def zip_log_prob(x: Tensor, log_mean: Tensor, logit_pi: Tensor) -> Tensor:
    """Element-wise log zero-inflated Poisson; pi = sigmoid(logit_pi) is the extra-zero probability."""
    return _zero_inflate(x, _poisson_log_p0(log_mean), _poisson_delta(x, log_mean), logit_pi)


def zinb_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor, logit_pi: Tensor) -> Tensor:
    """Element-wise log zero-inflated NB."""
    return _zero_inflate(
        x, _nb_log_p0(log_mean, log_theta), _nb_delta(x, log_mean, log_theta), logit_pi
    )


_LOG_PROB: dict[str, Callable[..., Tensor]] = {
    "poisson": poisson_log_prob,
    "nb": nb_log_prob,
    "zip": zip_log_prob,
    "zinb": zinb_log_prob,
}


def _check_likelihood(likelihood: str, params: dict[str, Tensor]) -> list[Tensor]:
    """Validate the likelihood name and return its parameters in PARAMETERS order."""
    if likelihood not in PARAMETERS:
        raise ValueError(
            f"unknown likelihood {likelihood!r}; choose one of: {', '.join(LIKELIHOODS)}"
        )
    missing = [name for name in PARAMETERS[likelihood] if name not in params]
    if missing:
        raise ValueError(
            f"likelihood {likelihood!r} needs parameters {', '.join(PARAMETERS[likelihood])}; "
            f"missing: {', '.join(missing)}"
        )
    return [params[name] for name in PARAMETERS[likelihood]]


def log_prob(likelihood: str, x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Element-wise log p(x) for the named likelihood; params keyed as in PARAMETERS."""
    args = _check_likelihood(likelihood, params)
    return _LOG_PROB[likelihood](x.to(args[0].dtype), *args)


def mean(likelihood: str, params: dict[str, Tensor]) -> Tensor:
    """Expected count E[x] under the named likelihood."""
    args = _check_likelihood(likelihood, params)
    log_mean = args[0]
    if likelihood in ("zip", "zinb"):
        # E[x] = (1 - pi) mu, with log(1 - pi) = -softplus(logit_pi).
        return torch.exp(log_mean - _softplus(params["logit_pi"]))
    return torch.exp(log_mean)


def sample(likelihood: str, params: dict[str, Tensor]) -> Tensor:
    """Counts drawn from the named likelihood (torch's global RNG), one per element of its parameters.

    NB is drawn as its gamma-Poisson mixture: rate ~ Gamma(shape theta, rate theta / mu), x ~ Poisson(rate).
    The zero-inflated ones set each draw to 0 with probability pi = sigmoid(logit_pi). Float tensor of counts.
    """
    args = _check_likelihood(likelihood, params)
    log_mean = args[0].float()
    if likelihood in ("nb", "zinb"):
        log_theta = args[1].float().expand_as(log_mean)
        rate = torch.distributions.Gamma(log_theta.exp(), (log_theta - log_mean).exp()).sample()
    else:
        rate = log_mean.exp()
    x = torch.poisson(rate)
    if likelihood in ("zip", "zinb"):
        pi = torch.sigmoid(params["logit_pi"].float()).expand_as(x)
        x = torch.where(torch.rand_like(x) < pi, torch.zeros_like(x), x)
    return x


# ---- per-cell sums, sparse-aware ----
# sum_g log p(x_g) = sum_g log p(0) + sum_{g: x_g > 0} [log p(x_g) - log p(0)]: the first sum is dense
# but cheap (no lgamma), the second is evaluated only at the stored entries of a sparse minibatch.


def _log_p0(likelihood: str, args: list[Tensor]) -> Tensor:
    """Element-wise log p(0) for the named likelihood, broadcast over its parameters."""
    if likelihood == "poisson":
        return _poisson_log_p0(args[0])
    if likelihood == "nb":
        return _nb_log_p0(args[0], args[1])
    logit_pi = args[-1]
    base = _poisson_log_p0(args[0]) if likelihood == "zip" else _nb_log_p0(args[0], args[1])
    return torch.logaddexp(-_softplus(-logit_pi), -_softplus(logit_pi) + base)


def _nonzero_correction(
    likelihood: str, x: Tensor, args: list[Tensor], lgamma_theta: Tensor | None = None
) -> Tensor:
    """log p(x) - log p(0) at entries x, given the parameters (and log Gamma(theta)) at those entries."""
    if likelihood == "poisson":
        return _poisson_delta(x, args[0])
    if likelihood == "nb":
        return _nb_delta(x, args[0], args[1], lgamma_theta)
    logit_pi = args[-1]
    if likelihood == "zip":
        base_p0, base_delta = _poisson_log_p0(args[0]), _poisson_delta(x, args[0])
    else:
        base_p0 = _nb_log_p0(args[0], args[1])
        base_delta = _nb_delta(x, args[0], args[1], lgamma_theta)
    # For x > 0: log p(x) - log p(0) = log[(1-pi) p(x)] - log[pi + (1-pi) p(0)]
    #   = delta(x) - log(1 + pi / ((1-pi) p(0))) = delta(x) - softplus(logit_pi - log p(0)).
    correction = base_delta - _softplus(logit_pi - base_p0)
    return torch.where(x == 0, torch.zeros_like(correction), correction)  # explicitly stored zeros


# Stored counts up to this value take log Gamma(x + theta) - log Gamma(theta) - log x! and its derivative from
# per-gene tables (97% of the stored counts of the MB-20k-shaped simulation, 77% are 1: benchmarks/bench_train.py
# prints the share for its data); larger ones from lgamma.
TABLE_COUNTS = 4


def _count_tables(log_theta: Tensor, grads: bool) -> tuple[Tensor, Tensor | None]:
    """Per gene, for x = 0..TABLE_COUNTS: log Gamma(x + theta) - log Gamma(theta) - log x! and, when grads,
    theta (digamma(x + theta) - digamma(theta)); flattened (gene-major), in float64.

    By the recurrence Gamma(t + 1) = t Gamma(t): the first is sum_{j < x} log((theta + j) / (j + 1)), the
    second theta sum_{j < x} 1 / (theta + j). Exact sums, no cancellation of large lgamma values.
    """
    theta = torch.exp(_wide(log_theta)).reshape(-1, 1)
    j = torch.arange(TABLE_COUNTS, dtype=theta.dtype, device=theta.device)
    shifted = theta + j
    zero = torch.zeros_like(theta)
    ratio = torch.cat([zero, torch.log(shifted / (j + 1)).cumsum(1)], 1).reshape(-1)
    slope = torch.cat([zero, (theta / shifted).cumsum(1)], 1).reshape(-1) if grads else None
    return ratio, slope


def _lgamma_ratio_terms(
    x: Tensor, cols: Tensor, log_theta_genes: Tensor, lt: Tensor, grads: bool, subset: bool
) -> tuple[Tensor, Tensor | None]:
    """At stored counts x of genes cols (theta per gene): log Gamma(x + theta) - log Gamma(theta) - log x! and,
    when grads, its derivative w.r.t. log theta, theta (digamma(x + theta) - digamma(theta)); in x's dtype."""
    ratio_table, slope_table = _count_tables(log_theta_genes, grads)
    index = cols * (TABLE_COUNTS + 1) + x.clamp(max=TABLE_COUNTS).long()
    ratio = torch.take(ratio_table, index)
    slope = torch.take(slope_table, index) if grads else None
    # Beyond the table: the step from TABLE_COUNTS to x by lgamma / digamma, in float64. On the CPU only at
    # those entries; on a GPU at all of them, masked (picking them out would wait for the device).
    big = torch.nonzero(x > TABLE_COUNTS).squeeze(1) if subset else None
    if big is None or big.numel():
        xb, theta = _wide(x if big is None else x[big]), torch.exp(_wide(lt if big is None else lt[big]))
        top = theta + TABLE_COUNTS
        step = torch.lgamma(xb + theta) - torch.lgamma(top) - (torch.lgamma(xb + 1) - math.lgamma(TABLE_COUNTS + 1))
        slope_step = theta * (torch.digamma(xb + theta) - torch.digamma(top)) if grads else None
        if big is None:
            beyond = xb > TABLE_COUNTS
            ratio = ratio + torch.where(beyond, step, 0.0)
            slope = slope + torch.where(beyond, slope_step, 0.0) if grads else None
        else:
            ratio[big] += step
            if grads:
                slope[big] += slope_step
    return ratio.to(x.dtype), None if slope is None else slope.to(x.dtype)


def dense_zero_part(
    likelihood: str, log_mean: Tensor, log_theta: Tensor | None, logit_pi: Tensor | None, grads: bool
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The x = 0 part of the per-cell log p(x), sum_g log p(0), and its element-wise derivatives.

    Returns (per-cell sum, d/dlog mu, d/dlogit pi, the theta-gradient factor sp, theta); the derivatives
    are None unless grads, except Poisson's, which is returned as -d/dlog mu = mu (a pass fewer). Pure
    element-wise work over cells x genes: what `torch.compile` can fuse (training's `compile` option passes
    the compiled function to `log_prob_cells`).
    """
    # s = log p_base(0), d_mean = ds/dlog mu
    theta = sp = d_mean = d_logit = None
    if likelihood == "poisson":  # log Poisson(0) = -mu = ds/dlog mu: returned as mu, negated (flag) on use
        mu = torch.exp(log_mean)
        return mu.sum(-1).neg_(), mu, None, None, None
    if likelihood == "zip":
        s = torch.exp(log_mean).neg_()  # log Poisson(0) = -mu = ds/dlog mu
    else:
        # NB: s = -theta softplus(t), t = log mu - log theta; ds/dlog mu = -theta sigmoid(t),
        # ds/dlog theta = theta (sigmoid(t) - softplus(t)).
        theta = torch.exp(log_theta)
        t = log_mean - log_theta
        sp = _softplus(t)
        d_mean = t.sigmoid_().mul_(theta.neg()) if grads else None
    if likelihood == "nb":  # sum_g -theta softplus(t): a matrix-vector product when theta is per gene
        zero_sum = (sp @ theta if theta.dim() == 1 else (sp * theta).sum(-1)).neg_()
    else:
        # Zero-inflated: r = log(pi + (1 - pi) e^s) = logaddexp(a, s) - softplus(a), a = logit pi.
        #   dr/ds = w := e^s / (e^a + e^s),   dr/da = sigmoid(a - s) - sigmoid(a) = (1 - pi) - w.
        if likelihood == "zinb":
            s = sp * theta.neg()
        spa = _softplus(logit_pi)
        lse = torch.logaddexp(logit_pi, s)
        zero_sum = lse.sum(-1) - spa.sum(-1)
        if grads:
            w = torch.sub(s, lse, out=lse).exp_()
            d_logit = spa.neg_().exp_().sub_(w)  # 1 - pi = exp(-softplus(a))
            if likelihood == "zip":
                d_mean = s.mul_(w)
            else:
                d_mean.mul_(w)
                sp.mul_(w)  # dr/dlog theta = w theta (sigmoid(t) - softplus(t)) = -d_mean - theta w sp
    return zero_sum, d_mean, d_logit, sp, theta


class _SparseLogProb(torch.autograd.Function):
    """Per-cell log p(x) for a sparse minibatch and the decoder's parameter shapes, in one autograd node.

    log p(x) = sum_g log p(0) + sum over stored entries of c(x) = log p(x) - log p(0). The forward pass
    computes the element-wise derivatives of both parts in closed form while their pieces are at hand, so
    the backward pass only scales them by the per-cell gradient and adds the entries' part in place: no
    transcendental is evaluated twice and autograd keeps no graph of small per-entry operations.
    """

    @staticmethod
    def forward(
        ctx,
        likelihood: str,
        offsets: Tensor,
        rows: Tensor,
        cols: Tensor,
        values: Tensor,
        log_mean: Tensor,
        log_theta: Tensor | None,
        logit_pi: Tensor | None,
        zero_part: Callable | None = None,
    ) -> Tensor:
        # Contiguous inputs make every cells x genes temporary (and so every gradient) contiguous too,
        # so that the in-place index_add_ through .view(-1) in backward is valid.
        log_mean = log_mean.contiguous()
        log_theta = None if log_theta is None else log_theta.contiguous()
        logit_pi = None if logit_pi is None else logit_pi.contiguous()
        grads = any(ctx.needs_input_grad[5:])
        on_cpu = log_mean.device.type == "cpu"
        flat = rows * log_mean.shape[1] + cols
        theta_per_entry = log_theta is not None and log_theta.shape == log_mean.shape
        theta_index = flat if theta_per_entry else cols

        zero_sum, d_mean, d_logit, sp, theta = (zero_part or dense_zero_part)(
            likelihood, log_mean, log_theta, logit_pi, grads)

        # ---- stored entries: c(x) = log p(x) - log p(0) and its derivatives e_mean, e_theta, e_logit ----
        x = values.to(log_mean.dtype)
        lm = torch.take(log_mean, flat)
        e_mean = e_theta = e_logit = None
        if likelihood in ("poisson", "zip"):
            c = x * lm - torch.lgamma(x + 1)
            e_mean = x
            base_p0 = None
        else:
            lt = torch.take(log_theta, theta_index)
            if theta_per_entry:
                ratio = _lgamma_ratio(x, lt) - torch.lgamma(x + 1)
                theta_wide = torch.exp(_wide(lt))  # d/dlog theta: theta (digamma(x + theta) - digamma(theta))
                slope = ((torch.digamma(_wide(x) + theta_wide) - torch.digamma(theta_wide)) * theta_wide).to(x.dtype) \
                    if grads else None
            else:
                ratio, slope = _lgamma_ratio_terms(x, cols, log_theta, lt, grads, on_cpu)
            u = lt - lm  # log(theta / mu): x log(mu / (theta + mu)) = -x softplus(u)
            c = ratio - x * _softplus(u)
            if grads:
                e_mean = x * torch.sigmoid(u)
                e_theta = slope - e_mean
            if likelihood == "zinb":
                theta_e = torch.exp(lt)
                sp_t = _softplus(-u)  # not softplus(u) - u: that cancels catastrophically for theta >> mu
                base_p0 = -theta_e * sp_t
        if likelihood in ("zip", "zinb"):
            # For x > 0: c = c_base - softplus(v), v = logit pi - log p_base(0)
            #   (log[(1-pi) p(x)] - log[pi + (1-pi) p(0)] = c_base - log(1 + pi / ((1-pi) p_base(0)))).
            if likelihood == "zip":
                mu = torch.exp(lm)
                base_p0 = -mu
            v = torch.take(logit_pi, flat) - base_p0
            c = c - _softplus(v)
            if grads:
                sig_v = torch.sigmoid(v)
                e_logit = -sig_v
                if likelihood == "zip":
                    e_mean = x - sig_v * mu  # dlog p_base(0)/dlog mu = -mu
                else:
                    # dlog p_base(0)/dlog mu = -theta sigmoid(t), /dlog theta = theta (sigmoid(t) - softplus(t))
                    sig_t = torch.sigmoid(-u)  # not 1 - sigmoid(u), which cancels for theta >> mu
                    e_mean = e_mean - sig_v * theta_e * sig_t
                    e_theta = e_theta + sig_v * theta_e * (sig_t - sp_t)
        stored_zero = x == 0  # explicitly stored zeros contribute nothing (checked first on the CPU only:
        if not on_cpu or bool(stored_zero.any()):  # on a GPU the check would wait for the device)
            keep = (~stored_zero).to(x.dtype)
            c = c * keep
            e_mean, e_theta, e_logit = (None if e is None else e * keep for e in (e_mean, e_theta, e_logit))
        # Per-row sums straight from the CSR offsets (deterministic, also on CUDA).
        total = zero_sum + torch.segment_reduce(c, "sum", offsets=offsets)
        if grads:
            ctx.theta_per_entry = theta_per_entry
            ctx.mean_negated = likelihood == "poisson"  # dense_zero_part returned mu for d/dlog mu = -mu
            ctx.save_for_backward(rows, flat, theta_index, d_mean, d_logit, sp, theta, e_mean, e_theta, e_logit)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, flat, theta_index, d_mean, d_logit, sp, theta, e_mean, e_theta, e_logit = ctx.saved_tensors
        g, g_entry = grad[:, None], grad.index_select(0, rows)
        grad_log_theta = grad_logit = None
        if theta is not None:
            if ctx.theta_per_entry:
                grad_log_theta = torch.mul(sp, theta).add_(d_mean).neg_().mul_(g)
            else:
                grad_log_theta = (grad @ sp).mul_(theta.reshape(-1)).add_(grad @ d_mean).neg_()
                grad_log_theta = grad_log_theta.reshape(theta.shape)
            grad_log_theta.view(-1).index_add_(0, theta_index, e_theta * g_entry)
        # put_ with accumulate: index_add_'s result at distinct indices
        grad_log_mean = torch.mul(d_mean, g.neg() if ctx.mean_negated else g)
        grad_log_mean.view(-1).put_(flat, e_mean * g_entry, accumulate=True)
        if d_logit is not None:
            grad_logit = d_logit * g
            grad_logit.view(-1).put_(flat, e_logit * g_entry, accumulate=True)
        return None, None, None, None, None, grad_log_mean, grad_log_theta, grad_logit, None


def _broadcasts_to(small: torch.Size, shape: torch.Size) -> bool:
    """Whether a tensor of shape small broadcasts to exactly shape."""
    if len(small) > len(shape):
        return False
    return all(a in (1, b) for a, b in zip(reversed(small), reversed(shape)))


def _gather(p: Tensor, rows: Tensor, cols: Tensor, shape: torch.Size) -> Tensor:
    """Values of p broadcast to shape (cells, genes), taken at the (rows, cols) entries."""
    while p.dim() < 2:
        p = p.unsqueeze(0)
    if p.shape[0] == 1 and p.shape[1] == 1:
        return p[0, 0].expand(rows.shape[0])
    if p.shape[0] == 1:  # per gene
        return p[0].index_select(0, cols)
    if p.shape[1] == 1:  # per cell
        return p[:, 0].index_select(0, rows)
    return p.reshape(-1).index_select(0, rows * shape[1] + cols)


def sparse_entries(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row offsets, rows, cols, values) of the stored entries of a 2-D sparse CSR or COO tensor."""
    if x.layout == torch.sparse_csr:
        offsets = x.crow_indices().long()
        cols = x.col_indices().long()
        values = x.values()
        rows = torch.repeat_interleave(  # output_size given: no device synchronisation on GPU
            torch.arange(x.shape[0], device=x.device), offsets.diff(), output_size=values.shape[0]
        )
    elif x.layout == torch.sparse_coo:
        x = x.coalesce()  # sorted by row, then column; duplicates summed
        rows, cols = x.indices()
        values = x.values()
        counts = torch.bincount(rows, minlength=x.shape[0])
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    else:
        raise ValueError(f"unsupported sparse layout {x.layout}; use a CSR or COO tensor")
    return offsets, rows, cols, values


def log_prob_cells(
    likelihood: str, x: Tensor, params: dict[str, Tensor], zero_part: Callable | None = None
) -> Tensor:
    """Per-cell log p(x) (sum over genes); x dense (cells x genes) or a torch sparse CSR tensor.

    For sparse x this is sparse-aware: the x=0 log-probability is summed densely and a correction is
    evaluated only at the non-zero entries. Same values and gradients as the dense sum.
    Sparse COO tensors are accepted too. zero_part: a compiled `dense_zero_part` to use instead of it.
    """
    args = _check_likelihood(likelihood, params)
    if x.dim() != 2:
        raise ValueError(f"counts must be 2-D (cells x genes), got shape {tuple(x.shape)}")
    shape = x.shape
    named = dict(zip(PARAMETERS[likelihood], args))
    for name, a in named.items():
        if not _broadcasts_to(a.shape, shape):
            raise ValueError(f"{name} of shape {tuple(a.shape)} does not broadcast to counts {tuple(shape)}")
    if x.layout == torch.strided:
        return _LOG_PROB[likelihood](x.to(args[0].dtype), *args).sum(-1)

    offsets, rows, cols, values = sparse_entries(x)
    log_theta = named.get("log_theta")
    theta_per_gene = log_theta is not None and log_theta.shape in ((shape[1],), (1, shape[1]))
    fused = all(a.shape == shape for name, a in named.items() if name != "log_theta") and (
        log_theta is None or theta_per_gene or log_theta.shape == shape
    )
    if fused:  # the decoder's shapes
        return _SparseLogProb.apply(
            likelihood, offsets, rows, cols, values, named["log_mean"], log_theta, named.get("logit_pi"),
            zero_part,
        )
    zero_sum = torch.broadcast_to(_log_p0(likelihood, args), shape).sum(-1)
    taken = [_gather(a, rows, cols, shape) for a in args]
    # log Gamma(theta) once per gene rather than once per stored entry.
    lgamma_theta = _lgamma_theta(log_theta).reshape(-1).index_select(0, cols) if theta_per_gene else None
    correction = _nonzero_correction(likelihood, values.to(args[0].dtype), taken, lgamma_theta)
    # Per-row sums of the correction straight from the CSR offsets (deterministic, also on CUDA).
    return zero_sum + torch.segment_reduce(correction, "sum", offsets=offsets)
