"""Synthetic count data sets: the review's Poisson check data, its GMVAE mixture, and single-cell-like counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass
class Simulated:
    """A simulated cells x genes CSR count matrix with labels (if any) and its true parameters."""

    X: sp.csr_matrix
    labels: np.ndarray | None
    truth: dict = field(default_factory=dict)


def poisson_check(n_cells: int = 2000, n_features: int = 10, seed: int = 0) -> Simulated:
    """The review's check data: feature j ~ Poisson(rate j+1), rates 1..10; truth['rates']."""
    raise NotImplementedError


def gmvae_mixture(n_cells: int = 10000, n_features: int = 10, n_clusters: int = 5, seed: int = 0) -> Simulated:
    """The review's GMVAE data: counts from a mixture, labels from k-means (k=n_clusters) as the review did."""
    raise NotImplementedError


def single_cell(n_cells: int = 5000, n_genes: int = 2000, n_types: int = 6, seed: int = 0,
                sparsity: float = 0.9) -> Simulated:
    """Single-cell-like NB counts: cell types with marker genes, heavy-tailed means, library sizes, ~90% zeros."""
    raise NotImplementedError
