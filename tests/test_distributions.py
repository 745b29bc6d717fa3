"""Count log-likelihoods against independent references (scipy.stats, mpmath), and sparse == dense.

References
----------
* scipy.stats: ``poisson`` and ``nbinom(n=theta, p=theta / (theta + mu))``; zero-inflated mixtures built
  from their logpmf with ``scipy.special.log_expit`` for log(pi) and log(1 - pi).
* mpmath at 50 significant digits, straight from the pmf definitions, over the whole grid.

Why mpmath is needed as well: scipy's nbinom forms p = theta / (theta + mu) in float64 and then evaluates
n log(p) + k log1p(-p).  Rounding p costs 1 - p a relative error of about eps * theta / mu, so where
theta >> mu scipy's own answer is ill-conditioned (we measured errors up to 8e-4 at theta / mu >= 1e10).
We therefore compare with scipy only where theta / mu <= 1e8 (scipy's rounding error < ~2e-8 there),
check there that our mpmath reference agrees with scipy (so the reference itself is validated), and
compare with mpmath on every grid point.  The tolerance is the same everywhere: relative error < 1e-5.
"""

from __future__ import annotations

import functools
import itertools

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import special, stats

from scvae_torch import distributions as D

COUNTS = [0, 1, 2, 5, 10, 100, 1e3, 1e4, 1e5]
MEANS = [1e-8, 1e-6, 1e-4, 1e-2, 0.1, 0.5, 1, 2, 10, 100, 1e3, 1e4, 1e5, 1e6]
THETAS = [1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100, 1e3, 1e4, 1e5, 1e6]
PIS = [1e-6, 1e-2, 0.5, 0.99, 1 - 1e-6]
RTOL = 1e-5
# torch marks sparse CSR as beta and warns on construction; irrelevant to what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning",
                                        "ignore:Sparse invariant checks:UserWarning")
SCIPY_MAX_THETA_OVER_MU = 1e8  # see the module docstring
MP_DPS = 50


# ---------------------------------------------------------------- grid and references


def _grid(likelihood: str, counts=COUNTS, means=MEANS, thetas=THETAS, pis=PIS) -> dict[str, np.ndarray]:
    """All combinations of the grid values the likelihood uses, as float64 parameter arrays."""
    use_theta = likelihood in ("nb", "zinb")
    use_pi = likelihood in ("zip", "zinb")
    axes = [counts, means, thetas if use_theta else [np.nan], pis if use_pi else [np.nan]]
    x, mu, theta, pi = (np.array(a, dtype=np.float64) for a in zip(*itertools.product(*axes)))
    grid = {"x": x, "log_mean": np.log(mu)}
    if use_theta:
        grid["log_theta"] = np.log(theta)
    if use_pi:
        grid["logit_pi"] = np.log(pi) - np.log1p(-pi)
    return grid


def _params(grid: dict[str, np.ndarray], dtype: torch.dtype, grad: bool = False) -> dict[str, torch.Tensor]:
    """Torch parameter tensors (leaves) from a grid."""
    return {
        k: torch.tensor(v, dtype=dtype, requires_grad=grad) for k, v in grid.items() if k != "x"
    }


def _mp_logpmf(likelihood: str, x: float, log_mean, log_theta=None, logit_pi=None) -> mp.mpf:
    """log pmf from its definition in mpmath (inputs are taken exactly as given)."""
    x = mp.mpf(x)
    mu = mp.exp(mp.mpf(log_mean))
    if likelihood in ("poisson", "zip"):
        base = x * mp.log(mu) - mu - mp.loggamma(x + 1)
    else:
        theta = mp.exp(mp.mpf(log_theta))
        base = (
            mp.loggamma(x + theta)
            - mp.loggamma(theta)
            - mp.loggamma(x + 1)
            + theta * mp.log(theta / (theta + mu))
            + x * mp.log(mu / (theta + mu))
        )
    if likelihood in ("poisson", "nb"):
        return base
    pi = 1 / (1 + mp.exp(-mp.mpf(logit_pi)))
    if x == 0:
        return mp.log(pi + (1 - pi) * mp.exp(base))
    return mp.log(1 - pi) + base


