"""Property-based fuzzing of every reader (10x HDF5 v2/v3, h5ad in CSR/CSC/dense, Matrix Market text/gz in the
10x MEX and NAME.counts.mtx layouts): random shapes, dtypes, values (negative, NaN, inf, fractions), sparse
layouts, broken pointer arrays, damaged and random bytes.

The property: the reader returns exactly the matrix the test built, or raises DataError whose message is one
line naming the file; never another exception. Each example also goes through `scvae-torch prepare`: exit 0 and
the same matrix in the canonical file, or exit 2, one stderr line, and no output file.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import FUZZ, REFUSAL, assert_one_line_error, run_main, tried

from scvae_torch import data
from scvae_torch.data import DataError

pytestmark = pytest.mark.reliability

# RELIABILITY_EXAMPLES=1000 for a longer hunt; 100 per reader keeps the suite quick
# CI tries a fixed (derandomized) set of examples, so a green run stays green; setting RELIABILITY_EXAMPLES
# hunts with fresh random examples (that is how scipy's Matrix Market crash on malformed bodies was found).
FUZZ_SETTINGS = settings(max_examples=int(os.environ.get("RELIABILITY_EXAMPLES", 100)), deadline=None,
                         derandomize="RELIABILITY_EXAMPLES" not in os.environ, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = ["int32", "int64", "uint16", "bool", "float32", "float64"]
VALUE_FLAWS = ["negative", "nan", "inf", "-inf", "fraction"]
READ, REFUSED = "read back exactly", "refused in one line"
OTHER = "parsed as another matrix (damage inside a text file or HDF5 data: no checksum in these formats)"


# ---- what the test builds: a matrix, its names, and at most one flaw ------------------------------

SHAPE_FLAWS = ["no-cells", "no-genes", "duplicate-cells"]


def flaws(draw, layout_flaws: list[str]) -> str | None:
    """No flaw in about half the examples, else one value, shape or layout flaw."""
    every = VALUE_FLAWS + SHAPE_FLAWS + layout_flaws
    return draw(st.sampled_from([None] * len(every) + every))


@st.composite
def matrices(draw, flaw: str | None = None, nonzero: bool = False):
    """(M cells x genes as float64 holding the intended values, storage dtype) with the value or shape flaw."""
    n_cells = 0 if flaw == "no-cells" else draw(st.integers(1, 7))
    n_genes = 0 if flaw == "no-genes" else draw(st.integers(1, 7))
    dtypes = {"negative": ["int32", "int64", "float32", "float64"]}.get(
        flaw, ["float32", "float64"] if flaw in VALUE_FLAWS else DTYPES)
    dtype = draw(st.sampled_from(dtypes))
    high = 1 if dtype == "bool" else 60000 if dtype == "uint16" else 10 ** draw(st.sampled_from([1, 3, 6]))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    M = rng.integers(1, high + 1, size=(n_cells, n_genes)).astype(np.float64)
    M[rng.random((n_cells, n_genes)) >= density] = 0
    if M.size and (nonzero or flaw in VALUE_FLAWS):
        i, j = rng.integers(n_cells), rng.integers(n_genes)
        M[i, j] = {"negative": -3.0, "nan": np.nan, "inf": np.inf, "-inf": -np.inf, "fraction": 2.5}.get(flaw, 1.0)
    return M, dtype


def names(n: int, prefix: str, duplicate: bool = False) -> list[str]:
    values = [f"{prefix}{i}" for i in range(n)]
    if duplicate and n >= 2:
        values[-1] = values[0]
    return values


def stored(M: np.ndarray, dtype: str) -> np.ndarray:
    """M in the storage dtype (the flaws were only drawn where that dtype can hold them)."""
    with np.errstate(invalid="ignore"):
        return M.astype(dtype)


LAYOUT_FLAWS = ["indptr", "indptr-length", "indices", "data-length", "shape", "missing", "strings"]


def compressed_arrays(M: np.ndarray, dtype: str, rng: np.random.Generator, variant: str | None,
                      flaw: str | None) -> dict:
    """CSR arrays of M (rows = cells): data, indices, indptr; a valid variant or one layout flaw applied."""
    X = sp.csr_matrix(stored(M, dtype))
    data_, indices, indptr = X.data.copy(), X.indices.astype(np.int64), X.indptr.astype(np.int64)
    if variant == "explicit-zeros" and M.size:  # stored zeros are allowed and must not count as non-zeros
        row = int(rng.integers(M.shape[0]))
        pos = indptr[row + 1]
        data_ = np.insert(data_, pos, 0)
        indices = np.insert(indices, pos, int(rng.integers(M.shape[1])))
        indptr[row + 1:] += 1
    elif variant == "unsorted":  # column indices out of order within rows
        for r in range(M.shape[0]):
            a, b = indptr[r], indptr[r + 1]
            data_[a:b], indices[a:b] = data_[a:b][::-1].copy(), indices[a:b][::-1].copy()
    nnz = len(data_)
    if flaw == "indptr":
        indptr[1] = nnz + 1
    elif flaw == "indptr-length":
        indptr = indptr[:-1]
    elif flaw == "indices":
        indices[int(rng.integers(nnz))] = M.shape[1] + int(rng.integers(0, 3)) if rng.random() < 0.7 else -1
    elif flaw == "data-length":
        data_ = np.append(data_, data_[:1] if nnz else np.ones(1, dtype=data_.dtype))
    elif flaw == "strings":
        data_ = np.array([b"x"] * nnz, dtype="S1")
    return {"data": data_, "indices": indices, "indptr": indptr}


NEEDS_NONZERO = ["indices", "strings", "out-of-range", "zero-index", "pattern"]


# ---- checking one example ------------------------------------------------------------------------

def check(path: Path, expected: tuple | None, folder: Path, **options) -> None:
    """Read `path`: the expected (X, genes, cells) exactly, or (expected None) a one-line DataError naming a file
    in `folder`; then the same through `scvae-torch prepare`."""
    try:
        counts = data.read_counts(str(path), **options)
    except DataError as err:
        message = str(err)
        assert expected is None, f"refused a good file: {message}"
        assert "\n" not in message and message.startswith(str(folder)), message
        outcome = REFUSED
    else:
        assert expected is not None, f"read a bad file: {counts.X.toarray()}"
        X, genes, cells = expected
        assert counts.X.shape == X.shape and counts.X.dtype == np.float32
        assert np.array_equal(counts.X.toarray(), X.astype(np.float32))
        assert counts.X.nnz == np.count_nonzero(X)  # stored zeros dropped
        assert list(counts.genes) == list(genes) and list(counts.cells) == list(cells)
        outcome = READ
    out = folder.parent / "out" / "counts.h5ad"
    args = [str(path), "--out", str(out)] + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    done = run_main("prepare", *args)
    if outcome == REFUSED:
        assert_one_line_error(done, "scvae-torch prepare: error:", str(folder), code=2)
        assert not out.parent.exists() or not any(out.parent.iterdir())
    else:
        assert done.returncode == 0, done.stderr
        assert np.array_equal(data.load_canonical(str(out)).X.toarray(), expected[0].astype(np.float32))
    tried(outcome)


def expected_of(M: np.ndarray, layout_flaw, genes, cells, keep: np.ndarray | None = None) -> tuple | None:
    """What a correct reader returns, or None when it must refuse: a broken layout, a value that is not a count
    (NaN, inf, negative, fraction) among the features kept, no cells or genes, or duplicate cell ids."""
    if keep is not None:  # features the reader drops (10x v3: not 'Gene Expression') are not checked
        M, genes = M[:, keep], [g for g, k in zip(genes, keep) if k]
    with np.errstate(invalid="ignore"):
        not_counts = bool((~np.isfinite(M) | (M < 0) | (M != np.round(M))).any())
    bad = layout_flaw is not None or not_counts or 0 in M.shape or len(set(cells)) < len(cells)
    return None if bad else (M, genes, cells)


def draw_matrix(draw, kinds) -> tuple[str | None, np.ndarray, np.dtype, bool]:
    """A flaw drawn from kinds (or none), a matrix for it, and whether the cell ids are to repeat."""
    flaw = flaws(draw, kinds)
    M, dtype = draw(matrices(flaw, nonzero=flaw in NEEDS_NONZERO))
    return flaw, M, dtype, flaw == "duplicate-cells"


# ---- 10x Cell Ranger HDF5 ------------------------------------------------------------------------

@FUZZ
@FUZZ_SETTINGS
@given(st.data())
def test_10x_hdf5_v2_and_v3(draw_data):
    draw = draw_data.draw
    flaw, M, dtype, duplicate_cells = draw_matrix(draw, LAYOUT_FLAWS)
    version = draw(st.sampled_from(["v2", "v3"]))
    variant = draw(st.sampled_from([None, "explicit-zeros", "unsorted"]))
    layout = flaw if flaw in LAYOUT_FLAWS else None
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    n_cells, n_genes = M.shape
    cells, ids = names(n_cells, "AAAC-", duplicate_cells), names(n_genes, "ENSG")
    genes = [f"sym{i}" for i in range(n_genes)]
    arrays = compressed_arrays(M, dtype, rng, variant, layout)
    keep = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        path = folder / "filtered.h5"
        with h5py.File(path, "w") as f:
            g = f.create_group("matrix" if version == "v3" else "GRCh38")
            for name, value in arrays.items():
                if not (layout == "missing" and name == "indptr"):
                    g[name] = value
            g["shape"] = np.array([n_genes + (layout == "shape"), n_cells], dtype=np.int32)
            g["barcodes"] = np.array(cells, dtype="S")
            if version == "v3":
                types = rng.choice(["Gene Expression", "Gene Expression", "Antibody Capture"], n_genes)
                keep = types == "Gene Expression"
                feats = g.create_group("features")
                feats["id"], feats["name"] = np.array(ids, dtype="S"), np.array(genes, dtype="S")
                feats["feature_type"], feats["genome"] = np.array(types, dtype="S"), np.array(["GRCh38"] * n_genes,
                                                                                              dtype="S")
            else:
                g["genes"], g["gene_names"] = np.array(ids, dtype="S"), np.array(genes, dtype="S")
        check(path, expected_of(M, layout, genes, cells, keep), folder, format="10x-h5")


# ---- AnnData h5ad --------------------------------------------------------------------------------

@FUZZ
@FUZZ_SETTINGS
@given(st.data())
def test_h5ad_csr_csc_and_dense(draw_data):
    draw = draw_data.draw
    storage = draw(st.sampled_from(["csr", "csc", "dense"]))
    # anndata writes the shape attribute itself; data stored as strings: see the 10x case
    flaw = flaws(draw, [f for f in LAYOUT_FLAWS if f not in ("shape", "strings")] if storage != "dense" else [])
    M, dtype = draw(matrices(flaw, nonzero=flaw in NEEDS_NONZERO))
    layout = flaw if flaw in LAYOUT_FLAWS else None
    duplicate_cells = flaw == "duplicate-cells"
    n_cells, n_genes = M.shape
    cells, genes = names(n_cells, "cell", duplicate_cells), names(n_genes, "gene")
    values = stored(M, dtype)
    X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[storage](values)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        path = folder / "counts.h5ad"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata warns about duplicate names; the reader must refuse them
            ad.AnnData(X=X, obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)).write_h5ad(path)
        if layout is not None:
            rng = np.random.default_rng(draw(st.integers(0, 1000)))
            # CSC arrays are CSR arrays of the transpose: break them the same way
            arrays = compressed_arrays(M if storage == "csr" else M.T, dtype, rng, None, layout)
            with h5py.File(path, "r+") as f:
                for name in ("data", "indices", "indptr"):
                    del f["X"][name]
                    if not (layout == "missing" and name == "indptr"):
                        f["X"][name] = arrays[name]
        check(path, expected_of(M, layout, genes, cells), folder, format="h5ad")


# ---- Matrix Market -------------------------------------------------------------------------------

MTX_FLAWS = ["out-of-range", "zero-index", "nnz", "banner", "pattern", "barcodes", "empty-genes"]


def mtx_text(M: np.ndarray, dtype: str, genes_as_rows: bool, flaw: str | None) -> str:
    """A coordinate Matrix Market file of M written by hand (so any flaw can be planted)."""
    A = M.T if genes_as_rows else M
    field = "pattern" if flaw == "pattern" else "integer" if not dtype.startswith("float") else "real"
    rows, cols = np.nonzero(np.nan_to_num(A, nan=1.0) != 0) if A.size else (np.array([], int), np.array([], int))
    lines = []
    for r, c in zip(rows, cols):
        v = A[r, c]
        text = str(int(v)) if field == "integer" and np.isfinite(v) and v == int(v) else repr(float(v))
        lines.append(f"{r + 1} {c + 1}" + ("" if field == "pattern" else f" {text}"))
    if flaw == "out-of-range" and lines:
        lines[0] = f"{A.shape[0] + 1} 1 1"
    if flaw == "zero-index" and lines:
        lines[-1] = "0 " + lines[-1].split(" ", 1)[1]
    banner = "%%MatrixMarket matrix coordinate" if flaw != "banner" else "%%MatrixMarket matrix coordinates"
    size = f"{A.shape[0]} {A.shape[1]} {len(lines) + (flaw == 'nnz')}"
    return "\n".join([f"{banner} {field} general", "% written by the reliability suite", size, *lines]) + "\n"


def write_text(path: Path, text: str, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


@FUZZ
@FUZZ_SETTINGS
@given(st.data())
def test_matrix_market_mex_and_named_layouts(draw_data):
    draw = draw_data.draw
    flaw, M, dtype, duplicate_cells = draw_matrix(draw, MTX_FLAWS)
    layout = draw(st.sampled_from(["10x", "named"]))
    gz = draw(st.booleans())
    n_cells, n_genes = M.shape
    cells, ids = names(n_cells, "AAAC-", duplicate_cells), names(n_genes, "ENSG")
    genes = [f"sym{i}" for i in range(n_genes)] if layout == "10x" else ids
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        text = mtx_text(M, dtype, layout == "10x", flaw)
        listed_cells = cells[:-1] if flaw == "barcodes" and cells else cells
        gene_lines = "" if flaw == "empty-genes" else "".join(
            f"{i}\t{g}\tGene Expression\n" if layout == "10x" else f"{g}\n" for i, g in zip(ids, genes))
        if layout == "10x":
            write_text(folder / "matrix.mtx", text, gz)
            write_text(folder / "features.tsv", gene_lines, gz)
            write_text(folder / "barcodes.tsv", "".join(f"{c}\n" for c in listed_cells), gz)
            path = folder
        else:
            path = write_text(folder / "pbmc.counts.mtx", text, gz)
            write_text(folder / "pbmc.genes.tsv", gene_lines, gz)
            write_text(folder / "pbmc.cells.tsv", "cell\n" + "".join(f"{c}\n" for c in listed_cells), gz)
        check(path, expected_of(M, flaw if flaw in MTX_FLAWS else None, genes, cells), folder, format="mtx")


# ---- damaged and random bytes --------------------------------------------------------------------

def _valid_file(kind: str, folder: Path) -> tuple[Path, Path, tuple]:
    """A small valid input of each kind: (the path to read, the file to damage, expected result)."""
    rng = np.random.default_rng(5)
    M = rng.integers(0, 4, size=(6, 5)).astype(np.float64)
    cells, genes = names(6, "cell"), names(5, "gene")
    if kind == "h5ad":
        path = folder / "counts.h5ad"
        ad.AnnData(X=sp.csr_matrix(M.astype(np.int32)), obs=pd.DataFrame(index=cells),
                   var=pd.DataFrame(index=genes)).write_h5ad(path, compression="gzip")
        return path, path, (M, genes, cells)
    if kind == "10x-h5":
        path = folder / "filtered.h5"
        arrays = compressed_arrays(M, "int32", rng, None, None)
        with h5py.File(path, "w") as f:
            g = f.create_group("mm10")
            for name, value in arrays.items():
                g.create_dataset(name, data=value, compression="gzip")
            g["shape"] = np.array([5, 6], dtype=np.int32)
            g["barcodes"], g["genes"] = np.array(cells, dtype="S"), np.array(genes, dtype="S")
        return path, path, (M, genes, cells)
    gz = kind == "mtx.gz"
    path = write_text(folder / "pbmc.counts.mtx", mtx_text(M, "int32", False, None), gz)
    write_text(folder / "pbmc.genes.tsv", "".join(f"{g}\n" for g in genes), gz)
    write_text(folder / "pbmc.cells.tsv", "cell\n" + "".join(f"{c}\n" for c in cells), gz)
    return path, path, (M, genes, cells)


@FUZZ
@FUZZ_SETTINGS
@given(kind=st.sampled_from(["h5ad", "10x-h5", "mtx", "mtx.gz"]), how=st.sampled_from(["truncate", "flip", "random"]),
       where=st.floats(0, 1, exclude_max=True), blob=st.binary(min_size=1, max_size=64))
def test_damaged_or_random_bytes_are_refused_or_read_whole(kind, how, where, blob):
    """A cut HDF5 file is refused; a cut text file or flipped bytes may still parse (there is no checksum inside
    these formats: checksums guard downloads), so there the property is only: a matrix or one line, no traceback.
    Random bytes in place of the file are always refused."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        path, target, expected = _valid_file(kind, folder)
        content = target.read_bytes()
        at = int(where * len(content))
        if how == "truncate":
            damaged = content[:at]
        elif how == "flip":
            damaged = content[:at] + bytes(b ^ 0xFF for b in blob[: len(content) - at]) + content[at + len(blob):]
        else:
            damaged = blob * (1 + len(content) // len(blob))
        target.write_bytes(damaged)
        strict = how == "random" or (how == "truncate" and kind in ("h5ad", "10x-h5"))
        try:
            counts = data.read_counts(str(path))
        except DataError as err:
            assert "\n" not in str(err) and str(err).startswith(str(folder)), str(err)
            tried(REFUSED)
        else:
            assert not (strict and how == "random"), "random bytes were read as a matrix"
            if strict:
                assert np.array_equal(counts.X.toarray(), expected[0].astype(np.float32))
            tried(READ if np.array_equal(counts.X.toarray(), expected[0]) else OTHER)


# ---- non-finite values, named explicitly for every format -----------------------------------------

@REFUSAL
@pytest.mark.parametrize("kind", ["10x-h5", "h5ad", "mtx"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_counts_are_refused_naming_the_file(tmp_path, kind, value):
    M = np.ones((3, 4))
    M[1, 2] = value
    cells, genes = names(3, "c"), names(4, "g")
    folder = tmp_path / "in"
    folder.mkdir()
    if kind == "10x-h5":
        path = folder / "x.h5"
        with h5py.File(path, "w") as f:
            g = f.create_group("mm10")
            for name, v in compressed_arrays(M, "float32", np.random.default_rng(0), None, None).items():
                g[name] = v
            g["shape"] = np.array([4, 3])
            g["barcodes"], g["genes"] = np.array(cells, dtype="S"), np.array(genes, dtype="S")
    elif kind == "h5ad":
        path = folder / "x.h5ad"
        ad.AnnData(X=sp.csr_matrix(M.astype(np.float32)), obs=pd.DataFrame(index=cells),
                   var=pd.DataFrame(index=genes)).write_h5ad(path)
    else:
        path = write_text(folder / "x.counts.mtx", mtx_text(M, "float64", False, None), False)
        write_text(folder / "x.genes.tsv", "".join(f"{g}\n" for g in genes), False)
        write_text(folder / "x.cells.tsv", "cell\n" + "".join(f"{c}\n" for c in cells), False)
    with pytest.raises(DataError) as caught:
        data.read_counts(str(path))
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    assert "NaN or infinite" in str(caught.value) or "negative" in str(caught.value)
    done = run_main("prepare", str(path), "--out", str(tmp_path / "out.h5ad"))
    assert_one_line_error(done, str(path), code=2)
    assert not (tmp_path / "out.h5ad").exists()


@REFUSAL
def test_training_on_a_canonical_file_with_nan_is_one_line(tmp_path):
    """A counts.h5ad that bypassed `prepare` (NaN in X): `train` refuses it in one line before any training."""
    path = tmp_path / "counts.h5ad"
    X = np.ones((20, 4), dtype=np.float32)
    X[3, 1] = np.nan
    ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=names(20, "c")),
               var=pd.DataFrame(index=names(4, "g"))).write_h5ad(path)
    done = run_main("train", "--data", str(path), "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu")
    assert_one_line_error(done, str(path), "NaN or infinite", code=2)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
