"""Count log-likelihoods in log space: Poisson, NB, ZIP, ZINB.

One implementation, used by training and evaluation alike.  Every parameter
arrives in log / logit space (DESIGN.md): Poisson ``log_rate``; NB ``log_mean``
and ``log_theta`` (inverse dispersion); zero inflation ``logit_pi``.
"""

from __future__ import annotations

import torch
from torch import Tensor

LIKELIHOODS: tuple[str, ...] = ("poisson", "nb", "zip", "zinb")

# Names of the decoder outputs each likelihood needs ("log_theta" may instead be a per-gene parameter).
PARAMETERS: dict[str, tuple[str, ...]] = {
    "poisson": ("log_mean",),
    "nb": ("log_mean", "log_theta"),
    "zip": ("log_mean", "logit_pi"),
    "zinb": ("log_mean", "log_theta", "logit_pi"),
}


def poisson_log_prob(x: Tensor, log_mean: Tensor) -> Tensor:
    """Element-wise log Poisson(x | exp(log_mean))."""
    raise NotImplementedError


def nb_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor) -> Tensor:
    """Element-wise log NB(x | mean exp(log_mean), inverse dispersion exp(log_theta))."""
    raise NotImplementedError


def zip_log_prob(x: Tensor, log_mean: Tensor, logit_pi: Tensor) -> Tensor:
    """Element-wise log zero-inflated Poisson; pi = sigmoid(logit_pi) is the extra-zero probability."""
    raise NotImplementedError


def zinb_log_prob(x: Tensor, log_mean: Tensor, log_theta: Tensor, logit_pi: Tensor) -> Tensor:
    """Element-wise log zero-inflated NB."""
    raise NotImplementedError


def log_prob(likelihood: str, x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Element-wise log p(x) for the named likelihood; params keyed as in PARAMETERS."""
    raise NotImplementedError


def mean(likelihood: str, params: dict[str, Tensor]) -> Tensor:
    """Expected count E[x] under the named likelihood."""
    raise NotImplementedError


def log_prob_cells(likelihood: str, x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Per-cell log p(x) (sum over genes); x dense (cells x genes) or a torch sparse CSR tensor.

    For sparse x this is sparse-aware: the x=0 log-probability is summed densely and a correction is
    evaluated only at the non-zero entries. Same values and gradients as the dense sum.
    """
    raise NotImplementedError
