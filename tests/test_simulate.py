"""Synthetic data sets: shapes, seeding, the generating laws against scipy.stats, sparsity, separability, the CLI."""

from __future__ import annotations

import inspect
import json
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from scvae_torch import cli, simulate
from scvae_torch.simulate import gmvae_mixture, poisson_check, single_cell


def _gof_pvalue(sample: np.ndarray, pmf, min_expected: float = 5.0) -> float:
    """Chi-square goodness-of-fit p-value of integer samples against pmf(k); bins merged to >= 5 expected."""
    ks = np.arange(int(sample.max()) + 1)
    probs = pmf(ks).astype(float)
    probs[-1] = max(1.0 - probs[:-1].sum(), 0.0)  # the last bin takes the whole upper tail P(X >= max)
    observed = np.bincount(sample.astype(np.int64), minlength=ks.size).astype(float)
    obs, exp, o, e = [], [], 0.0, 0.0
    for o_k, e_k in zip(observed, probs * sample.size):
        o, e = o + o_k, e + e_k
        if e >= min_expected:
            obs.append(o)
            exp.append(e)
            o = e = 0.0
    assert len(obs) >= 2, "too few bins for a test"
    obs[-1] += o  # the remainder joins the last full bin
    exp[-1] += e
    return stats.chisquare(obs, exp).pvalue


def _same(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    """True if two CSR matrices are identical, structure and values."""
    return (a.shape == b.shape and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data, b.data))


def _is_counts(X) -> None:
    """Assert X is a canonical float32 CSR matrix of non-negative whole numbers without stored zeros."""
    assert isinstance(X, sp.csr_matrix) and X.dtype == np.float32 and X.has_canonical_format
    assert np.all(X.data > 0) and np.array_equal(X.data, np.round(X.data))


# --- (a) the review's Poisson check data ---------------------------------------------------------------------------

def test_poisson_check_shape_truth_and_law():
    sim = poisson_check()
    assert sim.X.shape == (2000, 10) and sim.labels is None
    _is_counts(sim.X)
    np.testing.assert_array_equal(sim.truth["rates"], np.arange(1, 11))
    X = sim.X.toarray()
    means = X.mean(axis=0)
    # empirical means within 4 standard errors of the rates, and within 5 %
    assert np.all(np.abs(means - sim.truth["rates"]) < 4 * np.sqrt(sim.truth["rates"] / 2000))
    assert np.all(np.abs(means / sim.truth["rates"] - 1) < 0.05)
    for j, rate in enumerate(sim.truth["rates"]):
        assert _gof_pvalue(X[:, j], lambda k: stats.poisson.pmf(k, rate)) > 1e-3


def test_poisson_check_other_sizes():
    sim = poisson_check(n_cells=50, n_features=3, seed=4)
    assert sim.X.shape == (50, 3)
    np.testing.assert_array_equal(sim.truth["rates"], [1, 2, 3])


# --- seeding ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda seed: poisson_check(200, 10, seed=seed),
    lambda seed: gmvae_mixture(500, 10, 5, seed=seed),
    lambda seed: single_cell(300, 400, 5, seed=seed),
])
def test_same_seed_same_data_other_seed_other_data(make):
    a, b, c = make(7), make(7), make(8)
    assert _same(a.X, b.X) and not _same(a.X, c.X)
    if a.labels is not None:
        np.testing.assert_array_equal(a.labels, b.labels)
    for key in a.truth:
        np.testing.assert_array_equal(a.truth[key], b.truth[key])


# --- (b) the review's GMVAE mixture ---------------------------------------------------------------------------------

def test_gmvae_mixture_labels_are_kmeans_and_match_components():
    sim = gmvae_mixture()
    assert sim.X.shape == (10000, 10)
    _is_counts(sim.X)
    assert sorted(set(sim.labels)) == [f"cluster{k}" for k in range(5)]
    components = sim.truth["components"]
    assert sim.truth["rates"].shape == (5, 10) and components.shape == (10000,)
    # the labels are k-means (k=5, n_init=10) on log1p counts, recomputed here independently
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=5, n_init=10, random_state=0).fit_predict(np.log1p(sim.X.toarray()))
    assert adjusted_rand_score(sim.labels, km) == 1.0
    # and they recover the generating components, so a GMVAE at ARI >= 0.9 against them is within reach
    assert adjusted_rand_score(sim.labels, components) > 0.95
    # renumbered to the component each cluster overlaps most
    assert np.mean(sim.labels == np.char.add("cluster", components.astype(str))) > 0.95
    # each component's empirical mean is its rate vector (4 standard errors)
    X = sim.X.toarray()
    for k in range(5):
        rows = X[components == k]
        rates = sim.truth["rates"][k]
        assert np.all(np.abs(rows.mean(axis=0) - rates) < 4 * np.sqrt(rates / len(rows)))