def _mp_reference(likelihood: str, grid: dict[str, np.ndarray]) -> np.ndarray:
    """mpmath log pmf at every grid point, rounded to float64."""
    names = [k for k in ("log_mean", "log_theta", "logit_pi") if k in grid]
    with mp.workdps(MP_DPS):
        return np.array(
            [
                float(_mp_logpmf(likelihood, xi, **dict(zip(names, vals))))
                for xi, *vals in zip(grid["x"], *(grid[k] for k in names))
            ]
        )


def _scipy_reference(likelihood: str, grid: dict[str, np.ndarray]) -> np.ndarray:
    """scipy.stats log pmf (zero-inflated: mixture of scipy's logpmf with a point mass at 0)."""
    x, mu = grid["x"], np.exp(grid["log_mean"])
    if likelihood in ("poisson", "zip"):
        base = stats.poisson.logpmf(x, mu)
        base0 = stats.poisson.logpmf(0, mu)
    else:
        theta = np.exp(grid["log_theta"])
        p = theta / (theta + mu)
        base = stats.nbinom.logpmf(x, theta, p)
        base0 = stats.nbinom.logpmf(0, theta, p)
    if likelihood in ("poisson", "nb"):
        return base
    log_pi, log_1m_pi = special.log_expit(grid["logit_pi"]), special.log_expit(-grid["logit_pi"])
    return np.where(x == 0, np.logaddexp(log_pi, log_1m_pi + base0), log_1m_pi + base)


def _scipy_well_conditioned(likelihood: str, grid: dict[str, np.ndarray]) -> np.ndarray:
    """Mask of grid points where scipy's own evaluation is trustworthy (module docstring)."""
    if likelihood in ("poisson", "zip"):
        return np.ones_like(grid["x"], dtype=bool)
    return np.exp(grid["log_theta"] - grid["log_mean"]) <= SCIPY_MAX_THETA_OVER_MU


