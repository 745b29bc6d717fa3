"""`scvae-torch prepare`: good inputs give the canonical files; every bad input gives exit 2, one line naming
the file and the problem, and no output at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_data import V2, V2_MULTI, V3, V3_MEX, make_adata, random_counts, shared_data, write_10x_v2, write_named_mtx

from scvae_torch import cli, data


def run(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit status, stderr)."""
    status = cli.main([str(a) for a in argv])
    return status, capsys.readouterr().err


def outputs(folder: Path) -> dict[str, Path]:
    """The output paths a prepare call may write, all inside `folder`."""
    return {"out": folder / "out" / "counts.h5ad", "summary": folder / "out" / "summary.json",
            "split": folder / "out" / "split.tsv"}


# --- good inputs ----------------------------------------------------------------------------------

def test_prepare_10x_v2_writes_canonical_file_and_summary(tmp_path, capsys):
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", V2, "--out", paths["out"], "--summary", paths["summary"])
    assert status == 0, err
    adata = anndata.read_h5ad(paths["out"])
    assert adata.shape == (12, 343) and sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert "label" not in adata.obs
    summary = json.loads(paths["summary"].read_text())
    assert (summary["cells"], summary["genes"], summary["nonzeros"], summary["labels"]) == (12, 343, 12, None)
    assert abs(summary["sparsity_percent"] - 100 * (1 - 12 / (12 * 343))) < 1e-3


def test_prepare_mex_folder_with_split(tmp_path, capsys):
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", V3_MEX, "--out", paths["out"], "--split", paths["split"],
                      "--split-seed", 4)
    assert status == 0, err
    split = pd.read_csv(paths["split"], sep="\t")
    assert list(split.columns) == ["cell", "subset"] and len(split) == 1107
    assert split["subset"].value_counts().to_dict() == {"train": 897, "test": 111, "validation": 99}
    adata = anndata.read_h5ad(paths["out"])
    assert list(split["cell"]) == list(adata.obs_names)


def test_prepare_h5ad_labels_stratified_split_and_filters(tmp_path, capsys):
    X = random_counts(60, 12, density=0.5, seed=9).astype(np.float32).toarray()
    X[5] = 0  # one empty cell
    X[:, 3] = 0  # one empty gene
    make_adata(X, 60, 12).write_h5ad(tmp_path / "in.h5ad")
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", tmp_path / "in.h5ad", "--labels", "cell_type", "--min-counts-cell", 1,
                      "--min-counts-gene", 1, "--out", paths["out"], "--summary", paths["summary"],
                      "--split", paths["split"], "--stratify")
    assert status == 0, err
    assert "dropped 1 of 60 cells with fewer than 1 counts" in err
    assert "dropped 1 of 12 genes with fewer than 1 counts" in err
    adata = anndata.read_h5ad(paths["out"])
    assert adata.shape == (59, 11) and "c5" not in adata.obs_names and "g3" not in adata.var_names
    summary = json.loads(paths["summary"].read_text())
    assert summary["label_counts"] == adata.obs["label"].value_counts().sort_index().to_dict()
    split = pd.read_csv(paths["split"], sep="\t").set_index("cell")["subset"]
    table = pd.crosstab(adata.obs["label"].to_numpy(), split.loc[adata.obs_names].to_numpy())
    assert (table["train"] >= 15).all() and (table["test"] >= 1).all()


def test_prepare_top_genes_keeps_the_genes_brute_force_deviance_ranks_first(tmp_path, capsys):
    from test_genes import brute_deviance, brute_top

    X = random_counts(80, 30, density=0.4, seed=5).toarray().astype(np.float32)
    X[:7] *= 6  # a block of cells with more counts, so that library size matters
    X[3, :] = 0  # an empty cell, dropped by --min-counts-cell 1; the deviance is of the filtered matrix
    X[:, 11] = 0
    make_adata(X, 80, 30).write_h5ad(tmp_path / "in.h5ad")
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", tmp_path / "in.h5ad", "--min-counts-cell", 1, "--top-genes", 8,
                      "--out", paths["out"], "--summary", paths["summary"])
    assert status == 0, err
    assert "kept the 8 of 30 genes with the highest binomial deviance" in err
    kept = np.delete(X, 3, axis=0)
    expected = brute_top(kept, 8)
    adata = anndata.read_h5ad(paths["out"])
    assert list(adata.var_names) == [f"g{j}" for j in expected] and adata.n_obs == 79
    assert np.array_equal(adata.X.toarray(), kept[:, expected])
    np.testing.assert_allclose(adata.var["binomial_deviance"], brute_deviance(kept)[expected], rtol=1e-9)
    assert dict(adata.uns["scvae_prepare"]) == {"criterion": "binomial_deviance", "top_genes": 8,
                                                "genes_considered": 30}
    assert json.loads(paths["summary"].read_text())["genes"] == 8
    # the canonical readers (training's too) take the file as before
    assert data.load_canonical(paths["out"]).X.shape == (79, 8)
    from scvae_torch.batches import csr_nbytes, load_counts, read_annotations

    assert list(read_annotations(str(paths["out"]))[2]) == list(adata.var_names)
    assert load_counts(str(paths["out"]))[0].shape == (79, 8) and csr_nbytes(str(paths["out"])) > 0