def test_gmvae_mixture_rejects_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="n_clusters"):
        gmvae_mixture(100, 4, 5)


# --- (c) single-cell-like counts -----------------------------------------------------------------------------------

def test_single_cell_default_shape_labels_truth_sparsity():
    sim = single_cell()
    n_cells, n_genes, n_types = 5000, 2000, 6
    assert sim.X.shape == (n_cells, n_genes)
    _is_counts(sim.X)
    assert sim.labels.shape == (n_cells,) and sorted(set(sim.labels)) == [f"type{t}" for t in range(n_types)]
    truth = sim.truth
    np.testing.assert_array_equal(sim.labels, np.char.add("type", truth["types"].astype(str)))
    assert truth["type_proportions"].shape == (n_types, n_genes)
    np.testing.assert_allclose(truth["type_proportions"].sum(axis=1), 1.0)
    assert truth["library_sizes"].shape == (n_cells,) and truth["inverse_dispersion"].shape == (n_genes,)
    assert abs((1 - sim.X.nnz / (n_cells * n_genes)) - 0.9) < 0.01
    # marker genes: disjoint, and up 5-10x in their own type relative to every other type (after
    # dividing out the ratio of the two types' normalising constants, read off the shared non-marker genes)
    markers = truth["marker_genes"]
    assert len(np.unique(markers)) == markers.size
    p = truth["type_proportions"]
    shared = np.setdiff1d(np.arange(n_genes), markers)
    for t in range(n_types):
        for u in set(range(n_types)) - {t}:
            fold = p[t, markers[t]] / p[u, markers[t]] / np.median(p[t, shared] / p[u, shared])
            assert np.all((fold > 5 - 1e-9) & (fold < 10 + 1e-9))
    # library sizes vary (log-normal) and the observed totals follow them
    totals = np.asarray(sim.X.sum(axis=1)).ravel()
    assert np.corrcoef(np.log(truth["library_sizes"]), np.log1p(totals))[0, 1] > 0.9
    # heavy-tailed gene means: the top 1% of genes hold a large share of all counts
    gene_totals = np.sort(np.asarray(sim.X.sum(axis=0)).ravel())[::-1]
    assert gene_totals[: n_genes // 100].sum() / gene_totals.sum() > 0.15


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 0.99])
def test_single_cell_sparsity_knob(target):
    sim = single_cell(1000, 1500, 5, seed=3, sparsity=target)
    assert abs((1 - sim.X.nnz / (1000 * 1500)) - target) < 0.01


def test_single_cell_types_are_separable_by_kmeans_on_pca():
    sim = single_cell()
    with threadpool_limits(limits=1):  # small problem: threads only add start-up cost on a busy machine
        log_counts = np.log1p(sim.X.toarray())
        embedding = PCA(n_components=20, svd_solver="randomized", random_state=0).fit_transform(log_counts)
        clusters = KMeans(n_clusters=6, n_init=10, random_state=0).fit_predict(embedding)
    assert adjusted_rand_score(sim.labels, clusters) >= 0.8


def test_single_cell_counts_follow_the_negative_binomial():
    # one type, equal library sizes: each gene's column is i.i.d. NB(mean L p_g, theta_g); compare with scipy
    sim = single_cell(20000, 40, n_types=1, seed=5, sparsity=0.6, library_sd=0.0)
    X = sim.X.toarray()
    mu = sim.truth["library_sizes"][0] * sim.truth["type_proportions"][0]
    theta = sim.truth["inverse_dispersion"]
    np.testing.assert_allclose(sim.truth["library_sizes"], sim.truth["library_sizes"][0])
    tested = 0
    for g in range(40):
        if mu[g] < 0.02:
            continue
        nb = stats.nbinom(theta[g], theta[g] / (theta[g] + mu[g]))
        assert _gof_pvalue(X[:, g], nb.pmf) > 1e-4, (g, mu[g], theta[g])
        tested += 1
    assert tested >= 20


