"""Count data in and out: the public names of the `scvae_torch.io` package in one namespace.

Readers (10x HDF5 v2/v3, h5ad, Matrix Market), validation, count filters and gene selection, the canonical
h5ad, block-by-block conversion of large 10x files, and train/validation/test splits. Each lives in its own
module of `scvae_torch.io` (docs/architecture.md has the map); import them from here.
"""

from __future__ import annotations

from .io.canonical import load_canonical, write_canonical, write_summary
from .io.filters import filter_counts, select_genes, summarize
from .io.formats import FORMATS, detect_format, read_counts
from .io.h5ad import read_h5ad
from .io.mtx import read_mtx
from .io.prepare import STREAM_ABOVE_GB, prepare_input, write_prepared
from .io.splits import DEFAULT_FRACTIONS, SUBSETS, make_split, read_split, write_split
from .io.stream import STREAM_BLOCK_NONZEROS, StreamedPlan, plan_10x_streamed, write_10x_streamed
from .io.tenx import read_10x_h5
from .io.validation import GENE_EXPRESSION, Counts, DataError, refuse_bad_counts

__all__ = [
    "DEFAULT_FRACTIONS", "FORMATS", "GENE_EXPRESSION", "STREAM_ABOVE_GB", "STREAM_BLOCK_NONZEROS", "SUBSETS",
    "Counts", "DataError", "StreamedPlan", "detect_format", "filter_counts", "load_canonical", "make_split",
    "plan_10x_streamed", "prepare_input", "read_10x_h5", "read_counts", "read_h5ad", "read_mtx", "read_split",
    "refuse_bad_counts", "select_genes", "summarize", "write_10x_streamed", "write_canonical", "write_prepared",
    "write_split", "write_summary",
]
