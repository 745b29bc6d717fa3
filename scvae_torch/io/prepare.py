"""What `prepare` does: read (in memory, or block by block for a large 10x file) and write the canonical file."""

from __future__ import annotations

import logging
import os

from .. import genes as _genes
from ..config import STREAM_ABOVE_GB
from .canonical import write_canonical
from .filters import summarize
from .formats import detect_format, read_counts
from .hdf5 import _dataset, _open_hdf5
from .stream import STREAM_BLOCK_NONZEROS, StreamedPlan, plan_10x_streamed, write_10x_streamed
from .tenx import _10x_metadata
from .validation import Counts, _error

log = logging.getLogger(__name__)


def _10x_bytes_in_memory(path: str, genome: str | None) -> int:
    """What the in-memory reader would hold of a 10x HDF5 file's matrix: float32 values and int32 indices."""
    with _open_hdf5(path) as f:
        group = _10x_metadata(f, path, genome)[0]
        return 8 * _dataset(group, "data", path).shape[0] + 8 * _dataset(group, "indptr", path).shape[0]


def prepare_input(path: str, format: str = "auto", *, stream: str = "auto", stream_above_gb: float = STREAM_ABOVE_GB,
                  genome: str | None = None, layer: str | None = None, use_raw: bool = False,
                  labels: str | None = None, round_counts: bool = False, min_counts_cell: int = 0,
                  min_counts_gene: int = 0, block_nonzeros: int = STREAM_BLOCK_NONZEROS,
                  top_genes: int | None = None, batch: str | None = None,
                  keep: dict[str, list[str]] | None = None) -> Counts | StreamedPlan:
    """Read and check counts for `prepare`, writing nothing: in memory (Counts), or for a 10x HDF5 file with
    stream 'on' (or 'auto' and more than stream_above_gb GiB in memory) the first pass of the block-by-block
    conversion (StreamedPlan). Either has .cells and goes to write_prepared. top_genes: keep that many genes of
    highest binomial deviance after the count filters (select_genes); None keeps all."""
    path = os.fspath(path)
    if top_genes is not None:
        _genes.check_count(top_genes)  # before reading anything
    if stream not in ("auto", "on", "off"):
        raise _error(path, f"unknown stream setting {stream!r}; choose auto, on or off")
    fmt = detect_format(path) if format == "auto" and os.path.exists(path) else format
    if stream == "on" and fmt != "10x-h5":
        raise _error(path, f"block-by-block conversion (stream on) reads 10x HDF5 files only, not {fmt}")
    if fmt == "10x-h5" and labels is None and batch is None and not keep and (
            stream == "on" or (stream == "auto" and _10x_bytes_in_memory(path, genome) > stream_above_gb * 2 ** 30)):
        log.info("%s: converting block by block (stream %s)", path, stream)
        return plan_10x_streamed(path, genome=genome, round_counts=round_counts, min_counts_cell=min_counts_cell,
                                 min_counts_gene=min_counts_gene, block_nonzeros=block_nonzeros, top_genes=top_genes)
    return read_counts(path, fmt, genome=genome, layer=layer, use_raw=use_raw, labels=labels,
                       round_counts=round_counts, min_counts_cell=min_counts_cell, min_counts_gene=min_counts_gene,
                       top_genes=top_genes, batch=batch, keep=keep)


def write_prepared(prepared: Counts | StreamedPlan, out: str) -> dict:
    """Write what prepare_input returned as the canonical h5ad (atomically); returns its summary."""
    if isinstance(prepared, StreamedPlan):
        return write_10x_streamed(prepared, out)
    summary = summarize(prepared)
    write_canonical(prepared, out)
    return summary
