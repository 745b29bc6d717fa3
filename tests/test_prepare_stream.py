"""`prepare` of a 10x HDF5 file block by block (out of core): the same canonical file as the in-memory
reader, the same checks, nothing written for bad input, and memory bounded by the block, not the cells."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from test_data import V2, random_counts, write_10x_v3

from scvae_torch import data
from scvae_torch.batches import StreamSource
from scvae_torch.data import DataError
from scvae_torch.io import stream

TYPES = ["Gene Expression", "Antibody Capture", "Gene Expression", "Gene Expression", "CRISPR"] * 8
GENOMES = ["hg", "", "hg", "mm", ""] * 8


def _v3(path, n_cells=300, seed=0, X=None):
    """A v3 file of n_cells x 40 features (24 gene expression ones, of two genomes); its matrix."""
    X = (random_counts(n_cells, len(TYPES), density=0.2, seed=seed) if X is None else X).tolil()
    X[5] = 0  # an empty cell, and a gene seen in few cells, for the count filters
    X[:, 2] = 0
    X[7, 2] = 1
    X = sp.csr_matrix(X)
    X.eliminate_zeros()
    write_10x_v3(path, X, [f"id{i}" for i in range(len(TYPES))], [f"n{i % 30}" for i in range(len(TYPES))], TYPES,
                 GENOMES, [f"c{i}" for i in range(X.shape[0])])
    return X


def _same_file(a, b) -> None:
    """Two canonical h5ad files hold the same matrix (values, storage), cells, genes and gene ids."""
    x, y = anndata.read_h5ad(a), anndata.read_h5ad(b)
    assert list(x.obs_names) == list(y.obs_names) and list(x.var_names) == list(y.var_names)
    assert list(x.var["gene_ids"]) == list(y.var["gene_ids"])
    assert sp.isspmatrix_csr(x.X) and sp.isspmatrix_csr(y.X) and x.X.dtype == y.X.dtype == np.float32
    assert x.X.shape == y.X.shape and (x.X != y.X).nnz == 0
    assert np.array_equal(x.X.indptr, y.X.indptr) and np.array_equal(x.X.indices, y.X.indices)


@pytest.mark.parametrize("options", [{}, {"genome": "mm"}, {"min_counts_cell": 60, "min_counts_gene": 3}])
def test_streamed_conversion_writes_the_in_memory_file(tmp_path, options):
    _v3(tmp_path / "in.h5")
    memory = data.prepare_input(tmp_path / "in.h5", stream="off", **options)
    plan = data.prepare_input(tmp_path / "in.h5", stream="on", block_nonzeros=97, **options)  # ~25 blocks
    assert isinstance(plan, data.StreamedPlan) and not isinstance(memory, data.StreamedPlan)
    assert list(plan.cells) == list(memory.cells)
    streamed = data.write_prepared(plan, tmp_path / "streamed.h5ad")
    assert streamed == data.write_prepared(memory, tmp_path / "memory.h5ad")  # the summary too
    _same_file(tmp_path / "streamed.h5ad", tmp_path / "memory.h5ad")
    if options.get("min_counts_cell"):
        assert "c5" not in set(plan.cells) and streamed["genes"] < 24


@pytest.mark.parametrize("options", [{"top_genes": 7}, {"top_genes": 7, "min_counts_cell": 60, "min_counts_gene": 3},
                                     {"top_genes": 5, "genome": "mm", "round_counts": True}, {"top_genes": 100}])
def test_streamed_gene_selection_writes_the_in_memory_file(tmp_path, options):
    """The deviance summed in the first pass (or, with min_counts_gene, in one more pass) selects the genes the
    in-memory path selects, and both record the same deviances and selection."""
    from test_genes import brute_top

    _v3(tmp_path / "in.h5")
    memory = data.prepare_input(tmp_path / "in.h5", stream="off", **options)
    plan = data.prepare_input(tmp_path / "in.h5", stream="on", block_nonzeros=97, **options)
    summary = data.write_prepared(plan, tmp_path / "streamed.h5ad")
    assert summary == data.write_prepared(memory, tmp_path / "memory.h5ad")
    _same_file(tmp_path / "streamed.h5ad", tmp_path / "memory.h5ad")
    streamed, in_memory = anndata.read_h5ad(tmp_path / "streamed.h5ad"), anndata.read_h5ad(tmp_path / "memory.h5ad")
    np.testing.assert_allclose(streamed.var["binomial_deviance"], in_memory.var["binomial_deviance"], rtol=1e-10)
    assert streamed.uns["scvae_prepare"] == in_memory.uns["scvae_prepare"]
    # independently: the genes the brute-force deviance of the filtered matrix ranks first
    filtered = data.read_counts(tmp_path / "in.h5", **{k: v for k, v in options.items() if k != "top_genes"})
    expected = brute_top(filtered.X.toarray(), options["top_genes"])
    assert list(streamed.var["gene_ids"]) == list(filtered.gene_ids[expected])
    assert dict(streamed.uns["scvae_prepare"]) == {"criterion": "binomial_deviance", "top_genes": options["top_genes"],
                                                   "genes_considered": filtered.X.shape[1]}


@pytest.mark.parametrize(("options", "passes"), [({}, 1), ({"top_genes": 7}, 1),
                                                ({"top_genes": 7, "min_counts_gene": 3}, 2)])
def test_gene_selection_reads_the_file_once_unless_genes_are_filtered_by_count(tmp_path, monkeypatch, options, passes):
    _v3(tmp_path / "in.h5")
    reads = []
    real = stream._read_block
    monkeypatch.setattr(stream, "_read_block", lambda *args: reads.append(args[2]) or real(*args))
    data.prepare_input(tmp_path / "in.h5", stream="on", block_nonzeros=97, **options)
    blocks = len(set(reads))
    assert blocks > 10 and len(reads) == passes * blocks


def test_streamed_v2_fixture_and_the_training_reader(tmp_path):
    """scanpy's Cell Ranger v2 file, one cell per block; the result streams into training like any h5ad."""
    plan = data.prepare_input(V2, stream="on", block_nonzeros=1)
    data.write_prepared(plan, tmp_path / "s.h5ad")
    data.write_prepared(data.prepare_input(V2, stream="off"), tmp_path / "m.h5ad")
    _same_file(tmp_path / "s.h5ad", tmp_path / "m.h5ad")
    source = StreamSource(tmp_path / "s.h5ad")
    assert source.shape == anndata.read_h5ad(tmp_path / "m.h5ad").shape
    source.close()


