"""Synthetic count data sets: the review's Poisson check data, its GMVAE mixture, and single-cell-like counts.

Every generator takes a seed, draws from one numpy Generator(PCG64(seed)), and returns a cells x genes CSR matrix of
float32 counts. The only import beyond numpy/scipy is scikit-learn (with its threadpoolctl), imported lazily in
`kmeans_labels`, because the GMVAE data set's labels are by definition k-means labels (as in the review).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import brentq, linear_sum_assignment

# single_cell draws blocks of cells with about this many dense entries plus candidate events: bounds its memory.
_BLOCK_ENTRIES = 1 << 21
# Genes whose mean count (at the mean library size) exceeds this in some cell type are drawn entry by entry, the
# others by candidate events (_sparse_keys): about where the two cost the same per entry.
_DENSE_MEAN = 0.2
# Non-zero values are drawn in chunks of this many, small enough to stay in cache.
_VALUE_CHUNK = 1 << 16


@dataclass
class Simulated:
    """A simulated cells x genes CSR count matrix with labels (if any) and its true parameters."""

    X: sp.csr_matrix
    labels: np.ndarray | None
    truth: dict = field(default_factory=dict)
    batch: np.ndarray | None = None  # each cell's batch name, when the data set has batches

    def truth_json(self) -> dict:
        """The true parameters as plain lists and numbers, ready for json.dump."""
        return {key: np.asarray(value).tolist() for key, value in self.truth.items()}


def _rng(seed: int) -> np.random.Generator:
    """The one random generator every data set draws from."""
    return np.random.Generator(np.random.PCG64(seed))


def _positive(name: str, value: int) -> None:
    """Raise ValueError unless value is a positive integer."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def poisson_check(n_cells: int = 2000, n_features: int = 10, seed: int = 0) -> Simulated:
    """The review's check data: feature j ~ Poisson(rate j+1), rates 1..10; truth['rates']."""
    _positive("n_cells", n_cells)
    _positive("n_features", n_features)
    rates = np.arange(1, n_features + 1, dtype=np.float64)
    counts = _rng(seed).poisson(rates, size=(n_cells, n_features))
    return Simulated(sp.csr_matrix(counts.astype(np.float32)), None, {"rates": rates})


