"""Gene selection by binomial deviance: the sparse computation against a dense brute force written from the
definition (Townes et al. 2019), edge cases, order invariance, and marker genes of simulated data ranking high."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import xlogy

from scvae_torch import genes, simulate


def brute_deviance(D: np.ndarray) -> np.ndarray:
    """D_j = 2 sum_i [x log(x / (n_i p_j)) + (n_i - x) log((n_i - x) / (n_i (1 - p_j)))], dense, 0 log 0 = 0."""
    D = np.asarray(D, dtype=np.float64)
    n = D.sum(axis=1, keepdims=True)
    p = D.sum(axis=0, keepdims=True) / D.sum()
    rest = n - D
    terms = xlogy(D, D) - xlogy(D, n * p) + xlogy(rest, rest) - xlogy(rest, n * (1 - p))
    return 2 * terms.sum(axis=0)


def brute_top(D: np.ndarray, n: int) -> np.ndarray:
    """The n genes of highest brute-force deviance (earlier gene on ties), in gene order."""
    dev = brute_deviance(D)
    chosen = sorted(range(dev.size), key=lambda j: (-dev[j], j))[:n]
    return np.array(sorted(chosen))


def counts(n_cells: int, n_genes: int, seed: int) -> np.ndarray:
    """Overdispersed counts with an all-zero gene, an empty cell and a cell with a single gene."""
    rng = np.random.default_rng(seed)
    D = rng.poisson(rng.gamma(0.4, 3.0, size=(n_cells, n_genes)) * rng.uniform(0.2, 3, size=(1, n_genes)))
    D[:, 2] = 0
    D[4] = 0
    D[6] = 0
    D[6, 1] = 7
    return D


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(30, 8), (200, 50), (17, 120)])
def test_deviance_matches_the_dense_definition(seed, shape):
    D = counts(*shape, seed)
    X = sp.csr_matrix(D.astype(np.float32))
    expected = brute_deviance(D)
    np.testing.assert_allclose(genes.binomial_deviance(X), expected, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(genes.binomial_deviance(X, block_nonzeros=5), expected, rtol=1e-10, atol=1e-9)
    assert genes.binomial_deviance(X)[2] == 0.0  # the all-zero gene
    for n in (1, 3, shape[1] - 1):
        assert genes.top_genes(X, n).tolist() == brute_top(D, n).tolist()


def test_other_sparse_formats_and_explicit_zeros_give_the_same_deviance():
    D = counts(40, 10, seed=7)
    expected = brute_deviance(D)
    X = sp.csr_matrix(D.astype(np.float64))
    X.data[::4] = 0  # stored zeros are still zeros
    D_zeroed = X.toarray()
    np.testing.assert_allclose(genes.binomial_deviance(X), brute_deviance(D_zeroed), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(genes.binomial_deviance(sp.csc_matrix(D)), expected, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(genes.binomial_deviance(sp.coo_matrix(D.astype(np.int32))), expected, rtol=1e-10,
                               atol=1e-9)


def test_a_gene_holding_every_count_and_a_matrix_without_counts():
    D = np.zeros((5, 4))
    D[:, 1] = [3, 1, 0, 9, 2]  # p = 1 for gene 1: each cell's counts are all in it, a perfect fit
    assert genes.binomial_deviance(sp.csr_matrix(D)).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert genes.binomial_deviance(sp.csr_matrix((3, 4))).tolist() == [0.0] * 4
    D[0, 0] = 1  # now gene 1 holds all but one count
    np.testing.assert_allclose(genes.binomial_deviance(sp.csr_matrix(D)), brute_deviance(D), rtol=1e-12)


def test_the_order_of_cells_does_not_matter():
    D = counts(300, 60, seed=3)
    X = sp.csr_matrix(D)
    perm = np.random.default_rng(0).permutation(D.shape[0])
    np.testing.assert_allclose(genes.binomial_deviance(X[perm]), genes.binomial_deviance(X), rtol=1e-12)
    assert genes.top_genes(X[perm], 20).tolist() == genes.top_genes(X, 20).tolist()


def test_ties_go_to_the_earlier_gene_and_the_result_is_in_gene_order():
    D = counts(50, 6, seed=1)
    D = np.hstack([D, D[:, [5, 0]]])  # genes 6 and 7 repeat genes 5 and 0: equal deviance
    dev = brute_deviance(D)
    X = sp.csr_matrix(D)
    order = sorted(range(8), key=lambda j: (-dev[j], j))
    for n in range(1, 8):
        top = genes.top_genes(X, n)
        assert top.tolist() == sorted(order[:n])
    first = order.index(0)
    assert order.index(7) == first + 1  # gene 7 directly after its twin gene 0


def test_more_genes_than_there_are_keeps_all_and_says_so(caplog):
    X = sp.csr_matrix(counts(20, 5, seed=0))
    with caplog.at_level(logging.WARNING, logger="scvae_torch"):
        assert genes.top_genes(X, 9).tolist() == [0, 1, 2, 3, 4]
    assert "top 9 genes but there are only 5: keeping all" in caplog.text
    assert genes.top_genes(X, 5).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "4"])
def test_a_bad_number_of_genes_is_refused(n):
    with pytest.raises(ValueError, match="whole number >= 1"):
        genes.top_genes(sp.csr_matrix(np.ones((3, 3))), n)


def test_markers_of_simulated_cell_types_rank_first_when_nothing_else_varies():
    """Equal base expression for every gene: the marker genes (truth) are exactly the top genes."""
    sim = simulate.single_cell(n_cells=1000, n_genes=1000, n_types=4, n_markers=10, gene_sd=0.0, seed=0)
    markers = np.sort(np.asarray(sim.truth["marker_genes"]).ravel())
    assert genes.top_genes(sim.X, markers.size).tolist() == markers.tolist()


def test_markers_outrank_genes_of_the_same_expression():
    """With heavy-tailed gene means, deviance still ranks a marker above most non-markers of like total count
    (a ranking by total count could not: 0.5 on average)."""
    sim = simulate.single_cell(n_cells=1000, n_genes=1000, n_types=4, n_markers=10, gene_sd=1.0, seed=0)
    dev = genes.binomial_deviance(sim.X)
    totals = np.asarray(sim.X.sum(axis=0)).ravel()
    is_marker = np.zeros(dev.size, dtype=bool)
    is_marker[np.asarray(sim.truth["marker_genes"]).ravel()] = True
    beaten = []
    for j in np.flatnonzero(is_marker & (totals >= 100)):
        peers = ~is_marker & (totals > totals[j] / 1.25) & (totals < totals[j] * 1.25)
        if peers.sum() >= 5:
            beaten.append(np.mean(dev[peers] < dev[j]))
    assert len(beaten) >= 15
    assert np.mean(beaten) > 0.75


def brute_deviance_within(D: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """The deviance with one multinomial per batch: p_bj = (gene j's total in batch b) / (batch b's total), and
    D_j = 2 sum_i [x log(x / (n_i p_b(i)j)) + (n_i - x) log((n_i - x) / (n_i (1 - p_b(i)j)))], dense."""
    D = np.asarray(D, dtype=np.float64)
    n = D.sum(axis=1, keepdims=True)
    p = np.empty_like(D)
    for b in np.unique(batch):
        p[batch == b] = D[batch == b].sum(0) / D[batch == b].sum()
    rest = n - D
    terms = xlogy(D, D) - xlogy(D, n * p) + xlogy(rest, rest) - xlogy(rest, n * (1 - p))
    return 2 * terms.sum(axis=0)


@pytest.mark.parametrize("seed", range(3))
def test_deviance_within_batches_matches_the_dense_definition(seed):
    D = counts(90, 25, seed)
    batch = np.random.default_rng(seed).choice(np.array(["plate1", "plate2", "plate3"]), size=90)
    X = sp.csr_matrix(D.astype(np.float32))
    expected = brute_deviance_within(D, batch)
    np.testing.assert_allclose(genes.binomial_deviance(X, batch=batch), expected, rtol=1e-10, atol=1e-9)
    chosen = sorted(range(expected.size), key=lambda j: (-expected[j], j))[:6]
    assert genes.top_genes(X, 6, batch=batch).tolist() == sorted(chosen)
    one = np.zeros(90, dtype=int)  # a single batch is the pooled deviance
    np.testing.assert_allclose(genes.binomial_deviance(X, batch=one), genes.binomial_deviance(X), rtol=1e-12)


def test_a_gene_that_only_tells_the_batches_apart_is_kept_pooled_but_not_within_batches():
    """Gene 0's share is 4x higher in batch b than in batch a and the same for every cell within a batch (a
    platform's capture bias); gene 1 marks half of the cells in both batches (a cell type)."""
    rng = np.random.default_rng(0)
    n_cells, n_genes = 400, 30
    batch = np.repeat(["a", "b"], n_cells // 2)
    kind = np.tile([0, 1], n_cells // 2)
    rates = np.full((n_cells, n_genes), 2.0)
    rates[batch == "b", 0] *= 4
    rates[kind == 1, 1] *= 3
    X = sp.csr_matrix(rng.poisson(rates).astype(np.float32))
    assert genes.top_genes(X, 2).tolist() == [0, 1]
    assert genes.top_genes(X, 1, batch=batch).tolist() == [1]
    pooled, within = genes.binomial_deviance(X), genes.binomial_deviance(X, batch=batch)
    assert pooled[0] > 2 * pooled[2:].max()  # far above the 28 genes without structure
    assert within[0] <= within[2:].max()  # within batches, one of them


def test_batch_labels_must_match_the_cells():
    with pytest.raises(ValueError, match="3 labels for 4 cells"):
        genes.binomial_deviance(sp.csr_matrix(np.ones((4, 2))), batch=np.array(["a", "b", "a"]))