def test_prepare_top_genes_with_a_batch_ranks_the_deviance_within_batches(tmp_path, capsys):
    from test_genes import brute_deviance_within

    X = random_counts(80, 30, density=0.4, seed=6).toarray().astype(np.float32)
    batch = np.where(np.arange(80) < 40, "plate1", "plate2")
    X[batch == "plate2", 4] = X[batch == "plate2", 4] * 5 + 3  # a gene that tells the plates apart
    adata = make_adata(X, 80, 30)
    adata.obs["plate"] = batch
    adata.write_h5ad(tmp_path / "in.h5ad")
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", tmp_path / "in.h5ad", "--batch", "plate", "--top-genes", 8,
                      "--out", paths["out"], "--summary", paths["summary"])
    assert status == 0, err
    deviance = brute_deviance_within(X, batch)
    expected = sorted(sorted(range(30), key=lambda j: (-deviance[j], j))[:8])
    out = anndata.read_h5ad(paths["out"])
    assert list(out.var_names) == [f"g{j}" for j in expected]
    np.testing.assert_allclose(out.var["binomial_deviance"], deviance[expected], rtol=1e-9)
    assert dict(out.uns["scvae_prepare"]) == {"criterion": "binomial_deviance", "top_genes": 8,
                                              "genes_considered": 30, "within_batches": True}


@pytest.mark.parametrize("fmt", ["mtx", "h5ad"])
def test_prepare_keep_selects_cells_by_annotation_before_the_count_filters(tmp_path, capsys, fmt):
    """--keep demuxlet_cls=SNG keeps the singlets (with their labels and batch), from a cells table or h5ad obs."""
    X = random_counts(30, 12, density=0.5, seed=2).toarray().astype(np.float32)
    cls = np.array(["SNG", "DBL", "AMB"] * 10)
    table = pd.DataFrame({"cell": [f"c{i}" for i in range(30)], "cell_type": [f"t{i % 2}" for i in range(30)],
                          "demuxlet_cls": cls, "plate": [f"p{i % 4}" for i in range(30)]})
    if fmt == "mtx":
        source = write_named_mtx(tmp_path / "in", "set", X, [f"g{j}" for j in range(12)], table)
    else:
        adata = make_adata(X, 30, 12)
        adata.obs = table.set_index("cell").set_axis(adata.obs_names)
        source = tmp_path / "in.h5ad"
        adata.write_h5ad(source)
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", source, "--labels", "cell_type", "--batch", "plate", "--keep",
                      "demuxlet_cls=SNG", "--keep", "plate=p0,p2", "--out", paths["out"])
    assert status == 0, err
    rows = np.flatnonzero((cls == "SNG") & np.isin(table["plate"], ["p0", "p2"]))
    assert "kept 5 of 30 cells with demuxlet_cls in {SNG}; plate in {p0, p2}" in err and len(rows) == 5
    out = anndata.read_h5ad(paths["out"])
    np.testing.assert_array_equal(out.X.toarray(), X[rows])
    assert list(out.obs["label"]) == list(table["cell_type"][rows])
    assert list(out.obs["batch"]) == list(table["plate"][rows])
    for keep, problem in (("demuxlet=SNG", "no "), ("demuxlet_cls=SINGLET", "no cell has demuxlet_cls in {SINGLET}"),
                          ("demuxlet_cls", "expected COLUMN=VALUE")):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        try:
            status, err = run(capsys, "prepare", source, "--keep", keep, "--out", paths["out"])
        except SystemExit as exit_:  # a malformed value: argparse's usage error
            status, err = exit_.code, capsys.readouterr().err
        assert status == 2 and "Traceback" not in err, err  # the read's progress line, then one error line
        assert [line for line in err.strip().splitlines() if problem in line] == [err.strip().splitlines()[-1]]
        assert not (tmp_path / "out").exists()


