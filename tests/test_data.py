"""Readers, validation, canonical h5ad, summaries and splits of scvae_torch.data.

References are independent of the code under test: facts verified in the fixtures' READMEs, matrices the
tests build themselves, and anndata's own reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from scvae_torch import data
from scvae_torch.data import Counts, DataError

TENX = Path(__file__).parent / "data" / "10x"
V2 = TENX / "scanpy_v2_filtered_gene_bc_matrices_h5.h5"
V2_MULTI = TENX / "scanpy_v2_multiple_genomes.h5"
V3 = TENX / "scanpy_v3_filtered_feature_bc_matrix.h5"
V3_MEX = TENX / "scanpy_v3_filtered_feature_bc_matrix"


def shared_data() -> Path:
    """The shared data folder from SCVAE_SHARED_DATA, or skip the test."""
    folder = os.environ.get("SCVAE_SHARED_DATA")
    if not folder:
        pytest.skip("SCVAE_SHARED_DATA is not set")
    return Path(folder)


# --- writers for test inputs (the tests' own, independent of the readers) -------------------------

def random_counts(n_cells: int, n_genes: int, density: float = 0.3, seed: int = 0) -> sp.csr_matrix:
    """A random cells x genes integer count matrix."""
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 50, size=k))
    return X.astype(np.int32)


def write_10x_v2(path: Path, X: sp.csr_matrix, genes, cells, genome: str = "mm10", **overrides) -> None:
    """A Cell Ranger v2 HDF5 file holding cells x genes X (stored CSC over [genes, cells])."""
    X = sp.csr_matrix(X)
    content = dict(data=X.data, indices=X.indices.astype(np.int64), indptr=X.indptr.astype(np.int64),
                   shape=np.array([X.shape[1], X.shape[0]], dtype=np.int32),
                   barcodes=np.array(cells, dtype="S"), genes=np.array(genes, dtype="S"),
                   gene_names=np.array([f"sym-{g}" for g in genes], dtype="S"))
    content.update(overrides)
    with h5py.File(path, "w") as f:
        group = f.create_group(genome)
        for name, value in content.items():
            group.create_dataset(name, data=value)


def write_10x_v3(path: Path, X: sp.csr_matrix, ids, names, types, genomes, cells) -> None:
    """A Cell Ranger v3 HDF5 file ('matrix' group with features/...)."""
    X = sp.csr_matrix(X)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = X.data, X.indices.astype(np.int64), X.indptr.astype(np.int64)
        m["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        m["barcodes"] = np.array(cells, dtype="S")
        feats = m.create_group("features")
        for name, values in (("id", ids), ("name", names), ("feature_type", types), ("genome", genomes)):
            feats[name] = np.array(values, dtype="S")


def write_named_mtx(folder: Path, name: str, M, genes, cells: pd.DataFrame, field: str = "integer") -> Path:
    """NAME.counts.mtx.gz + NAME.genes.tsv.gz + NAME.cells.tsv.gz (cells file with a header)."""
    folder.mkdir(parents=True, exist_ok=True)
    matrix = folder / f"{name}.counts.mtx"
    scipy.io.mmwrite(matrix, sp.coo_matrix(M), field=field)
    os.system(f"gzip -f {matrix}")
    pd.Series(genes).to_csv(folder / f"{name}.genes.tsv.gz", sep="\t", header=False, index=False)
    cells.to_csv(folder / f"{name}.cells.tsv.gz", sep="\t", index=False)
    return folder / f"{name}.counts.mtx.gz"


# --- 10x HDF5 -------------------------------------------------------------------------------------

def test_v2_fixture_matches_readme_facts():
    counts = data.read_10x_h5(V2)
    assert counts.X.shape == (12, 343)
    assert sp.isspmatrix_csr(counts.X) and counts.X.dtype == np.float32
    assert counts.X.nnz == 12 and np.all(counts.X.data == 1)
    assert counts.genes[0] == "DSCAM" and len(counts.cells) == 12 and counts.labels is None


def test_v2_multiple_genomes_pick_by_name_and_list_choices():
    assert data.read_10x_h5(V2_MULTI, genome="hg19_chr21").X.sum() == 12
    assert data.read_10x_h5(V2_MULTI, genome="another_genome").X.sum() == 13
    for genome in (None, "mm10"):
        with pytest.raises(DataError) as err:
            data.read_10x_h5(V2_MULTI, genome=genome)
        message = str(err.value)
        assert str(V2_MULTI) in message and "another_genome" in message and "hg19_chr21" in message
        assert "\n" not in message


def test_v3_fixture_matches_readme_facts():
    counts = data.read_10x_h5(V3)
    assert counts.X.shape == (1107, 507)
    assert counts.X.nnz == 23866 and counts.X.sum() == 41549 and counts.X.max() == 36
    assert counts.gene_ids[0].startswith("ENSG")


def test_v3_h5_and_its_mex_folder_give_the_identical_matrix():
    h5 = data.read_10x_h5(V3)
    for source in (V3_MEX, V3_MEX / "matrix.mtx.gz"):
        mex = data.read_mtx(source)
        assert mex.X.shape == h5.X.shape
        assert (mex.X != h5.X).nnz == 0
        assert np.array_equal(mex.cells, h5.cells)
        assert np.array_equal(mex.genes, h5.genes) and np.array_equal(mex.gene_ids, h5.gene_ids)


def test_v2_round_trip_of_a_known_matrix(tmp_path):
    X = random_counts(40, 25, seed=1)
    genes, cells = [f"g{i}" for i in range(25)], [f"c{i}" for i in range(40)]
    write_10x_v2(tmp_path / "m.h5", X, genes, cells)
    counts = data.read_10x_h5(tmp_path / "m.h5")
    assert np.array_equal(counts.X.toarray(), X.toarray())
    assert list(counts.cells) == cells and list(counts.gene_ids) == genes
    assert list(counts.genes) == [f"sym-{g}" for g in genes]


def test_v3_keeps_gene_expression_and_selects_genome(tmp_path):
    X = random_counts(30, 6, density=0.6, seed=2)
    types = ["Gene Expression", "Antibody Capture", "Gene Expression", "Gene Expression", "CRISPR", "Gene Expression"]
    genomes = ["hg", "", "hg", "mm", "", "mm"]
    write_10x_v3(tmp_path / "v3.h5", X, [f"id{i}" for i in range(6)], [f"n{i}" for i in range(6)], types, genomes,
                 [f"c{i}" for i in range(30)])
    every = data.read_10x_h5(tmp_path / "v3.h5")
    assert list(every.genes) == ["n0", "n2", "n3", "n5"]
    assert np.array_equal(every.X.toarray(), X.toarray()[:, [0, 2, 3, 5]])
    mouse = data.read_10x_h5(tmp_path / "v3.h5", genome="mm")
    assert list(mouse.gene_ids) == ["id3", "id5"]
    assert np.array_equal(mouse.X.toarray(), X.toarray()[:, [3, 5]])
    with pytest.raises(DataError, match="no genome 'dog'; genomes in the file: hg, mm$"):
        data.read_10x_h5(tmp_path / "v3.h5", genome="dog")


# --- h5ad -----------------------------------------------------------------------------------------

def make_adata(X, n_cells: int, n_genes: int) -> anndata.AnnData:
    """An AnnData with string names and a categorical and a numeric obs column."""
    adata = anndata.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                            var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    adata.obs["cell_type"] = pd.Categorical([["T", "B", "NK"][i % 3] for i in range(n_cells)])
    adata.obs["cluster"] = np.arange(n_cells) % 4 + 1
    return adata


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_h5ad_x_in_every_storage_matches_anndata(tmp_path, layout):
    X = random_counts(50, 20, seed=3).astype(np.float32)
    X = {"csr": X, "csc": X.tocsc(), "dense": X.toarray()}[layout]
    make_adata(X, 50, 20).write_h5ad(tmp_path / "a.h5ad")
    reference = anndata.read_h5ad(tmp_path / "a.h5ad")
    counts = data.read_h5ad(tmp_path / "a.h5ad", labels="cell_type")
    assert sp.isspmatrix_csr(counts.X) and counts.X.dtype == np.float32
    assert np.array_equal(counts.X.toarray(), sp.csr_matrix(reference.X).toarray())
    assert list(counts.cells) == list(reference.obs_names) and list(counts.genes) == list(reference.var_names)
    assert list(counts.labels) == list(reference.obs["cell_type"].astype(str))


def test_h5ad_layer_raw_and_numeric_labels(tmp_path):
    X = random_counts(30, 10, seed=4).astype(np.float32)
    adata = make_adata(sp.csr_matrix(np.log1p(X.toarray())), 30, 10)
    adata.layers["counts"] = X
    adata.raw = anndata.AnnData(X=X * 2, obs=adata.obs[[]], var=adata.var[[]])
    adata.write_h5ad(tmp_path / "a.h5ad")
    layer = data.read_h5ad(tmp_path / "a.h5ad", layer="counts", labels="cluster")
    assert np.array_equal(layer.X.toarray(), X.toarray())
    assert list(layer.labels[:5]) == ["1", "2", "3", "4", "1"]
    raw = data.read_h5ad(tmp_path / "a.h5ad", use_raw=True)
    assert np.array_equal(raw.X.toarray(), 2 * X.toarray())
    with pytest.raises(DataError, match="non-integer"):  # X holds log1p values: not counts
        data.read_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(DataError, match="no layer 'spliced'; layers in the file: counts"):
        data.read_h5ad(tmp_path / "a.h5ad", layer="spliced")
    with pytest.raises(DataError, match="no obs column 'celltype'.*cell_type"):
        data.read_h5ad(tmp_path / "a.h5ad", layer="counts", labels="celltype")


def test_round_option_rounds_with_a_warning(tmp_path, caplog):
    X = np.array([[0.4, 1.6, 3.0], [2.0, 0.0, 0.5]], dtype=np.float64)
    make_adata(sp.csr_matrix(X), 2, 3).write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(DataError, match=r"3 non-integer values"):
        data.read_h5ad(tmp_path / "a.h5ad")
    with caplog.at_level("WARNING", logger="scvae_torch"):
        counts = data.read_h5ad(tmp_path / "a.h5ad", round_counts=True)
    assert np.array_equal(counts.X.toarray(), [[0, 2, 3], [2, 0, 0]])
    assert counts.X.nnz == 3  # 0.4 and 0.5 rounded to zero are not stored
    assert "rounded 3 non-integer values" in caplog.text


# --- Matrix Market --------------------------------------------------------------------------------

def test_named_mtx_layout_either_orientation(tmp_path):
    X = random_counts(7, 5, density=0.5, seed=5)
    cells = pd.DataFrame({"cell_id": [f"c{i}" for i in range(7)], "cell_type": list("aabbbcc")})
    genes = [f"g{i}" for i in range(5)]
    as_rows = write_named_mtx(tmp_path / "rows", "toy", X, genes, cells)
    as_cols = write_named_mtx(tmp_path / "cols", "toy", X.T, genes, cells)
    for source in (as_rows, as_cols, tmp_path / "rows"):
        counts = data.read_mtx(source, labels="cell_type")
        assert np.array_equal(counts.X.toarray(), X.toarray())
        assert list(counts.labels) == list("aabbbcc") and list(counts.genes) == genes
    with pytest.raises(DataError, match="no column 'type'.*cell_id, cell_type"):
        data.read_mtx(as_rows, labels="type")


def test_square_mtx_follows_the_layout_convention(tmp_path):
    X = np.arange(9).reshape(3, 3)
    named = write_named_mtx(tmp_path, "sq", X, ["g0", "g1", "g2"], pd.DataFrame({"cell_id": ["c0", "c1", "c2"]}))
    assert np.array_equal(data.read_mtx(named).X.toarray(), X)  # NAME.counts.mtx: cells are rows
    mex = tmp_path / "mex"
    mex.mkdir()
    scipy.io.mmwrite(mex / "matrix.mtx", sp.coo_matrix(X))
    (mex / "genes.tsv").write_text("g0\tG0\ng1\tG1\ng2\tG2\n")
    (mex / "barcodes.tsv").write_text("c0\nc1\nc2\n")
    assert np.array_equal(data.read_mtx(mex).X.toarray(), X.T)  # 10x MEX: genes are rows


@pytest.mark.parametrize("name, cells, genes, nonzeros, zeros_percent, label_counts", [
    ("cellbench_celseq2_3cl", 274, 28204, 1_954_979, 74.70, {"H1975": 112, "H2228": 81, "HCC827": 81}),
    ("mouse_bladder_2100", 2100, 20670, 2_214_875, 94.90,
     {"1": 550, "2": 299, "3": 268, "4": 229, "5": 184, "6": 158, "7": 102, "8": 60, "9": 53, "10": 45,
      "11": 30, "12": 33, "13": 33, "14": 27, "15": 21, "16": 8}),
])
def test_shared_data_sets_load_to_documented_shapes(name, cells, genes, nonzeros, zeros_percent, label_counts):
    folder = shared_data()
    counts = data.read_counts(folder / f"{name}.counts.mtx.gz", labels="cell_type")
    summary = data.summarize(counts)
    assert (summary["cells"], summary["genes"], summary["nonzeros"]) == (cells, genes, nonzeros)
    assert abs(summary["sparsity_percent"] - zeros_percent) < 0.01
    assert summary["label_counts"] == label_counts and summary["labels"] == len(label_counts)
    assert list(summary["label_counts"]) == sorted(label_counts, key=lambda s: (len(s), s))  # '2' before '10'


# --- format detection, filtering, summary ---------------------------------------------------------

def test_detect_format(tmp_path):
    assert data.detect_format(V2) == "10x-h5" and data.detect_format(V3_MEX) == "mtx"
    make_adata(random_counts(3, 2), 3, 2).write_h5ad(tmp_path / "a.h5")
    assert data.detect_format(tmp_path / "a.h5") == "h5ad"  # by content, not by name
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="cannot tell the format"):
        data.detect_format(tmp_path / "notes.txt")


def test_filter_counts_drops_cells_then_genes():
    X = sp.csr_matrix(np.array([[5, 0, 1, 0], [1, 0, 0, 0], [3, 0, 0, 2], [0, 0, 4, 9]], dtype=np.float32))
    counts = Counts(X=X, genes=np.array(list("abcd"), dtype=object), cells=np.array(list("wxyz"), dtype=object),
                    labels=np.array(["p", "q", "p", "q"], dtype=object))
    kept = data.filter_counts(counts, min_counts_cell=2, min_counts_gene=3)
    # cell x (total 1) goes; then over w, y, z the gene totals are a 8, b 0, c 5, d 11: b goes
    assert list(kept.cells) == ["w", "y", "z"] and list(kept.labels) == ["p", "p", "q"]
    assert list(kept.genes) == ["a", "c", "d"]
    assert np.array_equal(kept.X.toarray(), [[5, 1, 0], [3, 0, 2], [0, 4, 9]])
    with pytest.raises(DataError, match="no data left"):
        data.filter_counts(counts, min_counts_cell=100)


def test_summarize_small_matrix_by_hand():
    X = sp.csr_matrix(np.array([[0, 2, 0, 0], [1, 0, 0, 7], [0, 0, 0, 0]], dtype=np.float32))
    counts = Counts(X=X, genes=np.array(list("abcd")), cells=np.array(list("xyz")),
                    labels=np.array(["T", "B", "T"]))
    assert data.summarize(counts) == {"cells": 3, "genes": 4, "nonzeros": 3, "sparsity_percent": 75.0,
                                      "total_counts": 10, "max_count": 7, "labels": 2,
                                      "label_counts": {"B": 1, "T": 2}}
    assert data.summarize(Counts(X=X, genes=counts.genes, cells=counts.cells))["labels"] is None


# --- canonical h5ad -------------------------------------------------------------------------------

def test_canonical_round_trip_is_csr_float32_with_unique_names(tmp_path):
    X = random_counts(20, 6, seed=6)
    counts = Counts(X=X, genes=np.array(["A", "B", "A", "C", "B", "D"], dtype=object),
                    cells=np.array([f"c{i}" for i in range(20)], dtype=object),
                    labels=np.array([["x", "y"][i % 2] for i in range(20)], dtype=object),
                    gene_ids=np.array([f"ENS{i}" for i in range(6)], dtype=object))
    out = tmp_path / "sub" / "counts.h5ad"
    data.write_canonical(counts, out)
    assert os.listdir(out.parent) == ["counts.h5ad"]  # no temporary left behind
    adata = anndata.read_h5ad(out)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert adata.var_names.is_unique and list(adata.var_names) == ["A", "B", "A-1", "C", "B-1", "D"]
    assert isinstance(adata.obs["label"].dtype, pd.CategoricalDtype)
    assert list(adata.var["gene_ids"]) == list(counts.gene_ids)
    back = data.load_canonical(out)
    assert np.array_equal(back.X.toarray(), X.toarray()) and list(back.labels) == list(counts.labels)
    assert list(back.cells) == list(counts.cells)


def test_canonical_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "counts.h5ad"
    out.write_bytes(b"previous version")

    def broken_write(self, filename, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", broken_write)
    counts = Counts(X=random_counts(3, 2), genes=np.array(["a", "b"]), cells=np.array(["x", "y", "z"]))
    with pytest.raises(OSError, match="disk full"):
        data.write_canonical(counts, out)
    assert out.read_bytes() == b"previous version" and os.listdir(tmp_path) == ["counts.h5ad"]


def test_load_canonical_rejects_a_damaged_file(tmp_path):
    bad = tmp_path / "counts.h5ad"
    bad.write_bytes(V3.read_bytes()[:5000])
    with pytest.raises(DataError, match="counts.h5ad: not a readable"):
        data.load_canonical(bad)


# --- splits ---------------------------------------------------------------------------------------

def test_split_sizes_cover_every_cell_once():
    cells = np.array([f"c{i}" for i in range(1000)])
    split = data.make_split(cells, seed=3)
    assert list(split.index) == list(cells)
    assert split.value_counts().to_dict() == {"train": 810, "validation": 90, "test": 100}
    small = data.make_split(cells[:10], seed=0)
    assert small.value_counts().to_dict() == {"train": 8, "validation": 1, "test": 1}


def test_split_is_seeded():
    cells = np.array([f"c{i}" for i in range(200)])
    first, again = data.make_split(cells, seed=7), data.make_split(cells, seed=7)
    assert first.equals(again)
    assert not first.equals(data.make_split(cells, seed=8))


def test_split_pins_the_pcg64_stream():
    # recorded once; guards "same seed, same split on any machine": a numpy or platform change that
    # altered PCG64's raw stream (or the argsort tie rule) would change these assignments
    split = data.make_split(np.array([f"c{i}" for i in range(12)]), seed=42)
    assert "".join({"train": "T", "validation": "V", "test": "E"}[s] for s in split) == "TTTTTETTTTTV"


def test_split_does_not_depend_on_hash_seed():
    code = ("import numpy as np; from scvae_torch.data import make_split; "
            "c = np.array(['cell%d' % i for i in range(300)]); l = np.array(['A', 'B', 'C'])[np.arange(300) % 3]; "
            "print(''.join(s[:2] for s in make_split(c, l, seed=5, stratify=True)))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(runs) == 1


def test_stratified_split_keeps_label_proportions():
    labels = np.array(["big"] * 500 + ["mid"] * 300 + ["rare"] * 8)
    cells = np.array([f"c{i}" for i in range(labels.size)])
    split = data.make_split(cells, labels, seed=1, stratify=True)
    table = pd.crosstab(labels, split.to_numpy())
    assert table.loc["big"].to_dict() == {"test": 50, "train": 405, "validation": 45}
    assert table.loc["mid"].to_dict() == {"test": 30, "train": 243, "validation": 27}
    assert table.loc["rare"].to_dict() == {"test": 1, "train": 6, "validation": 1}
    with pytest.raises(ValueError, match="needs labels"):
        data.make_split(cells, None, stratify=True)


def test_split_file_round_trip(tmp_path):
    cells = np.array([f"c{i}" for i in range(50)])
    split = data.make_split(cells, seed=2)
    data.write_split(split, tmp_path / "split.tsv")
    assert (tmp_path / "split.tsv").read_text().splitlines()[0] == "cell\tsubset"
    shuffled = cells[::-1]  # row indices refer to the order of the cells given
    index = data.read_split(tmp_path / "split.tsv", shuffled)
    assert sorted(np.concatenate(list(index.values()))) == list(range(50))
    for name in data.SUBSETS:
        assert set(shuffled[index[name]]) == set(split.index[split == name])


@pytest.mark.parametrize("content, cells, message", [
    ("cell\tsubset\nc0\ttrain\nc1\ttest\n", ["c0", "c1", "c2"], "1 cells of the data are not in the split"),
    ("cell\tsubset\nc0\ttrain\nc9\ttest\n", ["c0"], "1 cells in the split are not in the data .*'c9'"),
    ("cell\tsubset\nc0\ttrain\nc0\ttest\n", ["c0"], "listed twice"),
    ("cell\tsubset\nc0\ttraining\n", ["c0"], "unknown subsets 'training'"),
    ("id\tset\nc0\ttrain\n", ["c0"], "header"),
])
def test_read_split_errors(tmp_path, content, cells, message):
    path = tmp_path / "split.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        data.read_split(path, np.array(cells))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_write_summary_is_json(tmp_path):
    data.write_summary({"cells": 3}, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == {"cells": 3}
    assert os.listdir(tmp_path) == ["s.json"]
