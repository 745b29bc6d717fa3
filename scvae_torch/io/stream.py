"""10x HDF5 to the canonical file block by block: the matrix is never held in memory."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import h5py
import numpy as np
import scipy.sparse as sp

from .. import genes as _genes
from ..genes import row_blocks as _cell_blocks
from .atomic import atomic_path
from .canonical import _check_space, _names_bytes, _obs_var, _selection_annotations
from .filters import _check_left, _report_dropped, _report_selection, _selection_record, _summary_row
from .hdf5 import _csr_layout, _open_hdf5
from .tenx import _10x_metadata
from .validation import _as_strings, _check_cells, _check_values, _error

log = logging.getLogger(__name__)


STREAM_BLOCK_NONZEROS = 1 << 22  # stored counts per block of cells when converting out of core (~35 MB of them)


@dataclass
class StreamedPlan:
    """What the first pass over a 10x HDF5 file found: the cells and genes to keep, all values checked."""

    path: str
    genome: str | None
    round_counts: bool
    block_nonzeros: int
    cells: np.ndarray            # ids of the kept cells
    keep_cells: np.ndarray       # bool, per cell of the file
    columns: np.ndarray          # kept genes, as columns of the file's matrix
    genes: np.ndarray
    gene_ids: np.ndarray
    nonzeros_bound: int          # stored counts of the kept cells in all their genes
    gene_deviance: np.ndarray | None = None  # of the kept genes, when selected by binomial deviance
    selection: dict | None = None            # uns['scvae_prepare'] of the canonical file


def _hand_back_large_blocks() -> None:
    """On glibc, serve every allocation over 1 MiB by mmap, so that it goes back to the system when freed.

    glibc's default raises that threshold to the largest block freed so far; the conversion's blocks then
    come from the heap, whose fragments kept the process growing with the number of blocks (`python
    benchmarks/bench_read.py --streamed --cells 20000|80000` measures the peak RSS growth; figures in
    docs/data.md). Process-wide; no effect elsewhere (and none after
    training.reuse_freed_memory, which turns mmap off: not done in the same process).
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _read_block(group: h5py.Group, indptr: np.ndarray, lo: int, hi: int, n_genes: int, path: str) -> sp.csr_matrix:
    """Cells lo..hi-1 of a 10x count group as CSR (cells x all genes), index ranges checked."""
    a, b = int(indptr[lo]), int(indptr[hi])
    indices = group["indices"][a:b].astype(np.int32 if n_genes < np.iinfo(np.int32).max else np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
        raise _error(path, f"{group.name}: 'indices' of cells {lo + 1}-{hi} run outside 0..{n_genes - 1}")
    data = group["data"][a:b]
    return sp.csr_matrix((data, indices, (indptr[lo:hi + 1] - a)), shape=(hi - lo, n_genes))


def plan_10x_streamed(path: str, genome: str | None = None, round_counts: bool = False, min_counts_cell: int = 0,
                      min_counts_gene: int = 0, block_nonzeros: int = STREAM_BLOCK_NONZEROS,
                      top_genes: int | None = None) -> StreamedPlan:
    """First pass of the out-of-core conversion: check every value, apply the feature and count filters and
    the gene selection.

    Reads the file one block of cells at a time, so the matrix is never held (the cell ids and per-cell offsets
    and totals are). Same checks, filters and messages as read_10x_h5 followed by filter_counts and
    select_genes; a bad block is named by its cells. The binomial deviance of top_genes is summed in the same
    pass; with min_counts_gene as well it takes one more read of the file, since the cells' totals over the
    genes that pass that filter are only known at the end of the first.
    """
    path = os.fspath(path)
    if top_genes is not None:
        _genes.check_count(top_genes)
    _hand_back_large_blocks()
    with _open_hdf5(path) as f:
        group, n_cells, n_genes, cells, genes, gene_ids, filters = _10x_metadata(f, path, genome)
        indptr, integer_source = _csr_layout(group, path, n_cells, n_genes)
        indptr = indptr.astype(np.int64)
        cells = _as_strings(cells, path, "cell ids")
        _check_cells(path, cells, n_genes)
        columns = np.arange(n_genes)
        for keep, why in filters:
            if not keep.all():
                log.info("%s: kept %d of %d features (%s)", path, int(keep.sum()), keep.size, why)
                columns, genes, gene_ids = columns[keep], genes[keep], gene_ids[keep]
        cell_totals = np.zeros(n_cells)
        cell_nonzeros = np.zeros(n_cells, dtype=np.int64)
        gene_totals = np.zeros(len(columns))
        # every gene passes min_counts_gene 0, so the cells' totals are final and the deviance sums in this pass
        sums = _genes.DevianceSums(len(columns)) if top_genes is not None and not min_counts_gene else None
        for lo, hi in _cell_blocks(indptr, block_nonzeros):
            where = f"{path} (cells {lo + 1}-{hi})"
            X = _read_block(group, indptr, lo, hi, n_genes, path)
            X = _check_values(X[:, columns] if len(columns) < n_genes else X, where, integer_source, round_counts)
            cell_totals[lo:hi] = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
            cell_nonzeros[lo:hi] = X.getnnz(axis=1)
            kept = cell_totals[lo:hi] >= min_counts_cell
            gene_totals += np.asarray(X[kept].sum(axis=0, dtype=np.float64)).ravel()
            if sums is not None:
                sums.add(X if kept.all() else X[kept])
        keep_cells = cell_totals >= min_counts_cell
        _report_dropped(path, "cells", keep_cells, min_counts_cell)
        keep_genes = gene_totals >= min_counts_gene
        _report_dropped(path, "genes", keep_genes, min_counts_gene)
        _check_left(path, int(keep_cells.sum()), int(keep_genes.sum()), min_counts_cell, min_counts_gene)
        columns, genes, gene_ids = columns[keep_genes], genes[keep_genes], gene_ids[keep_genes]
        deviance = selection = None
        if top_genes is not None:
            if sums is None:
                sums = _genes.DevianceSums(len(columns))
                for lo, hi in _cell_blocks(indptr, block_nonzeros):
                    kept = keep_cells[lo:hi]
                    if kept.any():
                        X = _read_block(group, indptr, lo, hi, n_genes, path)[kept][:, columns]
                        sums.add(_check_values(X, f"{path} (cells {lo + 1}-{hi})", integer_source, round_counts))
            deviance = sums.deviance()
            keep = _genes.rank_top(deviance, top_genes)
            _report_selection(path, top_genes, deviance.size)
            selection = _selection_record(top_genes, deviance.size)
            columns, genes, gene_ids, deviance = columns[keep], genes[keep], gene_ids[keep], deviance[keep]
    return StreamedPlan(path, genome, round_counts, block_nonzeros, cells[keep_cells], keep_cells, columns, genes,
                        gene_ids, int(cell_nonzeros[keep_cells].sum()), deviance, selection)


def write_10x_streamed(plan: StreamedPlan, out: str) -> dict:
    """Second pass: write the kept cells and genes as the canonical h5ad, block by block and atomically (temp
    path, then rename); returns the data set's summary, as `summarize` gives it."""
    import anndata

    out = os.fspath(out)
    _hand_back_large_blocks()
    n_cells, n_genes = len(plan.cells), len(plan.genes)
    _check_space(out, int(1.05 * (8 * plan.nonzeros_bound + 8 * (n_cells + 1) + _names_bytes(plan.cells, plan.genes)))
                 + (1 << 20))
    obs, var = _obs_var(out, plan.cells, plan.genes, None, plan.gene_ids)
    uns = _selection_annotations(var, plan.gene_deviance, plan.selection)
    with atomic_path(out, suffix=".h5ad") as tmp:
        anndata.AnnData(obs=obs, var=var, uns=uns).write_h5ad(tmp)  # obs, var and the empty slots; X written below
        try:
            nonzeros, total, max_count = _write_x_streamed(plan, tmp, n_cells, n_genes)
        except _WriteFailed as err:  # the output's error (a full disk...), not the input's
            raise err.__cause__ from None
    return _summary_row(n_cells, n_genes, nonzeros, total, max_count)


class _WriteFailed(Exception):
    """Writing the output failed (its cause is the error); kept apart from read errors of the input file."""


def _write_x_streamed(plan: StreamedPlan, tmp: str, n_cells: int, n_genes: int) -> tuple[int, float, float]:
    """Write X of the canonical file at tmp from the 10x file, block by block; (non-zeros, total, maximum)."""
    nonzeros, total, max_count = 0, 0.0, 0.0
    try:
        h = h5py.File(tmp, "r+")
    except OSError as err:
        raise _WriteFailed from err
    with h, _open_hdf5(plan.path) as f:
        group, _, n_file_genes, *_ = _10x_metadata(f, plan.path, plan.genome)
        indptr = group["indptr"][()].astype(np.int64)
        integer_source = group["data"].dtype.kind in "iub"
        try:
            X_out = h.create_group("X")  # anndata's CSR encoding, written directly so that it can grow
            X_out.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                "shape": np.array([n_cells, n_genes])})
            chunk = (min(max(plan.nonzeros_bound, 1), 1 << 18),)
            data = X_out.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=chunk)
            indices = X_out.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32,
                                           chunks=chunk)
            out_indptr = X_out.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
            out_indptr[0] = 0
        except (OSError, RuntimeError, ValueError) as err:
            raise _WriteFailed from err
        row = 0
        for lo, hi in _cell_blocks(indptr, plan.block_nonzeros):
            kept = plan.keep_cells[lo:hi]
            if not kept.any():
                continue
            block = _read_block(group, indptr, lo, hi, n_file_genes, plan.path)
            block = block if kept.all() else block[kept]
            block = block if len(plan.columns) == n_file_genes else block[:, plan.columns]
            block = _check_values(block, f"{plan.path} (cells {lo + 1}-{hi})", integer_source, plan.round_counts)
            size = block.nnz
            try:
                data.resize((nonzeros + size,))
                indices.resize((nonzeros + size,))
                data[nonzeros:] = block.data
                indices[nonzeros:] = block.indices
                out_indptr[row + 1:row + 1 + block.shape[0]] = nonzeros + block.indptr[1:]
            except (OSError, RuntimeError, ValueError) as err:
                raise _WriteFailed from err
            row += block.shape[0]
            nonzeros += size
            if size:
                total += float(block.data.sum(dtype=np.float64))
                max_count = max(max_count, float(block.data.max()))
    return nonzeros, total, max_count
