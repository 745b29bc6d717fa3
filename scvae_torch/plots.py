"""The paper's figures, one function per figure, each drawn from result files and saved as PNG (150 dpi) and PDF.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend state), so it runs headless.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io.atomic import atomic_path

DPI = 150
MAX_POINTS = 5000  # cells drawn per scatter panel (a seeded subsample beyond this)


def float32_underflow_levels() -> dict[str, float]:
    """B above which exp(-B) leaves float32's normal range, and above which it is below the smallest subnormal."""
    info = np.finfo(np.float32)
    return {"normal": float(-np.log(np.float64(info.tiny))),
            "subnormal": float(-np.log(np.float64(info.smallest_subnormal)))}


def save(fig: Figure, png: str, pdf: str | None = None, dpi: int = DPI) -> None:
    """Write a figure as PNG (and PDF) through temporary files renamed into place."""
    FigureCanvasAgg(fig)
    for path, fmt in ((png, "png"), (pdf, "pdf")):
        if not path:
            continue
        with atomic_path(path, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=_metadata(fmt))


def _metadata(fmt: str) -> dict:
    """No creation dates in the files, so the same results give byte-identical figures."""
    return {"CreationDate": None} if fmt == "pdf" else {"Software": None}


def read_history(path: str) -> pd.DataFrame:
    """history.tsv of a run (one row per epoch)."""
    return pd.read_csv(path, sep="\t")


def _history_of(run_path: str) -> pd.DataFrame:
    """History of a run given its folder, its metrics.json or its history.tsv."""
    p = Path(run_path)
    if p.is_dir():
        p = p / "history.tsv"
    elif p.name != "history.tsv":
        p = p.parent / "history.tsv"
    return read_history(str(p))


def _robust_ylim(ax: Axes, values: list[np.ndarray]) -> None:
    """Keep the first epochs' very low ELBOs from squashing the rest of a curve."""
    allv = np.concatenate([v[np.isfinite(v)] for v in values if len(v)]) if values else np.array([])
    if allv.size < 4:
        return
    lo, hi = np.percentile(allv, [5, 100])
    pad = 0.05 * (hi - lo if hi > lo else abs(hi) + 1)
    ax.set_ylim(lo - pad, hi + pad)


def _curves(ax: Axes, h: pd.DataFrame, term: str, title: str) -> None:
    """Train (dashed) and validation (solid) curves of one ELBO term per epoch."""
    shown = []
    for split, style in (("train", "--"), ("val", "-")):
        col = f"{split}_{term}"
        if col in h:
            ax.plot(h["epoch"], h[col], style, label="validation" if split == "val" else "train")
            shown.append(h[col].to_numpy(dtype=float))
    ax.set_title(title)
    ax.set_xlabel("epoch")
    if term == "elbo":
        _robust_ylim(ax, shown)
    ax.legend(fontsize=8)


def figure2(history: str, feature_means: str, truth: str, png: str, pdf: str | None = None) -> Figure:
    """Figure 2: VAE (Poisson) on the check data - ELBO, log-likelihood, KL per epoch; learned vs true rates.

    truth is the simulation's truth JSON (as `scvae-torch simulate` writes it: truth['truth']['rates']).
    """
    h = _history_of(history)
    means = pd.read_csv(feature_means, sep="\t")
    rates = np.asarray(json.loads(Path(truth).read_text())["truth"]["rates"], dtype=float)
    fig = Figure(layout="constrained", figsize=(13, 3.4))
    axes = fig.subplots(1, 4)
    _curves(axes[0], h, "elbo", "ELBO per cell")
    _curves(axes[1], h, "log_lik", "log-likelihood per cell")
    _curves(axes[2], h, "kl_z", "KL(q(z|x) || p(z))")
    ax = axes[3]
    x = np.arange(len(rates))
    ax.bar(x - 0.2, rates, 0.4, label="true rate", color="0.6")
    ax.bar(x + 0.2, means["decoded_mean"].to_numpy(), 0.4, label="learned (decoder mean)", color="C0")
    ax.plot(x, means["observed_mean"].to_numpy(), "k.", label="observed mean (test)")
    ax.set_xticks(x, [str(i + 1) for i in x])
    ax.set_xlabel("feature")
    ax.set_title("learned vs true Poisson rates")
    ax.legend(fontsize=8)
    fig.suptitle("VAE, Poisson likelihood, on the synthetic check data")
    save(fig, png, pdf)
    return fig