@functools.cache
def _references(likelihood: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(grid, scipy reference, mpmath reference) for a likelihood, computed once."""
    grid = _grid(likelihood)
    return grid, _scipy_reference(likelihood, grid), _mp_reference(likelihood, grid)


def _ours(likelihood: str, grid: dict[str, np.ndarray], dtype=torch.float64) -> np.ndarray:
    """Our element-wise log pmf on a grid, as float64 numpy."""
    x = torch.tensor(grid["x"], dtype=dtype)
    with torch.no_grad():
        return D.log_prob(likelihood, x, _params(grid, dtype)).double().numpy()


def _relative_error(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|value - reference| / |reference| (no reference on these grids is exactly 0)."""
    assert np.all(reference != 0) and np.all(np.isfinite(reference))
    return np.abs(value - reference) / np.abs(reference)


def _describe(grid: dict[str, np.ndarray], i: int) -> str:
    """The grid point i in readable form, for failure messages."""
    return ", ".join(f"{k}={v[i]:.6g}" for k, v in grid.items())


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_log_prob_matches_scipy_where_scipy_is_well_conditioned(likelihood):
    grid, scipy_ref, mp_ref = _references(likelihood)
    ok = _scipy_well_conditioned(likelihood, grid)
    assert ok.mean() > 0.9  # the exclusion is a corner, not the grid
    # Our mpmath reference agrees with scipy where scipy is trustworthy: the reference is validated.
    assert np.max(_relative_error(scipy_ref[ok], mp_ref[ok])) < 1e-7
    err = _relative_error(_ours(likelihood, grid)[ok], scipy_ref[ok])
    worst = np.flatnonzero(ok)[np.argmax(err)]
    assert err.max() < RTOL, f"{likelihood}: rel. error {err.max():.2e} at {_describe(grid, worst)}"


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_log_prob_matches_mpmath_on_the_whole_grid(likelihood):
    grid, _, mp_ref = _references(likelihood)
    err = _relative_error(_ours(likelihood, grid), mp_ref)
    worst = np.argmax(err)
    assert err.max() < RTOL, f"{likelihood}: rel. error {err.max():.2e} at {_describe(grid, worst)}"


def test_scipy_nbinom_is_what_is_inaccurate_in_the_excluded_corner():
    # Documents why the corner theta / mu > 1e8 uses mpmath: there scipy disagrees with mpmath while
    # our log-space form (tested above on the whole grid) does not.
    grid, scipy_ref, mp_ref = _references("nb")
    corner = ~_scipy_well_conditioned("nb", grid)
    assert corner.any()
    ours = _ours("nb", grid)
    assert np.max(_relative_error(ours[corner], mp_ref[corner])) < 1e-8
    assert np.max(_relative_error(scipy_ref[corner], mp_ref[corner])) > 1e-8


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_extreme_parameters_finite_and_accurate(likelihood):
    # log mean -50 and +30, zero-inflation logits +-40: finite values and gradients in both dtypes,
    # and float64 values still within RTOL of mpmath.
    grid = _grid(likelihood, means=[np.exp(-50.0), np.exp(30.0)], pis=[0.25, 0.75])
    grid["log_mean"] = np.where(grid["log_mean"] < 0, -50.0, 30.0)  # exact values, not log(exp(.))
    if "logit_pi" in grid:
        grid["logit_pi"] = np.where(grid["logit_pi"] < 0, -40.0, 40.0)  # exact, as pi rounds to 1
    for dtype in (torch.float64, torch.float32):
        _assert_finite_with_gradients(likelihood, grid, dtype)
    ours, reference = _ours(likelihood, grid), _mp_reference(likelihood, grid)
    err = _relative_error(ours, reference)
    # Known limit of the logaddexp zero branch: log(pi + (1-pi) p(0)) = logaddexp(log pi, log(1-pi) + log p(0))
    # carries an absolute error of a few float64 ulps of its arguments. Only where P(x=0) is within ~1e-11
    # of 1 (here mu = e^-50 with pi = sigmoid(40): log p = -8e-40) is that a large *relative* error; there
    # we require the absolute error to be below 1e-15 instead, and say so rather than loosen RTOL.
    near_one = (grid["x"] == 0) & (np.abs(reference) < 1e-11) & (likelihood in ("zip", "zinb"))
    assert np.all(np.abs(ours - reference)[near_one] < 1e-15)
    err[near_one] = 0
    assert err.max() < RTOL, f"{likelihood}: rel. error {err.max():.2e} at {_describe(grid, np.argmax(err))}"


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_pmf_sums_to_one(likelihood):
    # Normalisation, independent of any library: sum_x p(x) = 1 over x = 0..20000.
    x = torch.arange(20001, dtype=torch.float64)[:, None]
    grid = _grid(likelihood, counts=[0], means=[1e-3, 0.7, 30, 100], thetas=[0.3, 1, 40], pis=[0.01, 0.7])
    params = {k: v[None, :] for k, v in _params(grid, torch.float64).items()}
    total = torch.logsumexp(D.log_prob(likelihood, x, params), dim=0)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-10)


# ---------------------------------------------------------------- finiteness and gradients