def kmeans_labels(X: sp.spmatrix | np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means cluster ids (0..k-1) of log1p counts, scikit-learn, n_init=10, random_state=seed."""
    from sklearn.cluster import KMeans  # lazy: the only non-numpy/scipy dependency of this module
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

    dense = X.toarray() if sp.issparse(X) else np.asarray(X)
    with threadpool_limits(limits=1):  # one thread: the same labels on any machine, and no thread start-up cost
        return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(np.log1p(dense))


def _match(labels: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Renumber cluster ids so that cluster i overlaps reference class i as much as possible (Hungarian)."""
    overlap = np.zeros((k, k), dtype=np.int64)
    np.add.at(overlap, (labels, reference), 1)
    rows, cols = linear_sum_assignment(-overlap)
    mapping = np.empty(k, dtype=np.int64)
    mapping[rows] = cols
    return mapping[labels]


def gmvae_mixture(n_cells: int = 10000, n_features: int = 10, n_clusters: int = 5, seed: int = 0,
                  fold: float = 8.0) -> Simulated:
    """The review's GMVAE data: counts from a mixture, labels from k-means (k=n_clusters) as the review did.

    Component k has Poisson rates b_j (b_j ~ U(1, 3)) times `fold` on its own features (j % n_clusters == k);
    components are drawn with equal probability. labels are the k-means clusters ("cluster0", ...) renumbered to
    match the components they overlap most. truth: 'components' (per cell), 'rates' (k x features), 'weights'.
    """
    _positive("n_cells", n_cells)
    _positive("n_features", n_features)
    _positive("n_clusters", n_clusters)
    if n_clusters > n_features:
        raise ValueError(f"n_clusters ({n_clusters}) must not exceed n_features ({n_features})")
    if n_clusters > n_cells:
        raise ValueError(f"n_clusters ({n_clusters}) must not exceed n_cells ({n_cells})")
    if not fold > 1:
        raise ValueError(f"fold must be > 1, got {fold!r}")
    rng = _rng(seed)
    base = rng.uniform(1.0, 3.0, size=n_features)
    own = np.arange(n_features)[None, :] % n_clusters == np.arange(n_clusters)[:, None]
    rates = base * np.where(own, fold, 1.0)
    weights = np.full(n_clusters, 1.0 / n_clusters)
    components = rng.choice(n_clusters, size=n_cells, p=weights)
    X = sp.csr_matrix(rng.poisson(rates[components]).astype(np.float32))
    clusters = _match(kmeans_labels(X, n_clusters, seed), components, n_clusters)
    labels = np.array([f"cluster{c}" for c in range(n_clusters)])[clusters]
    return Simulated(X, labels, {"components": components, "rates": rates, "weights": weights})


def _zero_fraction(scale: float, size_quantiles: np.ndarray, type_weights: np.ndarray,
                   proportions: np.ndarray, theta: np.ndarray) -> float:
    """Expected fraction of zeros when cell c of type t has NB mean scale * s_c * proportions[t] (quadrature in s)."""
    ratio = proportions / theta
    total = 0.0
    for s in size_quantiles:  # one quantile at a time: types x genes temporaries only
        p0 = np.exp(-theta * np.log1p(scale * s * ratio))  # NB P(X=0) = (theta / (theta + mu))^theta
        total += float(type_weights @ p0.mean(axis=1))
    return total / size_quantiles.size


def _positive_nb(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Draw X ~ NB(mean mu, inverse dispersion theta) conditioned on X > 0 (zero-truncated), elementwise."""
    out = np.ones(mu.size, dtype=np.int64)
    # X = 1 or X >= 2: P(X=1 | X>0) = P(X=1) / (1 - P(X=0)), P(X=1) = P(X=0) mu / (1 + mu/theta); float32
    mu32, theta32 = mu.astype(np.float32), theta.astype(np.float32)
    ratio = mu32 / theta32
    log_p0 = np.log1p(ratio)
    log_p0 *= -theta32
    ratio += 1.0
    p1 = np.exp(log_p0) * mu32 / ratio
    positive = -np.expm1(log_p0)
    more = np.flatnonzero(rng.random(mu.size, dtype=np.float32) * positive >= p1)
    if not more.size:
        return out
    # X >= 2 (a minority): drawn from NB | X >= 2 in float64
    mu, theta = mu[more].astype(np.float64), theta[more].astype(np.float64)
    log_p0 = -theta * np.log1p(mu / theta)
    big = (mu >= 5.0) & (log_p0 <= -np.log(2.0))
    # large means with P(X=0) <= 1/2: rejection from the gamma-Poisson mixture (P(X >= 2) is above ~1/2 there)
    todo = np.flatnonzero(big)
    while todo.size:
        x = rng.poisson(rng.gamma(theta[todo], mu[todo] / theta[todo]))
        out[more[todo[x >= 2]]] = x[x >= 2]
        todo = todo[x < 2]
    # the rest: invert the CDF from k = 2, summing the pmf upwards (few steps: small means);
    # P(X=0) >= exp(-mu) keeps P(X=1) = P(X=0) theta q from underflowing
    ids = np.flatnonzero(~big)
    theta, q, log_p0 = theta[ids], mu[ids] / (mu[ids] + theta[ids]), log_p0[ids]
    pmf = np.exp(log_p0) * theta * q  # P(X = 1)
    tail = -np.expm1(log_p0) - pmf  # P(X >= 2)
    target = rng.random(ids.size) * tail
    pmf *= (1.0 + theta) / 2.0 * q  # P(X = 2)
    cum = pmf.copy()
    out[more[ids]] = 2
    k = 2
    active = np.flatnonzero(cum < target)
    while active.size:
        k += 1
        th, qa = theta[active], q[active]
        pmf[active] *= (k - 1 + th) / k * qa  # P(X=k) / P(X=k-1)
        cum[active] += pmf[active]
        out[more[ids[active]]] = k
        # also stop once the mass beyond k is negligible, so rounding can never make this loop for ever:
        # P(X=j+1)/P(X=j) <= r = max(ratio at k, q) for all j >= k, so P(X > k) <= P(X=k) r / (1 - r)
        r = np.maximum((k + th) / (k + 1) * qa, qa)
        keep = (cum[active] < target[active]) & (pmf[active] * r >= 1e-12 * (1 - r) * tail[active])
        active = active[keep]
    return out


def _alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table: index i with probability weights[i] / sum in O(1) per draw (see _alias_draw)."""
    n = weights.size
    accept = weights * (n / weights.sum())
    alias = np.arange(n)
    small, large = list(np.flatnonzero(accept < 1.0)), list(np.flatnonzero(accept >= 1.0))
    while small and large:
        i, j = small.pop(), large[-1]
        alias[i] = j  # slot i: keep i with probability accept[i], else give j the rest of the slot
        accept[j] -= 1.0 - accept[i]
        if accept[j] < 1.0:
            small.append(large.pop())
    accept[small + large] = 1.0  # what is left is full up to rounding
    return accept, alias


def _alias_draw(rng: np.random.Generator, table: tuple[np.ndarray, np.ndarray], size: int) -> np.ndarray:
    """size draws from an _alias_table."""
    accept, alias = table
    slot = rng.integers(0, accept.size, size=size)
    return np.where(rng.random(size) < accept[slot], slot, alias[slot])


def _sparse_keys(rng: np.random.Generator, sizes: np.ndarray, p: np.ndarray, theta: np.ndarray) -> tuple:
    """Rows and genes of non-zero NB counts in cells (library sizes `sizes`) of one type, genes with small means.

    Entry (c, g) must be non-zero with probability 1 - exp(-lam_cg), lam_cg = -log P(X=0) = theta_g
    log1p(mu_cg / theta_g) <= mu_cg = L_c p_g. Candidate events, Poisson(mu_cg) per entry (Poisson(p_g sum L)
    per gene, each in cell c with probability L_c / sum L), each kept with probability lam_cg / mu_cg, leave
    Poisson(lam_cg) events per entry: none with probability exp(-lam_cg), exactly. The work is in proportion to
    the expected counts, about the number of non-zeros, not to the entries. Rows may repeat (several events).
    """
    gene = np.repeat(np.arange(p.size), rng.poisson(p * sizes.sum()))
    row = _alias_draw(rng, _alias_table(sizes), gene.size)
    mu, th = sizes[row] * p[gene], theta[gene]
    kept = rng.random(gene.size) * mu < th * np.log1p(mu / th)
    return row[kept], gene[kept]


def _nb_counts(rng: np.random.Generator, library_sizes: np.ndarray, types: np.ndarray, proportions: np.ndarray,
               theta: np.ndarray, expected_nnz: float) -> sp.csr_matrix:
    """CSR counts x_cg ~ NB(library_sizes[c] proportions[types[c], g], theta_g), drawn in blocks of cells."""
    n_cells, n_genes = library_sizes.size, proportions.shape[1]
    # genes with a large mean in some type: one uniform per entry; the others: candidate events (_sparse_keys)
    is_dense = proportions.max(axis=0) * library_sizes.mean() > _DENSE_MEAN
    dense, sparse = np.flatnonzero(is_dense), np.flatnonzero(~is_dense)
    dense_ratio32 = (proportions[:, dense] / theta[dense]).astype(np.float32)  # mu / theta per unit library size
    dense_neg_theta32 = (-theta[dense]).astype(np.float32)
    sparse_p, sparse_theta = proportions[:, sparse], theta[sparse]
    flat_proportions = proportions.ravel()
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    data = np.empty(int(1.02 * expected_nnz) + 4096, dtype=np.float32)
    cols = np.empty(data.size, dtype=np.int32)
    nnz = 0
    events_per_cell = library_sizes.mean() * sparse_p.sum(axis=1).max()
    rows_per_block = max(1, int(_BLOCK_ENTRIES // (dense.size + events_per_cell + 1)))
    for start in range(0, n_cells, rows_per_block):
        stop = min(start + rows_per_block, n_cells)
        sizes, block_types = library_sizes[start:stop], types[start:stop]
        # dense genes: X = 0 iff u < P(X=0) iff log u < -theta log1p(mu / theta); float32, in place
        log_p0 = dense_ratio32[block_types]
        log_p0 *= sizes.astype(np.float32)[:, None]
        np.log1p(log_p0, out=log_p0)
        log_p0 *= dense_neg_theta32
        log_u = rng.random(log_p0.shape, dtype=np.float32)
        with np.errstate(divide="ignore"):  # u = 0 gives -inf: a zero, as it should
            np.log(log_u, out=log_u)
        row, column = np.divmod(np.flatnonzero(log_u >= log_p0), dense.size)
        del log_p0, log_u
        keys = [row * n_genes + dense[column]]
        for t in np.unique(block_types):
            cells = np.flatnonzero(block_types == t)
            row, gene = _sparse_keys(rng, sizes[cells], sparse_p[t], sparse_theta)
            keys.append(cells[row] * n_genes + sparse[gene])
        keys = np.sort(np.concatenate(keys))
        keys = keys[np.append(True, keys[1:] != keys[:-1])] if keys.size else keys  # one non-zero per entry
        row, col = np.divmod(keys, n_genes)  # sorted keys: row-major, columns sorted within each row
        end = nnz + keys.size
        if end > data.size:  # more non-zeros than expected: grow the buffers
            size = max(end, int(1.25 * data.size))
            data, cols = np.resize(data, size), np.resize(cols, size)
        mu = sizes[row] * flat_proportions.take(block_types[row] * n_genes + col)
        th = theta.take(col)
        for first in range(0, keys.size, _VALUE_CHUNK):
            chunk = slice(first, first + _VALUE_CHUNK)
            data[nnz + first: nnz + first + mu[chunk].size] = _positive_nb(rng, mu[chunk], th[chunk])
        cols[nnz:end] = col
        indptr[start + 1: stop + 1] = nnz + np.cumsum(np.bincount(row, minlength=stop - start))
        nnz = end
    return sp.csr_matrix((data[:nnz], cols[:nnz], indptr), shape=(n_cells, n_genes))


STATE_LEVELS = 8  # steps of the hard simulation's continuous cell state


def single_cell(n_cells: int = 5000, n_genes: int = 2000, n_types: int = 6, seed: int = 0,
                sparsity: float = 0.9, n_markers: int | None = None, fold: tuple[float, float] = (5.0, 10.0),
                gene_sd: float = 1.5, library_sd: float = 0.4, dispersion_median: float = 2.0,
                dispersion_sd: float = 0.75, batches: int = 1, batch_sd: float = 0.5,
                batch_depth: tuple[float, ...] | None = None, hard: bool = False) -> Simulated:
    """Single-cell-like NB counts: cell types with marker genes, heavy-tailed means, library sizes, ~90% zeros.

    Gene log-means ~ N(0, gene_sd^2); each type multiplies its own n_markers genes (default: 5% of the genes, at
    least 50, as many as fit; disjoint between types) by a fold change log-uniform in `fold`; rows are normalised
    to proportions p[t]. Cell c of type t has library size L_c = L0 exp(N(0, library_sd^2)) and counts
    x_cg ~ NB(mean L_c p[t, g], inverse dispersion theta_g), theta_g log-normal around dispersion_median
    (Var = mu + mu^2 / theta). L0 is solved so that the expected fraction of zeros equals `sparsity`. Cells are
    drawn in blocks and only non-zeros are kept, so no dense cells x genes matrix is ever formed (_nb_counts).
    labels "type0", ...; truth: 'types', 'type_proportions' (types x genes), 'library_sizes' (L_c),
    'inverse_dispersion' (theta_g), 'marker_genes' (types x n_markers), 'type_weights'.

    batches > 1 adds a known batch effect: each cell is in batch b (uniformly), and in batch b >= 1 every gene's
    mean is multiplied by a factor exp(N(0, batch_sd^2)) drawn per batch and gene (rows renormalised), and the
    library sizes by batch_depth[b] (default 1); batch 0 is the reference, so 'type_proportions' are the
    batch-free means (those of batch 0). Extra truth: 'batches' (codes), 'batch_factors' (batches x genes,
    row 0 all ones), 'batch_type_proportions' (batches x types x genes); `batch` holds "batch0", ... per cell.

    hard=True makes the types harder to find, as real data are (the clustering study's set): type shares
    unequal, proportional to 1, 1/2, 1/3, ... (Zipf); library sizes spread twice as wide (library_sd doubled);
    and a continuous cell state unrelated to type, s_c ~ U(-1, 1) in STATE_LEVELS steps, that multiplies the
    mean of 10% of the genes (markers included) by exp(s_c e_g), e_g ~ N(0, 1). Extra truth: 'cell_state'
    (s_c), 'state_genes', 'state_effect' (e_g); 'type_proportions' are those at s = 0.
    """
    for name, value in (("n_cells", n_cells), ("n_genes", n_genes), ("n_types", n_types), ("batches", batches)):
        _positive(name, value)
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must lie strictly between 0 and 1, got {sparsity!r}")
    if n_markers is None:
        n_markers = max(1, min(max(round(0.05 * n_genes), 50), n_genes // n_types))
    if n_markers < 0 or n_types * n_markers > n_genes:
        raise ValueError(f"{n_types} types x {n_markers} marker genes do not fit in {n_genes} genes")
    if not 1.0 <= fold[0] <= fold[1]:
        raise ValueError(f"fold must be an interval (low, high) with 1 <= low <= high, got {fold!r}")
    rng = _rng(seed)

    log_means = np.tile(rng.normal(0.0, gene_sd, size=n_genes), (n_types, 1))
    markers = rng.permutation(n_genes)[: n_types * n_markers].reshape(n_types, n_markers)
    log_fold = rng.uniform(np.log(fold[0]), np.log(fold[1]), size=markers.shape)
    np.add.at(log_means, (np.arange(n_types)[:, None], markers), log_fold)
    proportions = np.exp(log_means - log_means.max(axis=1, keepdims=True))
    proportions /= proportions.sum(axis=1, keepdims=True)
    theta = dispersion_median * np.exp(rng.normal(0.0, dispersion_sd, size=n_genes))
    type_weights = rng.dirichlet(np.full(n_types, 10.0))
    if hard:
        type_weights = 1.0 / np.arange(1, n_types + 1)
        type_weights /= type_weights.sum()
        library_sd = 2.0 * library_sd
    types = rng.choice(n_types, size=n_cells, p=type_weights)
    size_factors = np.exp(rng.normal(0.0, library_sd, size=n_cells))
    # "groups" of cells that share their mean proportions: the types, or (hard) the (type, state step) pairs
    groups, group_p = types, proportions
    labels = np.array([f"type{t}" for t in range(n_types)])[types]
    truth = {"types": types, "type_proportions": proportions, "inverse_dispersion": theta, "marker_genes": markers,
             "type_weights": type_weights}
    if hard:
        srng = np.random.Generator(np.random.PCG64([seed, 2]))  # its own stream: the types stay as without it
        steps = np.linspace(-1.0, 1.0, STATE_LEVELS)
        level = srng.integers(0, STATE_LEVELS, size=n_cells)
        state_genes = srng.permutation(n_genes)[: max(1, n_genes // 10)]
        effect = srng.normal(0.0, 1.0, size=state_genes.size)
        shift = np.zeros((STATE_LEVELS, n_genes))
        shift[:, state_genes] = steps[:, None] * effect[None, :]
        group_p = proportions[:, None, :] * np.exp(shift)[None, :, :]
        group_p = (group_p / group_p.sum(axis=2, keepdims=True)).reshape(-1, n_genes)
        groups = types * STATE_LEVELS + level
        truth.update(cell_state=steps[level], state_genes=state_genes, state_effect=effect)

    # solve the library-size scale L0 on the realised cells: their group counts and library-size quantiles
    realised = np.bincount(groups, minlength=group_p.shape[0]) / n_cells
    n_quantiles = min(n_cells, 16)
    quantiles = np.quantile(size_factors, (np.arange(n_quantiles) + 0.5) / n_quantiles)
    gap = lambda log_scale: _zero_fraction(np.exp(log_scale), quantiles, realised, group_p, theta) - sparsity
    scale = float(np.exp(brentq(gap, np.log(1e-6), np.log(1e12), xtol=1e-3)))
    library_sizes = scale * size_factors
    truth["library_sizes"] = library_sizes
    if batches == 1:
        X = _nb_counts(rng, library_sizes, groups, group_p, theta,
                       expected_nnz=(1 - sparsity) * n_cells * n_genes)
        return Simulated(X, labels, truth)
    # a separate stream for the batch effect: the batch-free part is drawn exactly as without batches
    brng = np.random.Generator(np.random.PCG64([seed, 1]))
    depth = np.ones(batches) if batch_depth is None else np.asarray(batch_depth, dtype=float)
    if depth.shape != (batches,) or not (depth > 0).all():
        raise ValueError(f"batch_depth must give {batches} positive factors, got {batch_depth!r}")
    factors = np.exp(brng.normal(0.0, batch_sd, size=(batches, n_genes)))
    factors[0] = 1.0
    batch_p = proportions[None, :, :] * factors[:, None, :]
    batch_p /= batch_p.sum(axis=2, keepdims=True)
    batch_group_p = group_p[None, :, :] * factors[:, None, :]
    batch_group_p /= batch_group_p.sum(axis=2, keepdims=True)
    cell_batch = brng.integers(0, batches, size=n_cells)
    library_sizes = library_sizes * depth[cell_batch]
    # (batch, group) pairs as the "types" of _nb_counts: row b * n_groups + g of the stacked proportions
    X = _nb_counts(rng, library_sizes, cell_batch * group_p.shape[0] + groups, batch_group_p.reshape(-1, n_genes),
                   theta, expected_nnz=(1 - sparsity) * n_cells * n_genes)
    truth.update(library_sizes=library_sizes, batches=cell_batch, batch_factors=factors,
                 batch_type_proportions=batch_p)
    return Simulated(X, labels, truth, np.array([f"batch{b}" for b in range(batches)])[cell_batch])