def figure3(history: str, png: str, pdf: str | None = None, title: str | None = None) -> Figure:
    """Figure 3: per epoch, B = sum of predicted rates over zero counts (per cell) and the largest rate."""
    h = _history_of(history)
    levels = float32_underflow_levels()
    fig = Figure(layout="constrained", figsize=(10, 3.6))
    ax_b, ax_max = fig.subplots(1, 2)
    ax_b.plot(h["epoch"], h["val_zero_rate_sum"], "o-", ms=3, label="B (validation, mean per cell)")
    ax_b.axhline(levels["normal"], color="C3", ls="--",
                 label=f"exp(-B) below float32 normal range (B > {levels['normal']:.1f})")
    ax_b.axhline(levels["subnormal"], color="C3", ls=":",
                 label=f"exp(-B) underflows to 0 in float32 (B > {levels['subnormal']:.1f})")
    _auto_log(ax_b, np.r_[h["val_zero_rate_sum"].to_numpy(dtype=float), levels["subnormal"]])
    ax_b.set_xlabel("epoch")
    ax_b.set_title("B = sum of rates over zero-count entries")
    ax_b.legend(fontsize=7)
    ax_max.plot(h["epoch"], h["val_max_rate"], "o-", ms=3, color="C1")
    _auto_log(ax_max, h["val_max_rate"].to_numpy(dtype=float))
    ax_max.set_xlabel("epoch")
    ax_max.set_title("largest predicted rate (validation)")
    fig.suptitle(title or "Poisson stability: log-likelihood computed from log-rates stays finite")
    save(fig, png, pdf)
    return fig