def test_single_cell_both_samplers_match_the_nb_mixture_over_library_sizes():
    # genes with small means go through candidate events, the others entry by entry (simulate._DENSE_MEAN);
    # for each, the counts of one type's cells must follow the mixture over their library sizes of
    # NB(L_c p_tg, theta_g), computed here with scipy; and every gene's zero fraction must match its expectation
    sim = single_cell(30000, 200, n_types=2, seed=9, sparsity=0.9)
    X, truth = sim.X.tocsc(), sim.truth
    sizes, p, theta = truth["library_sizes"], truth["type_proportions"], truth["inverse_dispersion"]
    dense = p.max(axis=0) * sizes.mean() > simulate._DENSE_MEAN
    assert 10 <= dense.sum() <= 190
    z_scores = []
    for g in range(200):
        counts = X[:, g].toarray().ravel()
        for t in range(2):
            cells = truth["types"] == t
            mu = sizes[cells] * p[t, g]
            success = (theta[g] / (theta[g] + mu))[:, None]  # scipy's p, one row per cell
            pmf = lambda k: stats.nbinom.pmf(np.asarray(k)[None, :], theta[g], success).mean(axis=0)
            p0 = pmf([0])[0]
            z_scores.append((np.mean(counts[cells] == 0) - p0) / np.sqrt(p0 * (1 - p0) / cells.sum()))
            if g < 30:  # full distribution for some genes of each kind
                assert _gof_pvalue(counts[cells], pmf) > 1e-4, (g, t, dense[g])
    assert np.max(np.abs(z_scores)) < 4.5


def test_single_cell_hard_mode_has_unequal_types_wide_libraries_and_a_state_axis():
    n, K = 20000, 4
    easy, sim = single_cell(n, 300, K, seed=4), single_cell(n, 300, K, seed=4, hard=True)
    truth = sim.truth
    zipf = 1 / np.arange(1, K + 1) / (1 / np.arange(1, K + 1)).sum()
    shares = np.bincount(truth["types"], minlength=K) / n
    assert np.all(np.abs(shares - zipf) < 4 * np.sqrt(zipf * (1 - zipf) / n))
    spread = lambda s: np.log(s.truth["library_sizes"]).std()  # noqa: E731
    assert abs(spread(sim) / spread(easy) - 2.0) < 0.1
    assert abs(sim.X.nnz / (n * 300) - 0.1) < 0.01  # the sparsity is still met
    # the state moves the state genes' means by exp(s e_g) in every type: the observed ratio of a gene's share
    # of the counts at s = +1 and s = -1 (cells of type 0) against the renormalised truth
    state, genes, effect = truth["cell_state"], truth["state_genes"], truth["state_effect"]
    assert set(np.unique(state)) == set(np.linspace(-1, 1, simulate.STATE_LEVELS))
    assert len(genes) == 30 and np.all(np.abs(np.corrcoef(state, truth["types"])[0, 1]) < 0.03)
    X, p0 = sim.X.tocsc(), truth["type_proportions"][0]
    for s in (-1.0, 1.0):
        cells = (truth["types"] == 0) & (state == s)
        expected = p0.copy()
        expected[genes] *= np.exp(s * effect)
        expected /= expected.sum()
        observed = np.asarray(X[cells].sum(0)).ravel() / truth["library_sizes"][cells].sum()
        big = expected * truth["library_sizes"][cells].sum() > 200
        assert big[genes].sum() >= 5
        assert np.all(np.abs(observed[big] / expected[big] - 1) < 0.25)
    # the batch-free part is what it would be without batches; batches still apply on top
    with_batches = single_cell(2000, 300, K, seed=4, hard=True, batches=2)
    assert np.array_equal(with_batches.truth["types"], single_cell(2000, 300, K, seed=4, hard=True).truth["types"])


@pytest.mark.parametrize("mu,theta", [(0.01, 2.0), (0.5, 0.3), (3.0, 10.0), (4.9, 0.5), (20.0, 0.1), (50.0, 5.0),
                                      (1000.0, 2.0)])
def test_zero_truncated_nb_matches_scipy(mu, theta):
    # both branches: summing the pmf (mean < 5 or P(X=0) > 1/2) and rejection from gamma-Poisson (the rest)
    rng = np.random.Generator(np.random.PCG64(11))
    n = 20000
    x = simulate._positive_nb(rng, np.full(n, mu), np.full(n, theta))
    assert x.min() >= 1
    nb = stats.nbinom(theta, theta / (theta + mu))
    truncated = lambda k: np.where(k >= 1, nb.pmf(k) / nb.sf(0), 0.0)
    assert _gof_pvalue(x, truncated) > 1e-4