def test_prepare_top_genes_above_the_gene_count_keeps_all_and_says_so(tmp_path, capsys):
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", V2, "--top-genes", 5000, "--out", paths["out"])
    assert status == 0, err
    assert "asked for the top 5000 genes by binomial deviance but 343 are left" in err
    adata = anndata.read_h5ad(paths["out"])
    assert adata.n_vars == 343 and adata.uns["scvae_prepare"]["top_genes"] == 5000


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "many"])
def test_prepare_bad_top_genes_writes_nothing(tmp_path, capsys, value):
    paths = outputs(tmp_path)
    with pytest.raises(SystemExit) as caught:
        cli.main(["prepare", str(V2), "--top-genes", value, "--out", str(paths["out"]), "--summary",
                  str(paths["summary"]), "--split", str(paths["split"])])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "--top-genes: expected a whole number >= 1" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_prepare_round_accepts_non_integers_with_a_warning(tmp_path, capsys):
    make_adata(sp.csr_matrix(np.array([[0.5, 2.2], [1.0, 3.7]])), 2, 2).write_h5ad(tmp_path / "in.h5ad")
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", tmp_path / "in.h5ad", "--round", "--out", paths["out"])
    assert status == 0 and "rounded 3 non-integer values" in err
    assert np.array_equal(anndata.read_h5ad(paths["out"]).X.toarray(), [[0, 2], [1, 4]])


def test_prepare_shared_data_set(tmp_path, capsys):
    folder = shared_data()
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", folder / "cellbench_celseq2_3cl.counts.mtx.gz", "--labels", "cell_type",
                      "--out", paths["out"], "--summary", paths["summary"])
    assert status == 0, err
    summary = json.loads(paths["summary"].read_text())
    assert (summary["cells"], summary["genes"], summary["nonzeros"]) == (274, 28204, 1_954_979)
    assert summary["label_counts"] == {"H1975": 112, "H2228": 81, "HCC827": 81}


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--format", "--genome", "--layer", "--use-raw", "--labels", "--round", "--min-counts-cell",
                   "--min-counts-gene", "--top-genes", "--out", "--summary", "--split", "--split-seed",
                   "--split-fractions", "--stratify"):
        assert option in text
    assert "(default: 0.81,0.09,0.10)" in text and "(default: auto)" in text


# --- bad inputs -----------------------------------------------------------------------------------

def _h5ad(tmp: Path, X, names=None) -> Path:
    adata = make_adata(sp.csr_matrix(np.asarray(X, dtype=np.float64)), *np.shape(X))
    if names is not None:
        adata.obs_names = names
    adata.write_h5ad(tmp / "in.h5ad")
    return tmp / "in.h5ad"


def _mtx(tmp: Path, M, genes=("g0", "g1"), cells=("c0", "c1", "c2"), field="integer") -> Path:
    return write_named_mtx(tmp / "in", "toy", M, list(genes), pd.DataFrame({"cell_id": list(cells),
                                                                            "cell_type": ["a"] * len(cells)}), field)


def _v2(tmp: Path, **overrides) -> Path:
    write_10x_v2(tmp / "in.h5", random_counts(4, 3, density=0.7), ["g0", "g1", "g2"], ["c0", "c1", "c2", "c3"],
                 **overrides)
    return tmp / "in.h5"


def bad_negative_h5ad(tmp):
    return [_h5ad(tmp, [[1, -2], [0, 3]])], "negative values"


def bad_negative_mtx(tmp):
    path = _mtx(tmp, [[1, 0], [0, -4], [2, 2]])
    return [path], "negative values"


def bad_negative_10x(tmp):
    return [_v2(tmp, data=-np.ones(random_counts(4, 3, density=0.7).nnz, dtype=np.int32))], "negative values"


def bad_non_integer(tmp):
    return [_h5ad(tmp, [[1, 2.5], [0, 3]])], "non-integer values"


def bad_non_integer_mtx(tmp):
    return [_mtx(tmp, [[1, 0], [0, 0.25], [2, 2]], field="real")], "non-integer values"


def bad_nan(tmp):
    return [_h5ad(tmp, [[1, np.nan], [0, 3]])], "NaN or infinite"


def bad_inf(tmp):
    return [_h5ad(tmp, [[1, np.inf], [0, 3]])], "NaN or infinite"


def bad_shape_genes_file(tmp):
    path = _mtx(tmp, [[1, 0], [0, 4], [2, 2]], genes=("g0", "g1", "g2"))
    return [path], "matrix is 3 x 2 but there are 3 genes"


def bad_shape_barcodes(tmp):
    return [_v2(tmp, barcodes=np.array([b"c0", b"c1"]))], "2 barcodes"


def bad_shape_indices(tmp):
    X = random_counts(4, 3, density=0.7)
    return [_v2(tmp, indices=X.indices.astype(np.int64) + 5)], "indices' run outside"


def bad_duplicate_cells_mtx(tmp):
    path = _mtx(tmp, [[1, 0], [0, 4], [2, 2]], cells=("c0", "c1", "c0"))
    return [path, "--name", path.parent / "toy.cells.tsv.gz"], "duplicate cell ids"


def bad_duplicate_cells_h5ad(tmp):
    return [_h5ad(tmp, [[1, 0], [0, 3]], names=["x", "x"])], "duplicate cell ids"


