"""Count thresholds, gene selection by binomial deviance, and the data set's summary (Table 1 row)."""

from __future__ import annotations

import logging
import re

import numpy as np

from .. import genes as _genes
from .validation import Counts, _error

log = logging.getLogger(__name__)


def filter_counts(counts: Counts, min_counts_cell: int = 0, min_counts_gene: int = 0, source: str = "") -> Counts:
    """Drop cells, then genes, whose total count is below the given minimum; logs what was dropped."""
    X, cells, genes, labels, gene_ids = counts.X, counts.cells, counts.genes, counts.labels, counts.gene_ids
    batch = counts.batch
    keep = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel() >= min_counts_cell
    if not keep.all():
        X, cells = X[keep], cells[keep]
        labels = None if labels is None else labels[keep]
        batch = None if batch is None else batch[keep]
    _report_dropped(source, "cells", keep, min_counts_cell)
    keep = np.asarray(X.sum(axis=0, dtype=np.float64)).ravel() >= min_counts_gene
    if not keep.all():
        cols = np.flatnonzero(keep)
        X, genes = X[:, cols], genes[cols]
        gene_ids = None if gene_ids is None else gene_ids[cols]
    _report_dropped(source, "genes", keep, min_counts_gene)
    _check_left(source, X.shape[0], X.shape[1], min_counts_cell, min_counts_gene)
    return Counts(X=X, genes=genes, cells=cells, labels=labels, gene_ids=gene_ids, batch=batch)


def keep_cells(counts: Counts, annotations: dict[str, np.ndarray], keep: dict[str, list[str]],
                source: str = "") -> Counts:
    """Keep the cells whose annotation in every column of `keep` is one of its values (e.g. demuxlet's singlets:
    {"demuxlet_cls": ["SNG"]}); annotations: each such column's values, one per cell. Logs what it dropped."""
    mask = np.ones(counts.X.shape[0], dtype=bool)
    for column, values in keep.items():
        mask &= np.isin(np.asarray(annotations[column], dtype=object).astype(str), [str(v) for v in values])
    rule = "; ".join(f"{column} in {{{', '.join(map(str, values))}}}" for column, values in keep.items())
    if not mask.any():
        found = "; ".join(f"{c}: " + ", ".join(sorted(set(np.asarray(annotations[c], dtype=object).astype(str)))[:10])
                          for c in keep)
        raise _error(source, f"no cell has {rule} (values found: {found})")
    log.info("%s: kept %d of %d cells with %s", source, int(mask.sum()), mask.size, rule)
    if mask.all():
        return counts
    return Counts(X=counts.X[mask], genes=counts.genes, cells=counts.cells[mask],
                  labels=None if counts.labels is None else counts.labels[mask], gene_ids=counts.gene_ids,
                  batch=None if counts.batch is None else counts.batch[mask],
                  obs=None if counts.obs is None else counts.obs.iloc[np.flatnonzero(mask)])


def select_genes(counts: Counts, n: int, source: str = "") -> Counts:
    """Keep the n genes of highest binomial deviance (`scvae_torch.genes`), in their order, and record it; with a
    batch column (`prepare --batch`) the deviance is summed within batches (`uns['scvae_prepare']['within_batches']`).

    Parameters
    ----------
    counts : Counts
        Raw counts (after any count filters: the deviance uses the cells' totals over these genes).
    n : int
        Genes to keep, >= 1; at least the number of genes keeps all (logged).
    source : str
        The input's path, for the log.

    Returns
    -------
    Counts
        The kept genes, with `gene_deviance` and `selection` set.
    """
    _genes.check_count(n)
    deviance = _genes.binomial_deviance(counts.X, batch=counts.batch)  # within batches when there are some
    keep = _genes.rank_top(deviance, n)
    _report_selection(source, n, deviance.size)
    X = counts.X if keep.size == deviance.size else counts.X[:, keep]
    return Counts(X=X, genes=counts.genes[keep], cells=counts.cells, labels=counts.labels, batch=counts.batch,
                  gene_ids=None if counts.gene_ids is None else counts.gene_ids[keep], gene_deviance=deviance[keep],
                  selection=_selection_record(n, deviance.size, within_batches=counts.batch is not None))


def _selection_record(n: int, n_genes: int, within_batches: bool = False) -> dict:
    """What the canonical file records of a gene selection, as uns['scvae_prepare']."""
    record = {"criterion": _genes.CRITERION, "top_genes": int(n), "genes_considered": int(n_genes)}
    return {**record, "within_batches": True} if within_batches else record


def _report_selection(source: str, n: int, n_genes: int) -> None:
    """Log what a gene selection kept (or that it kept everything)."""
    if n >= n_genes:
        log.warning("%s: asked for the top %d genes by binomial deviance but %d are left after the count "
                    "filters: keeping all", source, n, n_genes)
    else:
        log.info("%s: kept the %d of %d genes with the highest binomial deviance", source, n, n_genes)


def _report_dropped(source: str, what: str, keep: np.ndarray, minimum: int) -> None:
    """Log how many cells or genes a count threshold dropped (when one was set)."""
    if minimum:
        log.info("%s: dropped %d of %d %s with fewer than %d counts", source, int((~keep).sum()), keep.size, what,
                 minimum)


def _check_left(source: str, n_cells: int, n_genes: int, min_counts_cell: int, min_counts_gene: int) -> None:
    """Refuse a matrix the count thresholds emptied."""
    if n_cells == 0 or n_genes == 0:
        rules = [f"{what} with fewer than {n} counts" for what, n in (("cells", min_counts_cell),
                                                                      ("genes", min_counts_gene)) if n]
        raise _error(source, f"no data left after dropping {' and '.join(rules)} ({n_cells} cells x {n_genes} genes)")


def _summary_row(n_cells: int, n_genes: int, nonzeros: int, total: float, max_count: float) -> dict:
    """The summary's counts (labels filled in by the caller when there are any)."""
    return {"cells": int(n_cells), "genes": int(n_genes), "nonzeros": int(nonzeros),
            "sparsity_percent": round(100.0 * (1.0 - nonzeros / (n_cells * n_genes)), 4),
            "total_counts": round(total), "max_count": int(max_count), "labels": None, "label_counts": None}


def _natural_key(text: str) -> list:
    """Sort key that orders '2' before '10' (label codes)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def summarize(counts: Counts) -> dict:
    """The data set's Table 1 row: cells, genes, non-zeros, sparsity %, labels and cells per label."""
    nonzeros = int(counts.X.count_nonzero())
    summary = _summary_row(*counts.X.shape, nonzeros, float(counts.X.sum(dtype=np.float64)),
                           float(counts.X.max()) if nonzeros else 0.0)
    if counts.labels is not None:
        names, sizes = np.unique(counts.labels.astype(str), return_counts=True)
        summary["labels"] = int(names.size)
        summary["label_counts"] = {str(n): int(s)
                                   for n, s in sorted(zip(names, sizes), key=lambda x: _natural_key(x[0]))}
    return summary
