"""Gene selection on raw counts: binomial deviance (Townes et al. 2019, Genome Biology 20:295).

Under the null model every cell i draws its n_i counts from one multinomial shared by all cells, so gene j has
count x_ij ~ Binomial(n_i, p_j) with p_j = X_j / N (gene total over grand total). The deviance of that fit,

    D_j = 2 sum_i [ x_ij log(x_ij / (n_i p_j)) + (n_i - x_ij) log((n_i - x_ij) / (n_i (1 - p_j))) ],

is large for genes whose counts are not spread over the cells in proportion to their sizes: the informative
ones. Expanding the logarithms separates what depends on p_j from what depends on the entries only:

    D_j / 2 = A_j - X_j log p_j - (N - X_j) log(1 - p_j),
    A_j = sum over the stored (non-zero) x_ij of [ x_ij log(x_ij / n_i) + (n_i - x_ij) log(1 - x_ij / n_i) ],

because a zero entry contributes n_i log(n_i / (n_i (1 - p_j))) = -n_i log(1 - p_j), whose sum over a gene's
zero cells joins the non-zero cells' (n_i - x_ij) log(1 - p_j) terms into (N - X_j) log(1 - p_j) in closed form.
So one pass over the stored entries, block by block of cells, gives A_j and X_j; no dense matrix is formed and
p_j is not needed until the end (which lets a file be read once).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from scipy.special import xlog1py, xlogy

CRITERION = "binomial_deviance"
_BLOCK_NONZEROS = 1 << 20  # stored counts per block of cells: bounds the float64 temporaries (~8 MB each)

log = logging.getLogger(__name__)


class DevianceSums:
    """Accumulate the binomial deviance of every gene over blocks of cells (rows), in float64.

    Each block must hold all the genes under consideration, so that its row sums are the cells' totals n_i.

    Parameters
    ----------
    n_genes : int
        Number of genes (columns) of every block.
    block_nonzeros : int
        Stored entries handled at a time within a block; bounds the temporary memory.
    """

    def __init__(self, n_genes: int, block_nonzeros: int = _BLOCK_NONZEROS):
        self.entry_sums = np.zeros(n_genes)   # A_j
        self.gene_totals = np.zeros(n_genes)  # X_j
        self.block_nonzeros = block_nonzeros

    def add(self, block: sp.spmatrix) -> None:
        """Add the stored entries of a block of cells (cells x genes, non-negative counts).

        Parameters
        ----------
        block : scipy.sparse matrix
            Counts of some cells over all the genes (CSR; other formats are converted).
        """
        block = block if sp.isspmatrix_csr(block) else sp.csr_matrix(block)
        if block.shape[1] != self.entry_sums.size:
            raise ValueError(f"block has {block.shape[1]} genes, expected {self.entry_sums.size}")
        for lo, hi in row_blocks(block.indptr, self.block_nonzeros):  # bounds the float64 temporaries
            a, b = int(block.indptr[lo]), int(block.indptr[hi])
            self._add_entries(block.data[a:b], block.indices[a:b], block.indptr[lo:hi + 1] - a)

    def _add_entries(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray) -> None:
        """A_j and X_j of the stored entries of some whole cells (CSR arrays, indptr starting at 0)."""
        x = data.astype(np.float64)
        if not x.all():  # stored zeros add nothing; dropping them keeps every x > 0 below
            stored = x > 0
            indptr = np.concatenate(([0], np.cumsum(stored)))[indptr]
            x, indices = x[stored], indices[stored]
        per_cell = np.diff(indptr)
        filled = per_cell > 0
        totals = np.zeros(per_cell.size)
        if x.size:
            totals[filled] = np.add.reduceat(x, indptr[:-1][filled])  # n_i
        log_totals = np.log(totals, out=np.zeros(per_cell.size), where=filled)
        n, log_n = np.repeat(totals, per_cell), np.repeat(log_totals, per_cell)  # of each entry's cell
        # log(1 - x/n) as log(n - x) - log n: numpy's log1p is twice as slow as log, and per-cell log n is cheap
        rest = np.subtract(n, x, out=n)                      # n_i - x_ij >= 0
        part = log_n.copy()
        np.log(rest, out=part, where=rest > 0)               # log(n - x); log n where x = n
        part -= log_n                                        # log(1 - x/n); 0 where x = n
        part *= rest                                         # (n - x) log(1 - x/n)
        terms = np.log(x)                                    # x > 0
        terms -= log_n
        terms *= x                                           # x log(x / n)
        terms += part
        self.entry_sums += np.bincount(indices, weights=terms, minlength=self.entry_sums.size)
        self.gene_totals += np.bincount(indices, weights=x, minlength=self.entry_sums.size)

    def deviance(self) -> np.ndarray:
        """The binomial deviance of every gene over the cells added so far (0 for genes without counts).

        Returns
        -------
        numpy.ndarray
            float64, one value per gene.
        """
        total = self.gene_totals.sum()
        if total <= 0:
            return np.zeros_like(self.gene_totals)
        p = self.gene_totals / total
        rest = np.maximum(total - self.gene_totals, 0.0)  # N - X_j; exactly 0 for a gene holding every count
        half = self.entry_sums - xlogy(self.gene_totals, p) - xlog1py(rest, -p)
        return np.maximum(2.0 * half, 0.0)  # >= 0 in exact arithmetic; rounding can leave -1e-12


def row_blocks(indptr: np.ndarray, block_nonzeros: int) -> list[tuple[int, int]]:
    """Ranges of consecutive rows holding about block_nonzeros stored entries each (at least one row)."""
    bounds, start, n = [], 0, len(indptr) - 1
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + block_nonzeros, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        bounds.append((start, stop))
        start = stop
    return bounds


def binomial_deviance(X: sp.spmatrix, block_nonzeros: int = _BLOCK_NONZEROS,
                      batch: np.ndarray | None = None) -> np.ndarray:
    """Binomial deviance of every gene of a raw count matrix (Townes et al. 2019).

    Parameters
    ----------
    X : scipy.sparse matrix
        Cells x genes raw counts (CSR preferred; other formats are converted, never densified).
    block_nonzeros : int
        Stored entries per block of cells; bounds the temporary memory.
    batch : numpy.ndarray, optional
        One batch label per cell. The deviance is then summed over the batches, each fitted with its own gene
        proportions p_j (the null model of scry's devianceFeatureSelection with a batch): a gene whose share
        differs between batches but not within them (a platform's capture bias) is not counted as informative.

    Returns
    -------
    numpy.ndarray
        float64 deviance per gene, in the matrix's gene order; 0 for a gene without counts.
    """
    if batch is not None:
        batch = np.asarray(batch)
        if batch.shape != (X.shape[0],):
            raise ValueError(f"batch has {batch.size} labels for {X.shape[0]} cells")
        X = X if sp.isspmatrix_csr(X) else sp.csr_matrix(X)
        return sum((binomial_deviance(X[batch == b], block_nonzeros) for b in np.unique(batch)),
                   np.zeros(X.shape[1]))
    sums = DevianceSums(X.shape[1], block_nonzeros)
    sums.add(X)
    return sums.deviance()


def check_count(n) -> None:
    """Refuse a number of genes to keep that is not a whole number >= 1 (ValueError)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of genes to keep must be a whole number >= 1, got {n!r}")


def rank_top(deviance: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n genes of highest deviance, in their original order.

    Ties are broken by gene order (the earlier gene wins). When n is at least the number of genes, all are kept.

    Parameters
    ----------
    deviance : numpy.ndarray
        One score per gene.
    n : int
        Genes to keep, >= 1.

    Returns
    -------
    numpy.ndarray
        int64 indices, ascending.
    """
    check_count(n)
    deviance = np.asarray(deviance, dtype=np.float64)
    if n >= deviance.size:
        return np.arange(deviance.size, dtype=np.int64)
    order = np.lexsort((np.arange(deviance.size), -deviance))  # by deviance descending, then gene order
    return np.sort(order[:n]).astype(np.int64)


def top_genes(X: sp.spmatrix, n: int, batch: np.ndarray | None = None) -> np.ndarray:
    """Indices of the n genes of highest binomial deviance, in the matrix's original gene order.

    Parameters
    ----------
    X : scipy.sparse matrix
        Cells x genes raw counts.
    n : int
        Genes to keep, >= 1; more than the number of genes keeps them all (with a warning in the log).
    batch : numpy.ndarray, optional
        One batch label per cell: rank by the deviance within batches (`binomial_deviance`), so that genes
        which only tell the batches apart are not kept (on cellbench_3cl_2platforms, k-means on PCA of the
        kept genes finds the cell lines with ARI 1.00 instead of 0.44: docs/batch.md).

    Returns
    -------
    numpy.ndarray
        int64 column indices, ascending.
    """
    check_count(n)
    if n > X.shape[1]:
        log.warning("asked for the top %d genes but there are only %d: keeping all", n, X.shape[1])
    return rank_top(binomial_deviance(X, batch=batch), n)