def _assert_finite_with_gradients(likelihood: str, grid: dict[str, np.ndarray], dtype: torch.dtype) -> None:
    """log p and its gradient with respect to every parameter are finite at every grid point."""
    params = _params(grid, dtype, grad=True)
    value = D.log_prob(likelihood, torch.tensor(grid["x"], dtype=dtype), params)
    assert value.dtype == dtype
    bad = ~torch.isfinite(value)
    assert not bad.any(), f"{likelihood} {dtype}: non-finite log p at {_describe(grid, int(bad.nonzero()[0]))}"
    value.sum().backward()
    for name, p in params.items():
        bad = ~torch.isfinite(p.grad)
        assert not bad.any(), f"{likelihood} {dtype}: non-finite d/d{name} at {_describe(grid, int(bad.nonzero()[0]))}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_finite_values_and_gradients_on_the_grid(likelihood, dtype):
    _assert_finite_with_gradients(likelihood, _grid(likelihood), dtype)


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_gradients_match_mpmath_derivatives(likelihood):
    # Autograd gradients against mpmath's numerical derivative of the mpmath log pmf. Gradients are sums of
    # terms as large as theta * digamma(theta) (~1.4e7 at theta = 1e6) or x, mu (~1e5, 1e6), which cancel;
    # float64 rounding of such terms leaves an absolute error ~ eps * scale, hence the tolerance
    # RTOL * |reference| + 1e-14 * scale, with scale = 1 + x + mu + theta * |log theta|.
    grid = _grid(
        likelihood,
        counts=[0, 1, 5, 100, 1e5],
        means=[1e-8, 1e-4, 0.5, 10, 1e3, 1e6],
        thetas=[1e-4, 1e-2, 1, 100, 1e4, 1e6],
        pis=[1e-6, 0.5, 1 - 1e-6],
    )
    names = [k for k in ("log_mean", "log_theta", "logit_pi") if k in grid]
    params = _params(grid, torch.float64, grad=True)
    D.log_prob(likelihood, torch.tensor(grid["x"]), params).sum().backward()
    theta = np.exp(grid.get("log_theta", np.zeros_like(grid["x"])))
    scale = 1 + grid["x"] + np.exp(grid["log_mean"]) + theta * np.abs(np.log(theta))
    with mp.workdps(40):
        for name in names:
            reference = np.empty_like(grid["x"])
            for i in range(len(grid["x"])):
                point = {n: mp.mpf(grid[n][i]) for n in names}

                def f(v, i=i, point=point):
                    return _mp_logpmf(likelihood, grid["x"][i], **{**point, name: v})

                reference[i] = float(mp.diff(f, point[name]))
            got = params[name].grad.numpy()
            excess = np.abs(got - reference) - (RTOL * np.abs(reference) + 1e-14 * scale)
            worst = int(np.argmax(excess))
            assert excess[worst] <= 0, (
                f"{likelihood} d/d{name}: {got[worst]:.10g} vs {reference[worst]:.10g} at {_describe(grid, worst)}"
            )


# ---------------------------------------------------------------- float32


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_float32_accuracy_in_the_typical_range(likelihood):
    # float32 is what training uses; in the range of real data (x <= 1e3, theta <= 1e4) the error should
    # stay a few float32 ulps of the individual terms (~ x log(theta) or lgamma(x+1) <= ~6e3).
    grid, _, reference = _references(likelihood)
    typical = (grid["x"] <= 1e3) & (np.exp(grid.get("log_theta", 0.0)) <= 1e4)
    error = np.abs(_ours(likelihood, grid, torch.float32) - reference)[typical]
    assert np.all(error <= 1e-5 * np.abs(reference[typical]) + 3e-3)


def test_nb_float32_large_dispersion_parameter():
    # lgamma(theta) ~ 1.3e7 at theta = 1e6 would lose the whole answer in float32 if differenced directly.
    grid = _grid("nb", counts=[1, 2, 5], means=[0.5, 2], thetas=[1e5, 1e6])
    error = np.abs(_ours("nb", grid, torch.float32) - _mp_reference("nb", grid))
    assert error.max() < 1e-4


# ---------------------------------------------------------------- dispatch and mean


def test_unknown_likelihood_lists_the_choices():
    with pytest.raises(ValueError, match="poisson, nb, zip, zinb"):
        D.log_prob("gaussian", torch.zeros(2), {"log_mean": torch.zeros(2)})
    with pytest.raises(ValueError, match="poisson, nb, zip, zinb"):
        D.mean("NB ", {"log_mean": torch.zeros(2)})
    with pytest.raises(ValueError, match="poisson, nb, zip, zinb"):
        D.log_prob_cells("zinb2", torch.zeros(2, 2), {"log_mean": torch.zeros(2, 2)})