def test_auto_streams_above_the_size(tmp_path):
    _v3(tmp_path / "in.h5")
    assert isinstance(data.prepare_input(tmp_path / "in.h5", stream_above_gb=1e-6), data.StreamedPlan)
    assert not isinstance(data.prepare_input(tmp_path / "in.h5"), data.StreamedPlan)  # a few kB: in memory


@pytest.mark.parametrize(("value", "message"), [(-3, "1 negative values"), (np.nan, "NaN or infinite"),
                                                (2.5, "non-integer values")])
def test_a_bad_value_in_a_late_block_names_its_cells_and_writes_nothing(tmp_path, value, message):
    X = _v3(tmp_path / "in.h5").astype(np.float64).tolil()
    X[290, 0] = value
    X = sp.csr_matrix(X)
    write_10x_v3(tmp_path / "bad.h5", X, [f"id{i}" for i in range(len(TYPES))], [f"n{i}" for i in range(len(TYPES))],
                 TYPES, GENOMES, [f"c{i}" for i in range(X.shape[0])])
    with pytest.raises(DataError, match=rf"bad\.h5 \(cells 2\d\d-\d+\): .*{message}"):
        data.prepare_input(tmp_path / "bad.h5", stream="on", block_nonzeros=500)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "scvae_torch.cli", "prepare", str(tmp_path / "bad.h5"), "--stream",
                             "on", "--out", str(out / "c.h5ad"), "--summary", str(out / "s.json")],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "bad.h5 (cells" in result.stderr and not out.exists()


def test_stream_on_is_for_10x_files_only(tmp_path):
    adata = anndata.AnnData(sp.csr_matrix(np.ones((3, 2), dtype=np.float32)))
    adata.write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(DataError, match="reads 10x HDF5 files only, not h5ad"):
        data.prepare_input(tmp_path / "x.h5ad", stream="on")


def test_cli_streams_with_split_and_summary(tmp_path):
    _v3(tmp_path / "in.h5")
    result = subprocess.run([sys.executable, "-m", "scvae_torch.cli", "prepare", str(tmp_path / "in.h5"), "--stream",
                             "on", "--out", str(tmp_path / "c.h5ad"), "--summary", str(tmp_path / "s.json"),
                             "--split", str(tmp_path / "split.tsv")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary == data.summarize(data.load_canonical(tmp_path / "c.h5ad"))
    split = data.read_split(str(tmp_path / "split.tsv"), data.load_canonical(tmp_path / "c.h5ad").cells)
    assert sum(len(rows) for rows in split.values()) == summary["cells"] == 300


def test_cli_default_mirrors_the_library():
    from scvae_torch.cli import build_parser

    args = build_parser().parse_args(["prepare", "x.h5", "--out", "y.h5ad"])
    assert args.stream == "auto" and args.stream_above_gb == data.STREAM_ABOVE_GB


def test_output_is_written_in_blocks(tmp_path, monkeypatch):
    """No block holds more than its share of the cells: what keeps memory flat for 1.3 M cells."""
    _v3(tmp_path / "in.h5", n_cells=400)
    sizes = []
    real = stream._read_block

    def spy(group, indptr, lo, hi, n_genes, path):
        sizes.append(hi - lo)
        return real(group, indptr, lo, hi, n_genes, path)

    monkeypatch.setattr(stream, "_read_block", spy)
    data.write_prepared(data.prepare_input(tmp_path / "in.h5", stream="on", block_nonzeros=200), tmp_path / "o.h5ad")
    assert len(sizes) > 20 and max(sizes) <= 40
    with h5py.File(tmp_path / "o.h5ad") as f:
        assert f["X"]["indptr"].dtype == np.int64  # room for more than 2^31 stored counts


def test_a_failing_write_is_the_outputs_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    """A full disk while writing X is reported as the output's OSError, not as a damaged input file."""
    _v3(tmp_path / "in.h5")
    plan = data.prepare_input(tmp_path / "in.h5", stream="on", block_nonzeros=300)
    out = tmp_path / "c.h5ad"
    out.write_text("the previous result")

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "resize", full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        data.write_prepared(plan, out)
    assert not isinstance(caught.value, DataError)
    assert out.read_text() == "the previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5ad", "in.h5"]