def _auto_log(ax: Axes, values: np.ndarray) -> None:
    """Log-scale the y axis when the positive values span more than a factor of 30."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size and v.max() / v.min() > 30:
        ax.set_yscale("log")


def learning_curves(histories: dict[str, str], png: str, pdf: str | None = None, title: str | None = None) -> Figure:
    """Learning curves per likelihood: validation (solid) and training (dashed) ELBO per epoch of each model.

    histories maps run names 'MODEL-LIKELIHOOD' to run folders, metrics.json or history.tsv paths.
    """
    runs = {name: _history_of(path) for name, path in histories.items()}
    likelihoods = list(dict.fromkeys(name.split("-", 1)[1] for name in runs))
    models = list(dict.fromkeys(name.split("-", 1)[0] for name in runs))
    fig = Figure(layout="constrained", figsize=(3.6 * max(len(likelihoods), 1), 3.4))
    axes = np.atleast_1d(fig.subplots(1, max(len(likelihoods), 1)))
    for ax, lik in zip(axes, likelihoods):
        shown = []
        for name, h in runs.items():
            model, run_lik = name.split("-", 1)
            if run_lik != lik:
                continue
            color = f"C{models.index(model) % 10}"
            ax.plot(h["epoch"], h["val_elbo"], "-", color=color, label=f"{model} validation")
            ax.plot(h["epoch"], h["train_elbo"], "--", color=color, alpha=0.6, label=f"{model} train")
            shown += [h["val_elbo"].to_numpy(dtype=float), h["train_elbo"].to_numpy(dtype=float)]
        _robust_ylim(ax, shown)
        ax.set_title(lik)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ELBO per cell")
    fig.suptitle(title or "learning curves")
    save(fig, png, pdf)
    return fig


def _subsample(n: int, seed: int = 0) -> np.ndarray:
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_POINTS, replace=False))


def _pca2(Z: np.ndarray) -> np.ndarray:
    """First two principal components of the rows of Z (zeros where Z has fewer dimensions)."""
    Z = np.asarray(Z, dtype=np.float64)
    Z = Z - Z.mean(0)
    _, _, vt = np.linalg.svd(Z, full_matrices=False)
    out = np.zeros((Z.shape[0], 2))
    k = min(2, vt.shape[0])
    out[:, :k] = Z @ vt[:k].T
    return out


def _scatter(ax: Axes, xy: np.ndarray, groups: np.ndarray, title: str) -> None:
    """Scatter coloured by category (legend when there are few)."""
    names = pd.unique(pd.Series(groups).astype(str))
    for i, name in enumerate(sorted(names, key=lambda s: (len(s), s))):
        mask = np.asarray(groups).astype(str) == name
        color = f"C{i % 10}" if len(names) <= 10 else _tab20(i)
        ax.scatter(xy[mask, 0], xy[mask, 1], s=3, color=color, label=name, rasterized=True, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(names) <= 12:
        ax.legend(fontsize=6, markerscale=3, loc="best", frameon=False)


def _tab20(i: int):
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def latent_space(latents: dict[str, str], assignments: str, png: str, pdf: str | None = None,
                 title: str | None = None) -> Figure:
    """PCA of each run's latent (obsm['X_scvae']), coloured by label (if any) and by cluster.

    Clusters: the GMVAE's own (latent.h5ad's scvae_cluster), else the run's column in assignments.tsv (k-means
    on the latent).
    """
    import anndata as ad

    assign = pd.read_csv(assignments, sep="\t", dtype={"cell": str})
    has_labels = "label" in assign
    rows = ["label", "cluster"] if has_labels else ["cluster"]
    fig = Figure(layout="constrained", figsize=(3.2 * len(latents), 3.1 * len(rows)))
    axes = np.asarray(fig.subplots(len(rows), len(latents), squeeze=False))
    for j, (run, path) in enumerate(latents.items()):
        adata = ad.read_h5ad(path)
        pick = _subsample(adata.n_obs)
        xy = _pca2(adata.obsm["X_scvae"][pick])
        clusters = (adata.obs["scvae_cluster"].to_numpy()[pick] if "scvae_cluster" in adata.obs
                    else assign[run].to_numpy()[pick])
        how = "GMVAE cluster" if "scvae_cluster" in adata.obs else "k-means cluster"
        if has_labels:
            _scatter(axes[0, j], xy, assign["label"].to_numpy()[pick], f"{run}: label")
        _scatter(axes[-1, j], xy, clusters, f"{run}: {how}")
    fig.suptitle(title or "latent space (PCA of latent means)")
    save(fig, png, pdf)
    return fig


def integration(embeddings: dict[str, str], png: str, pdf: str | None = None) -> Figure:
    """Batch correction per data set: PCA of each method's embedding, coloured by batch and by cell type.

    embeddings maps each data set to the embeddings.h5ad of its integration scores
    (`scvae_torch.integration.compare`: obs 'batch' and 'label', one obsm entry per method, uns 'methods').
    One row per (data set, method): batch on the left, cell type on the right.
    """
    import anndata as ad

    panels = []
    for dataset, path in embeddings.items():
        adata = ad.read_h5ad(path)
        pick = _subsample(adata.n_obs)
        for method in adata.uns["methods"]:
            panels.append((f"{dataset}: {method}", _pca2(adata.obsm[method][pick]),
                           adata.obs["batch"].to_numpy()[pick], adata.obs["label"].to_numpy()[pick]))
    fig = Figure(layout="constrained", figsize=(6.4, 3.0 * max(len(panels), 1)))
    axes = np.asarray(fig.subplots(max(len(panels), 1), 2, squeeze=False))
    for row, (name, xy, batch, label) in enumerate(panels):
        _scatter(axes[row, 0], xy, batch, f"{name}: batch")
        _scatter(axes[row, 1], xy, label, f"{name}: cell type")
    fig.suptitle("batch correction (PCA of each embedding)")
    save(fig, png, pdf)
    return fig


def figure5(scores: str, latents: dict[str, str], png: str, pdf: str | None = None) -> Figure:
    """Figure 5: GMVAE y-regularisation ablation - ARI of the clusters and mean q(y|x) per component.

    scores is the data set's clustering scores.tsv; latents maps each regularisation (none, kl, supervised)
    to that run's latent.h5ad (obsm['scvae_responsibilities'] = q(y|x)).
    """
    import anndata as ad

    table = pd.read_csv(scores, sep="\t")
    table = table[table["method"] == "gmvae_clusters"]
    fig = Figure(layout="constrained", figsize=(10, 3.6))
    ax_ari, ax_prob = fig.subplots(1, 2)
    regs = list(latents)
    ari = [float(table.loc[table["y_regularisation"] == r, "ari"].iloc[0]) for r in regs]
    ax_ari.bar(regs, ari, color=[f"C{i}" for i in range(len(regs))])
    for i, v in enumerate(ari):
        ax_ari.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax_ari.set_ylim(min(0.0, min(ari)) - 0.05, 1.05)
    ax_ari.set_ylabel("ARI (test cells)")
    ax_ari.set_xlabel("y regularisation")
    ax_ari.set_title("GMVAE clusters vs k-means labels")
    width = 0.8 / max(len(regs), 1)
    for i, (reg, path) in enumerate(latents.items()):
        adata = ad.read_h5ad(path)
        test = (adata.obs["subset"] == "test").to_numpy()
        q = np.asarray(adata.obsm["scvae_responsibilities"])[test]
        mean_q = np.sort(q.mean(0))[::-1]
        x = np.arange(mean_q.size)
        ax_prob.bar(x + (i - (len(regs) - 1) / 2) * width, mean_q, width, label=reg, color=f"C{i}")
    ax_prob.set_xlabel("component (sorted by mean probability)")
    ax_prob.set_ylabel("mean q(y|x) over test cells")
    ax_prob.set_title("class probabilities")
    ax_prob.legend(fontsize=8, title="y regularisation", title_fontsize=8)
    fig.suptitle("GMVAE ablation: no y-regularisation vs KL vs cross-entropy with the true labels")
    save(fig, png, pdf)
    return fig


def benchmark(table: str, png: str, pdf: str | None = None) -> Figure:
    """The real-data benchmark: test ELBO per cell (likelihood models) and ARI on test cells, per data set.

    table is results/tables/benchmark.tsv; one group of bars per data set, one bar per method and likelihood
    (ELBO) or per method and clustering (ARI).
    """
    t = pd.read_csv(table, sep="\t")
    datasets = list(dict.fromkeys(t["dataset"]))
    # ELBOs of different data sets differ by orders of magnitude: each is drawn relative to its data set's best
    t["elbo_gap"] = t["test_elbo"] - t.groupby("dataset")["test_elbo"].transform("max")
    fig = Figure(layout="constrained", figsize=(max(8.0, 3.2 * len(datasets)), 7.0))
    ax_elbo, ax_ari = fig.subplots(2, 1)
    panels = [
        (ax_elbo, t[t["test_elbo"].notna()], lambda r: f"{r.method} {r.likelihood}", "elbo_gap",
         "test ELBO per cell\nminus the data set's best"),
        (ax_ari, t[t["ari"].notna()], lambda r: f"{r.method}: {r.clustering}" + (
            f" ({r.likelihood})" if r.likelihood != "-" else ""), "ari", "ARI on test cells"),
    ]
    for ax, rows, name, column, label in panels:
        keys = list(dict.fromkeys(name(r) for r in rows.itertuples()))
        width = 0.8 / max(len(keys), 1)
        for i, key in enumerate(keys):
            values = [next((getattr(r, column) for r in rows.itertuples() if r.dataset == d and name(r) == key),
                           np.nan) for d in datasets]
            x = np.arange(len(datasets)) + (i - (len(keys) - 1) / 2) * width
            ax.bar(x, values, width, label=key, color=_tab20(i))
        ax.set_xticks(np.arange(len(datasets)), datasets)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncols=2, loc="best")
    ax_ari.set_ylim(min(0.0, float(t["ari"].min())) - 0.05 if t["ari"].notna().any() else 0, 1.05)
    fig.suptitle("scvae-torch against scVI and the scanpy route (same genes and split)")
    save(fig, png, pdf)
    return fig
