"""The 10x Cell Ranger HDF5 reader (v2: one group per genome; v3: 'matrix', Gene Expression only)."""

from __future__ import annotations

import os

import h5py
import numpy as np

from .hdf5 import _dataset, _open_hdf5, _read_compressed
from .validation import GENE_EXPRESSION, Counts, _as_strings, _error, _finish, _keep_features


def _10x_metadata(f: h5py.File, path: str, genome: str | None):
    """The count group of an open 10x HDF5 file (v2: one group per genome; v3: 'matrix'), its (cells, genes),
    cell ids, gene names and ids, and the feature filters to apply in turn: [(keep mask, why), ...]."""
    if isinstance(f.get("matrix"), h5py.Group):
        group, layout = f["matrix"], "v3"
    else:
        layout = "v2"
        genomes = sorted(k for k in f if isinstance(f[k], h5py.Group) and "indptr" in f[k] and "shape" in f[k])
        if not genomes:
            raise _error(path, "no 10x count matrix: expected a 'matrix' group (Cell Ranger v3) or one group "
                               "per genome (v2); is this an .h5ad file (--format h5ad)?")
        if genome is None and len(genomes) > 1:
            raise _error(path, f"holds several genomes ({', '.join(genomes)}); choose one with --genome")
        if genome is not None and genome not in genomes:
            raise _error(path, f"no genome {genome!r}; genomes in the file: {', '.join(genomes)}")
        group = f[genome or genomes[0]]
    shape = _dataset(group, "shape", path)[()]
    if np.shape(shape) != (2,):
        raise _error(path, f"{group.name}/shape is {shape!r}, expected [genes, cells]")
    n_genes, n_cells = int(shape[0]), int(shape[1])
    cells = _dataset(group, "barcodes", path)[()]
    if layout == "v3":
        feats = group.get("features")
        if not isinstance(feats, h5py.Group):
            raise _error(path, "no group 'matrix/features' (not the expected Cell Ranger v3 layout)")
        gene_ids = _dataset(feats, "id", path)[()]
        genes = _dataset(feats, "name", path)[()] if "name" in feats else gene_ids
        types = _as_strings(feats["feature_type"][()], path, "feature types") if "feature_type" in feats else None
        feat_genomes = _as_strings(feats["genome"][()], path, "feature genomes") if "genome" in feats else None
    else:
        gene_ids = _dataset(group, "genes", path)[()]
        genes = _dataset(group, "gene_names", path)[()] if "gene_names" in group else gene_ids
        types = feat_genomes = None
    if len(cells) != n_cells or len(genes) != n_genes or len(gene_ids) != n_genes:
        raise _error(path, f"{group.name}/shape says {n_genes} genes x {n_cells} cells but there are "
                           f"{len(genes)} gene names and {len(cells)} barcodes")
    genes, gene_ids = _as_strings(genes, path, "gene names"), _as_strings(gene_ids, path, "gene ids")
    filters = []
    if types is not None:
        if GENE_EXPRESSION not in set(types):
            raise _error(path, f"no '{GENE_EXPRESSION}' features (feature types: {', '.join(sorted(set(types)))})")
        filters.append((types == GENE_EXPRESSION, f"feature_type '{GENE_EXPRESSION}'"))
        if feat_genomes is not None:
            feat_genomes = feat_genomes[types == GENE_EXPRESSION]
    if layout == "v3" and genome is not None:
        if feat_genomes is None or genome not in set(feat_genomes):
            choices = ", ".join(sorted(set(feat_genomes) - {""})) if feat_genomes is not None else "none recorded"
            raise _error(path, f"no genome {genome!r}; genomes in the file: {choices or 'none recorded'}")
        filters.append((feat_genomes == genome, f"genome {genome!r}"))
    return group, n_cells, n_genes, cells, genes, gene_ids, filters


def read_10x_h5(path: str, genome: str | None = None, round_counts: bool = False) -> Counts:
    """Read a 10x Cell Ranger HDF5 file: v2 (one group per genome) or v3 ('matrix', Gene Expression only)."""
    path = os.fspath(path)
    with _open_hdf5(path) as f:
        group, n_cells, n_genes, cells, genes, gene_ids, filters = _10x_metadata(f, path, genome)
        # stored CSC over [genes, cells] (indptr runs over cells) == CSR over [cells, genes]: no transpose copy
        X, integer_source = _read_compressed(group, path, n_cells, n_genes)
    for keep, why in filters:
        X, genes, gene_ids = _keep_features(X, keep, genes, gene_ids, path, why)
    return _finish(path, X, genes, cells, None, gene_ids, integer_source=integer_source, round_counts=round_counts)