def bad_duplicate_cells_10x(tmp):
    return [_v2(tmp, barcodes=np.array([b"c0", b"c1", b"c0", b"c3"]))], "duplicate cell ids"


def bad_truncated_hdf5(tmp):
    path = tmp / "cut.h5"
    path.write_bytes(V3.read_bytes()[: V3.stat().st_size // 2])
    return [path], "not a readable HDF5 file"


def bad_damaged_chunk(tmp):
    path = tmp / "damaged.h5"
    with h5py.File(V3) as f:  # garble the compressed bytes of the first 'data' chunk: the file still opens
        chunk = f["matrix/data"].id.get_chunk_info(0)
    raw = bytearray(V3.read_bytes())
    raw[chunk.byte_offset + 10: chunk.byte_offset + 400] = bytes(390)
    path.write_bytes(bytes(raw))
    return [path], "damaged HDF5 file"


def bad_not_hdf5(tmp):
    path = tmp / "matrix.h5"
    path.write_text("cell,gene,count\nA,B,1\n")
    return [path], "not a readable HDF5 file"


def bad_missing_genome(tmp):
    return [V2_MULTI], "several genomes (another_genome, hg19_chr21)"


def bad_unknown_genome(tmp):
    return [V2_MULTI, "--genome", "GRCh38"], "no genome 'GRCh38'"


def bad_missing_layer(tmp):
    return [_h5ad(tmp, [[1, 0], [0, 3]]), "--layer", "counts"], "no layer 'counts'"


def bad_missing_raw(tmp):
    return [_h5ad(tmp, [[1, 0], [0, 3]]), "--use-raw"], "no raw.X"


def bad_missing_label_column_h5ad(tmp):
    return [_h5ad(tmp, [[1, 0], [0, 3]]), "--labels", "celltype"], "no obs column 'celltype'"


def bad_missing_label_column_mtx(tmp):
    path = _mtx(tmp, [[1, 0], [0, 4], [2, 2]])
    return [path, "--labels", "celltype", "--name", path.parent / "toy.cells.tsv.gz"], "no column 'celltype'"


def bad_labels_on_10x(tmp):
    return [V2, "--labels", "cell_type"], "--labels do not apply to the 10x-h5 format"


def bad_everything_filtered(tmp):
    return [V2, "--min-counts-cell", 1000], "no data left"


def bad_missing_input(tmp):
    return [tmp / "nowhere.h5ad"], "no such file"


def bad_empty_mtx(tmp):
    path = _mtx(tmp, [[1, 0], [0, 4], [2, 2]])
    path.write_bytes(b"")
    return [path], "Matrix Market"


def bad_h5ad_as_10x(tmp):
    return [_h5ad(tmp, [[1, 0], [0, 3]]), "--format", "10x-h5"], "no 10x count matrix"


BAD_INPUTS = [f for name, f in sorted(globals().items()) if name.startswith("bad_")]


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__[4:])
def test_bad_input_gives_one_line_naming_the_file_and_no_output(tmp_path, capsys, make_bad):
    args, problem = make_bad(tmp_path)
    args = list(args)
    named = args[0]
    if "--name" in args:  # the file at fault is a companion of the input
        named = args.pop(args.index("--name") + 1)
        args.remove("--name")
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", *args, "--out", paths["out"], "--summary", paths["summary"],
                      "--split", paths["split"])
    assert status == 2
    lines = err.strip().splitlines()
    error_lines = [line for line in lines if ": error: " in line]
    assert len(error_lines) == 1 and error_lines[0] == lines[-1], err
    assert str(named) in error_lines[0] and problem in error_lines[0], error_lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_input_leaves_an_existing_output_untouched(tmp_path, capsys):
    paths = outputs(tmp_path)
    paths["out"].parent.mkdir()
    paths["out"].write_bytes(b"earlier result")
    status, _ = run(capsys, "prepare", V2_MULTI, "--out", paths["out"])
    assert status == 2 and paths["out"].read_bytes() == b"earlier result"
    assert os.listdir(paths["out"].parent) == ["counts.h5ad"]


def test_stratify_needs_labels(tmp_path, capsys):
    paths = outputs(tmp_path)
    status, err = run(capsys, "prepare", V2, "--out", paths["out"], "--split", paths["split"], "--stratify")
    assert status == 2 and "--stratify needs --labels" in err and not (tmp_path / "out").exists()


def test_console_script_reports_bad_file_without_traceback(tmp_path):
    exe = shutil.which("scvae-torch")
    command = [exe] if exe else [sys.executable, "-m", "scvae_torch.cli"]
    bad = tmp_path / "x.h5"
    bad.write_text("not hdf5")
    result = subprocess.run([*command, "prepare", str(bad), "--out", str(tmp_path / "o.h5ad")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and str(bad) in result.stderr
    assert not (tmp_path / "o.h5ad").exists()