def test_missing_parameter_is_named():
    with pytest.raises(ValueError, match="missing: log_theta"):
        D.log_prob("nb", torch.zeros(3), {"log_mean": torch.zeros(3)})


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_mean_matches_scipy(likelihood):
    grid = _grid(likelihood, counts=[0])
    mu = np.exp(grid["log_mean"])
    if likelihood in ("poisson", "zip"):
        expected = stats.poisson.mean(mu)
    else:
        theta = np.exp(grid["log_theta"])
        expected = stats.nbinom.mean(theta, theta / (theta + mu))
    if likelihood in ("zip", "zinb"):
        expected = expected * special.expit(-grid["logit_pi"])  # (1 - pi) * base mean
    got = D.mean(likelihood, _params(grid, torch.float64)).numpy()
    ok = _scipy_well_conditioned(likelihood, grid)  # scipy's n (1-p) / p has the same rounding of p
    np.testing.assert_allclose(got[ok], expected[ok], rtol=1e-8)


# ---------------------------------------------------------------- per-cell sums, sparse-aware


def _random_batch(
    cells: int, genes: int, theta: str, dtype=torch.float64, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Counts (~93% zeros, one all-zero cell, a few large counts) and random leaf parameters.

    theta: "gene" (log_theta of shape [genes]), "row" ([1, genes]) or "cell" ([cells, genes]).
    """
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.exp(torch.randn(cells, genes, generator=g, dtype=torch.float64) * 2), generator=g)
    counts = counts * (torch.rand(cells, genes, generator=g, dtype=torch.float64) < 0.1)
    counts[0] = 0
    counts[1, :3] = torch.tensor([1e3, 1e4, 1e5])
    theta_shape = {"gene": (genes,), "row": (1, genes), "cell": (cells, genes)}[theta]
    params = {
        "log_mean": torch.randn(cells, genes, generator=g, dtype=torch.float64) * 3,
        "log_theta": torch.randn(*theta_shape, generator=g, dtype=torch.float64) * 3,
        "logit_pi": torch.randn(cells, genes, generator=g, dtype=torch.float64) * 4,
    }
    params = {k: v.to(dtype).requires_grad_() for k, v in params.items()}
    return counts.to(dtype), params


def _value_and_grads(likelihood: str, x: torch.Tensor, params: dict[str, torch.Tensor]):
    """log_prob_cells and the gradients of a random projection of it w.r.t. each used parameter."""
    used = {k: params[k] for k in D.PARAMETERS[likelihood]}
    value = D.log_prob_cells(likelihood, x, used)
    weights = torch.linspace(0.5, 1.5, value.shape[0], dtype=value.dtype, device=value.device)  # unequal cells
    grads = torch.autograd.grad((value * weights).sum(), list(used.values()))
    return value.detach(), dict(zip(used, grads))


def _theta_cases(shapes: list[str]) -> list[tuple[str, str]]:
    """(likelihood, log_theta shape) pairs; the shape only matters where there is a log_theta."""
    return [(lik, t) for lik in D.LIKELIHOODS for t in (shapes if "log_theta" in D.PARAMETERS[lik] else shapes[:1])]


@pytest.mark.parametrize("layout", ["csr", "coo"])
@pytest.mark.parametrize(("likelihood", "theta"), _theta_cases(["gene", "row", "cell"]))
def test_sparse_aware_equals_dense_values_and_gradients(likelihood, theta, layout):
    x, params = _random_batch(37, 211, theta)
    assert 0.85 < (x == 0).double().mean() < 0.97
    dense_value, dense_grads = _value_and_grads(likelihood, x, params)
    sparse = x.to_sparse_csr() if layout == "csr" else x.to_sparse_coo()
    sparse_value, sparse_grads = _value_and_grads(likelihood, sparse, params)
    torch.testing.assert_close(sparse_value, dense_value, rtol=1e-12, atol=1e-9)
    assert dense_value[0] < 0 and torch.isfinite(dense_value).all()
    for name in dense_grads:
        assert dense_grads[name].shape == params[name].shape
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-9, atol=1e-10)


@functools.cache
def _compiled_zero_part():
    """torch.compile of dense_zero_part (training's `compile` option), or None where compilation fails here."""
    try:
        compiled = torch.compile(D.dense_zero_part, dynamic=True)
        compiled("nb", torch.zeros(2, 3), torch.zeros(3), None, True)
    except Exception:  # noqa: BLE001 - no compiler tool chain: nothing to test
        return None
    return compiled


@pytest.mark.parametrize(("likelihood", "theta"), _theta_cases(["gene", "cell"]))
def test_compiled_x0_part_equals_the_dense_sum(likelihood, theta):
    """The compile option's fused x = 0 part, in float32, against the float64 dense sum: values to float32
    precision, each gradient to 1e-5 of its largest element (eager float32 reaches 2e-6 and 3e-7 here)."""
    compiled = _compiled_zero_part()
    if compiled is None:
        pytest.skip("torch.compile does not work on this machine")
    for cells, genes in ((37, 211), (20, 150)):  # a second shape: the compiled kernel is not specialised
        x, params = _random_batch(cells, genes, theta)
        dense_value, dense_grads = _value_and_grads(likelihood, x, params)
        used = {k: params[k].detach().float().requires_grad_() for k in D.PARAMETERS[likelihood]}
        value = D.log_prob_cells(likelihood, x.float().to_sparse_csr(), used, zero_part=compiled)
        weights = torch.linspace(0.5, 1.5, value.shape[0])
        grads = dict(zip(used, torch.autograd.grad((value * weights).sum(), list(used.values()))))
        assert ((value.double() - dense_value).abs() / dense_value.abs().clamp_min(1)).max() < 1e-5
        for name, reference in dense_grads.items():
            assert (grads[name].double() - reference).abs().max() < 1e-5 * reference.abs().max(), name


def _extreme_grid(likelihood: str) -> dict[str, np.ndarray]:
    """The grid at log mean -50 / +30 and zero-inflation logits -40 / +40 (as in the test above)."""
    grid = _grid(likelihood, means=[np.exp(-50.0), np.exp(30.0)], pis=[0.25, 0.75])
    grid["log_mean"] = np.where(grid["log_mean"] < 0, -50.0, 30.0)
    if "logit_pi" in grid:
        grid["logit_pi"] = np.where(grid["logit_pi"] < 0, -40.0, 40.0)
    return grid


def _one_cell_of_all_genes(likelihood: str, grid: dict[str, np.ndarray], dtype: torch.dtype):
    """Values and gradients, dense and sparse, with the grid points as the genes of one cell."""
    x = torch.tensor(grid["x"], dtype=dtype)[None, :]
    params = {k: (v if k == "log_theta" else v[None, :]).detach().requires_grad_()
              for k, v in _params(grid, dtype).items()}
    dense_value, dense_grads = _value_and_grads(likelihood, x, params)
    sparse_value, sparse_grads = _value_and_grads(likelihood, x.to_sparse_csr(), params)
    return dense_value, dense_grads, sparse_value, sparse_grads


@pytest.mark.parametrize("arrangement", ["cells", "genes"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_sparse_aware_closed_form_derivatives_on_the_whole_grid(likelihood, dtype, arrangement):
    # The sparse path differentiates in closed form; the element-wise path by autograd through formulas whose
    # values and derivatives are checked against mpmath above. Each grid point is one cell of one gene
    # (log theta per entry) or one gene of one cell (log theta per gene: the count tables), x = 0 points
    # included (they take the x = 0 part only); extremes included.
    for grid in (_grid(likelihood), _extreme_grid(likelihood)):
        if arrangement == "genes":  # against the dense sum in float64 (float32 sums differ in their order)
            _, _, got_value, got_grads = _one_cell_of_all_genes(likelihood, grid, dtype)
            want_value, want_grads, _, _ = _one_cell_of_all_genes(likelihood, grid, torch.float64)
            wide = dtype == torch.float64
            torch.testing.assert_close(got_value.double(), want_value, rtol=1e-12 if wide else 1e-5, atol=0)
            for name, want in want_grads.items():
                got = got_grads[name].double()
                assert torch.isfinite(got).all(), f"non-finite d/d{name}"
                assert (got - want).abs().max() <= (1e-11 if wide else 1e-5) * want.abs().max(), name
            continue
        x = torch.tensor(grid["x"], dtype=dtype)[:, None]
        params = {k: v[:, None].detach().requires_grad_() for k, v in _params(grid, dtype).items()}
        dense_value, dense_grads = _value_and_grads(likelihood, x, params)
        sparse_value, sparse_grads = _value_and_grads(likelihood, x.to_sparse_csr(), params)
        assert torch.isfinite(sparse_value).all()
        # Both are sums of cancelling terms as large as x log x and mu (the theta log theta terms are summed in
        # float64): their absolute error is ~ eps * scale (a float32 count of 1e5 leaves ~1e-2 either way).
        lm = params["log_mean"].detach()
        scale = (1 + x * torch.log1p(x) + x * lm.abs() + lm.exp())[:, 0]
        eps = torch.finfo(dtype).eps
        assert ((sparse_value - dense_value).abs() <= 1e-12 * dense_value.abs() + 64 * eps * scale).all()
        # gradients also carry theta-sized terms that cancel (as in the mpmath gradient test above)
        lt = params["log_theta"].detach() if "log_theta" in params else torch.zeros_like(x)
        grad_scale = scale[:, None] + lt.exp() * (1 + lt.abs())
        for name, want in dense_grads.items():
            got = sparse_grads[name]
            assert torch.isfinite(got).all(), f"non-finite d/d{name}"
            assert ((got - want).abs() <= 1e-9 * want.abs() + 64 * eps * grad_scale).all(), name


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_sparse_aware_with_broadcast_parameters(likelihood):
    # Parameters shared across cells (shape [genes]) take the generic, non-fused x = 0 sum.
    x, params = _random_batch(11, 23, "gene", seed=4)
    shared = {k: v[0].detach().clone().requires_grad_() for k, v in params.items() if k != "log_theta"}
    shared["log_theta"] = params["log_theta"]
    dense_value, dense_grads = _value_and_grads(likelihood, x, shared)
    sparse_value, sparse_grads = _value_and_grads(likelihood, x.to_sparse_csr(), shared)
    torch.testing.assert_close(sparse_value, dense_value, rtol=1e-12, atol=1e-9)
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("likelihood", "theta"), _theta_cases(["gene", "cell"]))
def test_sparse_aware_passes_gradcheck(likelihood, theta):
    # The sparse path has a hand-written backward pass: check it against finite differences.
    x, params = _random_batch(5, 6, theta, seed=5)
    x[1, :3] = torch.tensor([1.0, 7.0, 30.0])  # moderate counts keep finite differences accurate
    x_csr = x.to_sparse_csr()
    names = D.PARAMETERS[likelihood]

    def f(*args):
        return D.log_prob_cells(likelihood, x_csr, dict(zip(names, args)))

    assert torch.autograd.gradcheck(f, tuple(params[n] for n in names))


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_sparse_aware_float32_close_to_float64(likelihood):
    x, params = _random_batch(16, 97, "gene", dtype=torch.float32, seed=3)
    x64, params64 = _random_batch(16, 97, "gene", dtype=torch.float64, seed=3)
    got, _ = _value_and_grads(likelihood, x.to_sparse_csr(), params)
    want, _ = _value_and_grads(likelihood, x64, params64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("likelihood", D.LIKELIHOODS)
def test_sparse_with_stored_zeros_and_empty_matrix(likelihood):
    x, params = _random_batch(9, 31, "gene", seed=1)
    used = {k: params[k] for k in D.PARAMETERS[likelihood]}
    dense = D.log_prob_cells(likelihood, x, used)
    # CSR that stores every entry, zeros included: the correction at a stored zero must be exactly 0.
    full = torch.sparse_csr_tensor(
        torch.arange(0, 9 * 31 + 1, 31), torch.arange(31).repeat(9), x.reshape(-1), size=x.shape
    )
    torch.testing.assert_close(D.log_prob_cells(likelihood, full, used), dense, rtol=1e-12, atol=1e-9)
    # No stored entries at all: the dense x = 0 term alone.
    empty = torch.zeros_like(x).to_sparse_csr()
    assert empty.values().numel() == 0
    torch.testing.assert_close(
        D.log_prob_cells(likelihood, empty, used), D.log_prob_cells(likelihood, torch.zeros_like(x), used)
    )


def test_sparse_aware_with_non_contiguous_decoder_outputs():
    # A decoder emitting [log_mean | logit_pi] side by side and splitting it hands over strided views.
    x, params = _random_batch(7, 19, "gene", seed=6)
    both = torch.cat([params["log_mean"], params["logit_pi"]], dim=1).detach().requires_grad_()
    transposed = params["logit_pi"].detach().t().contiguous().t().requires_grad_()  # column-major
    for log_mean, logit_pi in [both.chunk(2, dim=1), (params["log_mean"], transposed)]:
        split = {"log_mean": log_mean, "log_theta": params["log_theta"], "logit_pi": logit_pi}
        assert not (split["log_mean"].is_contiguous() and split["logit_pi"].is_contiguous())
        dense_value, dense_grads = _value_and_grads("zinb", x, split)
        sparse_value, sparse_grads = _value_and_grads("zinb", x.to_sparse_csr(), split)
        torch.testing.assert_close(sparse_value, dense_value, rtol=1e-12, atol=1e-9)
        for name in dense_grads:
            torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-9, atol=1e-10)


def test_integer_counts_are_accepted():
    x = torch.tensor([[0, 3, 12]])
    params = {"log_mean": torch.zeros(1, 3, dtype=torch.float64), "log_theta": torch.zeros(3, dtype=torch.float64)}
    expected = stats.nbinom.logpmf([0, 3, 12], 1.0, 0.5)
    np.testing.assert_allclose(D.log_prob("nb", x, params).numpy()[0], expected, rtol=1e-12)
    np.testing.assert_allclose(D.log_prob_cells("nb", x, params).numpy(), [expected.sum()], rtol=1e-12)


def test_sparse_integer_counts_and_parameter_shape_errors():
    x, params = _random_batch(5, 13, "gene", seed=2)
    used = {k: params[k] for k in D.PARAMETERS["zinb"]}
    torch.testing.assert_close(
        D.log_prob_cells("zinb", x.long().to_sparse_csr(), used), D.log_prob_cells("zinb", x, used)
    )
    with pytest.raises(ValueError, match="does not broadcast"):
        D.log_prob_cells("nb", x.to_sparse_csr(), {"log_mean": params["log_mean"], "log_theta": torch.zeros(12)})


@pytest.mark.parametrize("subset", [True, False])
def test_count_tables_match_lgamma_and_digamma(subset):
    # The per-gene tables (counts up to TABLE_COUNTS) and the lgamma/digamma step beyond them, both ways of
    # taking that step (the CPU's subset and the GPU's masked form), against scipy in float64.
    from scipy.special import digamma, gammaln

    log_theta = torch.tensor([-9.0, -2.0, 0.0, 1.5, 7.0, 13.8], dtype=torch.float64)
    x = torch.tensor([0, 1, 2, 3, 4, 5, 7, 30, 1000, 1e5] * 6, dtype=torch.float64)
    cols = torch.arange(6).repeat_interleave(10)
    ratio, slope = D._lgamma_ratio_terms(x, cols, log_theta, log_theta[cols], True, subset)
    theta = np.exp(log_theta.numpy())[cols.numpy()]
    xn = x.numpy()
    want_ratio = gammaln(xn + theta) - gammaln(theta) - gammaln(xn + 1)
    want_slope = theta * (digamma(xn + theta) - digamma(theta))
    scale = 1 + np.abs(gammaln(xn + theta)) + np.abs(gammaln(theta))  # scipy's own cancellation
    assert np.all(np.abs(ratio.numpy() - want_ratio) <= 1e-13 * scale)
    assert np.all(np.abs(slope.numpy() - want_slope) <= 1e-12 * (1 + np.abs(theta * digamma(xn + theta))))