def test_block_sampler_grows_its_buffers_when_the_estimate_is_low():
    args = (np.array([50.0, 80.0, 120.0]), np.array([0, 1, 0]), np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]),
            np.array([1.0, 2.0, 5.0]))
    exact = simulate._nb_counts(np.random.Generator(np.random.PCG64(2)), *args, expected_nnz=9)
    grown = simulate._nb_counts(np.random.Generator(np.random.PCG64(2)), *args, expected_nnz=0)
    assert exact.nnz > 0 and _same(exact, grown)


def test_single_cell_mb20k_shape_stays_sparse_in_memory():
    # MB-20k's genes and sparsity, fewer cells; dense would be 448 MB (float64) or 224 MB (float32), CSR 31 MB
    tracemalloc.start()
    try:
        sim = single_cell(2000, 27998, n_types=8, seed=1, sparsity=0.93)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert abs((1 - sim.X.nnz / (2000 * 27998)) - 0.93) < 0.01
    _is_counts(sim.X)
    assert peak < 120 * 2**20, f"peak traced memory {peak / 2**20:.0f} MB"


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=0.0), "sparsity"), (dict(n_cells=0), "n_cells"),
    (dict(n_genes=10, n_types=6, n_markers=2), "marker genes"), (dict(fold=(0.5, 2.0)), "fold"),
])
def test_single_cell_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        single_cell(**{"n_cells": 100, "n_genes": 200, **kwargs})


# --- the `simulate` command ----------------------------------------------------------------------------------------

def test_cli_defaults_mirror_the_library():
    params = {"cells": "n_cells", "genes": ("n_genes", "n_features"), "types": ("n_types", "n_clusters"),
              "sparsity": "sparsity", "batches": "batches", "hard": "hard"}
    functions = {"poisson-check": poisson_check, "gmvae-mixture": gmvae_mixture, "single-cell": single_cell}
    for kind, defaults in cli._SIM_DEFAULTS.items():
        signature = inspect.signature(functions[kind]).parameters
        for option, value in defaults.items():
            names = params[option] if isinstance(params[option], tuple) else (params[option],)
            name = next(n for n in names if n in signature)
            assert signature[name].default == value, (kind, option)
    # and every tunable size of each generator is reachable from the command line
    assert set(cli._SIM_DEFAULTS["single-cell"]) == {"cells", "genes", "types", "sparsity", "batches", "hard"}


@pytest.mark.parametrize("kind,flags,expected", [
    ("single-cell", ["--cells", "300", "--genes", "200", "--types", "5", "--sparsity", "0.85", "--seed", "3"],
     lambda: single_cell(300, 200, 5, seed=3, sparsity=0.85)),
    ("single-cell", ["--cells", "300", "--genes", "200", "--types", "4", "--hard"],
     lambda: single_cell(300, 200, 4, hard=True)),
    ("gmvae-mixture", ["--cells", "400"], lambda: gmvae_mixture(400)),
    ("poisson-check", [], lambda: poisson_check()),
])
def test_cli_writes_the_canonical_file_and_truth(tmp_path, kind, flags, expected):
    anndata = pytest.importorskip("anndata")
    out = tmp_path / "counts.h5ad"
    assert cli.main(["simulate", kind, "--out", str(out), *flags]) == 0
    sim = expected()
    adata = anndata.read_h5ad(out)
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), sim.X.toarray())
    if sim.labels is None:
        assert "label" not in adata.obs
    else:
        np.testing.assert_array_equal(adata.obs["label"].astype(str).to_numpy(), sim.labels)
    truth = json.loads((tmp_path / "counts.h5ad.truth.json").read_text())
    assert truth["kind"] == kind
    for key, value in sim.truth.items():
        np.testing.assert_array_equal(np.asarray(truth["truth"][key]), value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.h5ad", "counts.h5ad.truth.json"]


@pytest.mark.parametrize("argv,message", [
    (["poisson-check", "--types", "3"], "does not use --types"),
    (["gmvae-mixture", "--sparsity", "0.5"], "does not use --sparsity"),
    (["gmvae-mixture", "--types", "11"], "n_clusters"),
    (["single-cell", "--sparsity", "1.5"], "between 0 and 1"),
    (["single-cell", "--cells", "0"], ">= 1"),
    (["no-such-kind"], "invalid choice"),
])
def test_cli_bad_arguments_give_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "counts.h5ad"
    try:
        status = cli.main(["simulate", *argv, "--out", str(out)])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_output_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "no" / "such" / "counts.h5ad"
    assert cli.main(["simulate", "poisson-check", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
