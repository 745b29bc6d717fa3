"""Minibatch sources for training and evaluation: a CSR matrix in memory (on the CPU, or moved to the GPU
once), or streamed from the canonical h5ad file in blocks of contiguous cells (out-of-core training).

Every source gives, for an array of cell indices, a `Batch`: the dense float32 counts (the encoders'
input) and the same cells as a torch sparse CSR tensor (the sparse-aware likelihood). No Python loop
runs over cells. The order of the cells in an epoch is a function of (seed, epoch) only, so that a
resumed run sees exactly the minibatches an uninterrupted one would.
"""

from __future__ import annotations

import collections
import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

if TYPE_CHECKING:
    import h5py

# Streaming: cells are read in blocks of this many contiguous cells; an epoch visits the blocks in a
# seeded random order, BLOCKS_PER_CHUNK blocks at a time, with the cells of those blocks shuffled together.
BLOCK_CELLS = 128
BLOCKS_PER_CHUNK = 16
# Resident on the GPU when data + indices take at most this share of its free memory.
GPU_RESIDENT_SHARE = 0.5


class SourceError(Exception):
    """A count file cannot be streamed (wrong layout, unreadable); one-line message naming the file."""


@dataclass
class Batch:
    """One minibatch on the device as a torch sparse CSR tensor (dense only where a caller asks for `x`).

    The models take the sparse tensor directly: the encoders densify it themselves (log1p applied to the
    stored values only) and the likelihood stays sparse-aware.
    """

    counts: Tensor

    @property
    def x(self) -> Tensor:
        """The counts as a dense tensor."""
        return self.counts if self.counts.layout == torch.strided else self.counts.to_dense()

    def __len__(self) -> int:
        return self.counts.shape[0]


class Source(Protocol):
    """Where minibatches come from."""

    shape: tuple[int, int]
    device: torch.device
    description: str

    def epoch_order(self, rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """The cells of `rows` in the order epoch `epoch` visits them."""

    def batch(self, rows: np.ndarray) -> Batch:
        """The given cells (in that order) as a Batch on the device."""


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffling of epoch `epoch`: a function of (seed, epoch) only, so resuming needs no saved state."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def torch_csr(indptr: np.ndarray | Tensor, indices: np.ndarray | Tensor, data: np.ndarray | Tensor,
              shape: tuple[int, int]) -> Tensor:
    """A torch sparse CSR tensor (int64 indices, float32 values) sharing memory with numpy arrays where it can."""
    parts = [torch.as_tensor(a) for a in (indptr, indices, data)]
    crow, col = (p.long() for p in parts[:2])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(crow, col, parts[2].float(), shape, check_invariants=False)


def _small_whole(values: np.ndarray) -> bool:
    """Whether every value is a whole number from 0 to 65,535 (NaN is not)."""
    return values.size == 0 or bool(values.min() >= 0 and values.max() <= np.iinfo(np.uint16).max
                                    and np.array_equal(values, np.rint(values)))


def _narrow(values: np.ndarray) -> np.ndarray:
    """Small whole numbers as uint8 when they fit, else uint16."""
    fits_byte = values.size == 0 or values.max() <= np.iinfo(np.uint8).max
    return values.astype(np.uint8 if fits_byte else np.uint16, copy=False)


def compact_counts(X: sp.spmatrix) -> sp.csr_matrix:
    """X as CSR with its values in the smallest unsigned integer type that holds them exactly (uint8, uint16).

    Counts are whole numbers, mostly small: stored as uint16 they take half of float32's memory (MB-20k:
    79 MB less). Minibatches are float32 as before. Values that are not such whole numbers stay float32.
    """
    X = X.tocsr()
    if X.dtype in (np.uint8, np.uint16):
        return X
    if X.data.size == 0 or not _small_whole(X.data):
        return X if X.dtype == np.float32 else X.astype(np.float32)
    return sp.csr_matrix((_narrow(X.data), X.indices, X.indptr), shape=X.shape)


def _on_device(S: sp.csr_matrix, device: torch.device) -> Batch:
    """A host CSR slice as a Batch on the device (from pinned memory when that is a GPU)."""
    if device.type == "cpu":
        return Batch(torch_csr(S.indptr, S.indices, S.data, S.shape))
    parts = [torch.from_numpy(np.ascontiguousarray(a)).pin_memory().to(device, non_blocking=True)
             for a in (S.indptr.astype(np.int64), S.indices.astype(np.int64), S.data.astype(np.float32))]
    return Batch(torch_csr(*parts, S.shape))


class MemorySource:
    """A CSR count matrix in memory; on a GPU it is moved there once when it fits, else sent per minibatch
    from pinned memory."""

    def __init__(self, X: sp.spmatrix, device: torch.device | str = "cpu", resident: bool | None = None):
        self.device = torch.device(device)
        X = compact_counts(X)
        self.X = X
        self.shape = X.shape
        if resident is None:  # float32 values and the indices on the GPU
            resident = self.device.type == "cuda" and fits_on_gpu(4 * X.nnz + 2 * X.indices.nbytes, self.device)
        self.resident = resident and self.device.type != "cpu"
        where = "on the GPU" if self.resident else "pinned per minibatch" if self.device.type != "cpu" else "CPU"
        self.description = f"in memory ({where}, {(X.data.nbytes + X.indices.nbytes) / 2 ** 20:.1f} MiB CSR)"
        if self.resident:
            self._indptr = X.indptr.astype(np.int64)
            self._indices = torch.from_numpy(X.indices).to(self.device)
            self._data = torch.from_numpy(X.data.astype(np.float32)).to(self.device)

    def epoch_order(self, rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """A seeded permutation of rows (the same as the in-memory training loop always used)."""
        rows = np.asarray(rows)
        return rows[epoch_permutation(len(rows), seed, epoch)]

    def batch(self, rows: np.ndarray) -> Batch:
        """The rows as a Batch: sliced by scipy on the host, or gathered on the GPU when resident."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.resident:
            return _on_device(self.X[rows], self.device)
        starts = self._indptr[rows]
        lengths = self._indptr[rows + 1] - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        total = int(offsets[-1])
        dev = self.device
        # entry j of output row r comes from entry starts[r] + j of the resident arrays
        shift = torch.from_numpy(starts - offsets[:-1]).to(dev, non_blocking=True)
        take = torch.repeat_interleave(shift, torch.from_numpy(lengths).to(dev, non_blocking=True),
                                       output_size=total) + torch.arange(total, device=dev)
        crow = torch.from_numpy(offsets).to(dev, non_blocking=True)
        return Batch(torch_csr(crow, self._indices[take], self._data[take], (len(rows), self.shape[1])))


def fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    """Whether nbytes take at most GPU_RESIDENT_SHARE of the device's free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= GPU_RESIDENT_SHARE * free


def _csr_group(path: str, f) -> h5py.Group:
    """The X group of an h5ad file, checked to be a CSR matrix."""
    import h5py

    X = f.get("X")
    if not isinstance(X, h5py.Group) or X.attrs.get("encoding-type") != "csr_matrix":
        kind = "missing" if X is None else X.attrs.get("encoding-type", "a dense array")
        raise SourceError(f"{path}: streaming needs X stored as a CSR matrix (canonical h5ad), found {kind}")
    for name in ("data", "indices", "indptr"):
        if name not in X:
            raise SourceError(f"{path}: X has no '{name}' array")
    return X


def csr_nbytes(path: str) -> int:
    """Bytes the h5ad file's X would take in memory as a float32 CSR matrix (data, int32 indices, indptr)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            X = _csr_group(path, f)
            return int(X["data"].shape[0]) * 8 + int(X["indptr"].shape[0]) * 8
    except OSError as err:
        raise SourceError(f"{path}: not a readable h5ad file ({err})") from None


COMPACT_CHUNK = 1 << 24  # values per HDF5 read when loading compactly (64 MiB of float32)


def load_compact(path: str | os.PathLike) -> sp.csr_matrix | None:
    """A canonical h5ad's X read chunk by chunk straight into compact storage (`compact_counts`), so that the
    float32 values are never held whole (for 200,000 MB-20k-shaped cells: 0.8 GB instead of 1.6 + 0.8 GB).

    None where that does not apply (values that are not whole numbers up to 65,535, an unexpected layout, a
    read error): the caller then loads the file the ordinary way, whose checks name the problem.
    """
    import h5py

    path = os.fspath(path)
    try:
        with h5py.File(path, "r") as f:
            X = _csr_group(path, f)
            shape = X.attrs.get("shape")
            if shape is None or len(shape) != 2:
                return None
            source = X["data"]
            data = np.empty(source.shape[0], dtype=np.uint16)
            for start in range(0, len(data), COMPACT_CHUNK):
                chunk = source[start:start + COMPACT_CHUNK]
                if not _small_whole(chunk):
                    return None
                data[start:start + len(chunk)] = chunk
            indices, indptr = X["indices"][:], X["indptr"][:]
    except (OSError, SourceError, KeyError, ValueError):
        return None
    if len(indptr) != int(shape[0]) + 1 or len(indices) != len(data) or (len(indptr) and indptr[-1] != len(data)):
        return None
    X = sp.csr_matrix((_narrow(data), indices, indptr), shape=(int(shape[0]), int(shape[1])))
    X.sum_duplicates()  # a no-op for a canonical file (checked by one pass)
    return X


def _not_counts(values: np.ndarray) -> str:
    """What is wrong with values that should be counts ('' when nothing is): NaN/infinite, negative, fractional."""
    if values.size == 0:
        return ""
    if not np.isfinite(values).all():
        return "NaN or infinite values"
    if values.min() < 0:
        return f"negative values (minimum {values.min():g})"
    if not np.array_equal(values, np.rint(values)):
        return "non-integer values"
    return ""


class StreamSource:
    """Minibatches read from an h5ad file's CSR X (X/data, X/indices, X/indptr) without loading it.

    Memory: the row offsets (8 bytes per cell) and a cache of 2 x BLOCKS_PER_CHUNK blocks of BLOCK_CELLS
    cells (more only when one minibatch spans more blocks), whatever the number of cells. An epoch visits
    blocks of contiguous cells in a seeded random order, BLOCKS_PER_CHUNK blocks at a time with their cells
    shuffled together, so that each block is read once per epoch.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu",
                 block_cells: int = BLOCK_CELLS, blocks_per_chunk: int = BLOCKS_PER_CHUNK):
        import h5py

        self.path = os.fspath(path)
        self.device = torch.device(device)
        self.block_cells, self.blocks_per_chunk = block_cells, blocks_per_chunk
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise SourceError(f"{self.path}: not a readable h5ad file ({err})") from None
        X = _csr_group(self.path, self._file)
        self._data, self._indices = X["data"], X["indices"]
        self._indptr = X["indptr"][:].astype(np.int64)
        shape = X.attrs.get("shape")
        n_genes = int(shape[1]) if shape is not None else int(self._indices[:].max()) + 1
        self.shape = (len(self._indptr) - 1, n_genes)
        self._n_file_genes = n_genes
        self._cache: collections.OrderedDict[int, sp.csr_matrix] = collections.OrderedDict()
        self._cache_size = 2 * blocks_per_chunk
        self.description = f"streamed from {self.path} (blocks of {block_cells} cells)"
        self.blocks_read = 0
        self._columns: np.ndarray | None = None

    def select_columns(self, order: np.ndarray) -> None:
        """From now on give the genes in `order` (indices of the file's columns), e.g. a run's gene order."""
        self._columns = np.asarray(order, dtype=np.int64)
        self.shape = (self.shape[0], len(self._columns))
        self._cache.clear()

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def epoch_order(self, rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """Blocks in a seeded random order, in chunks of blocks_per_chunk whose cells are shuffled together."""
        rows = np.asarray(rows, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64([seed, epoch]))
        blocks = rows // self.block_cells
        n_blocks = -(-self.shape[0] // self.block_cells)
        position = np.empty(n_blocks, dtype=np.int64)
        position[rng.permutation(n_blocks)] = np.arange(n_blocks)
        chunk = position[blocks] // self.blocks_per_chunk
        return rows[np.lexsort((rng.random(len(rows)), chunk))]

    def _block(self, b: int) -> sp.csr_matrix:
        """Block b (cells b*block_cells ...) as a CSR matrix, from the cache or the file."""
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        first, last = b * self.block_cells, min((b + 1) * self.block_cells, self.shape[0])
        lo, hi = self._indptr[first], self._indptr[last]
        try:
            data = self._data[lo:hi].astype(np.float32, copy=False)
            indices = self._indices[lo:hi]
        except OSError as err:
            raise SourceError(f"{self.path}: cannot read cells {first}-{last - 1} ({err})") from None
        problem = _not_counts(data)
        if problem:  # the in-memory reader refuses such a file up front; streaming finds out block by block
            raise SourceError(f"{self.path}: cells {first}-{last - 1} have {problem}; counts must be whole "
                              "numbers >= 0")
        block = sp.csr_matrix((data, indices, self._indptr[first:last + 1] - lo),
                              shape=(last - first, self._n_file_genes))
        if self._columns is not None:
            block = block[:, self._columns]
            block.sort_indices()
        self._cache[b] = block
        self.blocks_read += 1
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return block

    def batch(self, rows: np.ndarray) -> Batch:
        """The rows as a Batch, read block by block (one Python step per block, none per cell)."""
        rows = np.asarray(rows, dtype=np.int64)
        blocks = rows // self.block_cells
        order = np.argsort(blocks, kind="stable")
        ids, starts = np.unique(blocks[order], return_index=True)
        # keep this minibatch's blocks and a chunk's worth more, so that each block is read once per epoch
        self._cache_size = max(self._cache_size, len(ids) + self.blocks_per_chunk)
        parts = [self._block(int(b))[rows[order[s:e]] - b * self.block_cells]
                 for b, s, e in zip(ids, starts, np.append(starts[1:], len(rows)))]
        S = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
        S = S[np.argsort(order, kind="stable")]  # back to the order asked for
        return _on_device(S, self.device)


def read_annotations(path: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Cell ids, obs['label'] (or None) and gene names of an h5ad file, without reading X."""
    import anndata

    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as err:  # h5py/anndata raise OSError, KeyError, ... for damaged files
        raise SourceError(f"{path}: not a readable h5ad file ({type(err).__name__}: {err})") from None
    try:
        cells = adata.obs_names.to_numpy()
        labels = adata.obs["label"].to_numpy(dtype=object) if "label" in adata.obs else None
        genes = adata.var_names.to_numpy()
    finally:
        adata.file.close()
    return cells, labels, genes


BATCH_COLUMN = "batch"  # obs column of the canonical file holding the batch covariate


def batch_column(values, where: str) -> np.ndarray:
    """A batch column (pandas Series / array) as strings; cells without a batch are a SourceError naming `where`."""
    import pandas as pd

    column = pd.Series(np.asarray(values, dtype=object))
    missing = int(column.isna().sum() + (column.astype(str).str.strip().isin(["", "nan", "NaN", "None"])
                                         & column.notna()).sum())
    if missing:
        raise SourceError(f"{where}: {missing} cells without a batch (missing values); give every cell one, or "
                          "drop those cells")
    return column.astype(str).to_numpy()


def batch_codes(names: np.ndarray, categories: list[str], where: str) -> np.ndarray:
    """Integer codes (positions in `categories`) of batch names; a batch the model does not know is a SourceError."""
    lookup = {name: code for code, name in enumerate(categories)}
    unseen = sorted(set(np.unique(names).tolist()) - set(lookup))
    if unseen:
        raise SourceError(f"{where}: batch(es) {', '.join(map(repr, unseen[:5]))} not seen in training (the model "
                          f"knows {', '.join(map(repr, categories))})")
    return np.fromiter((lookup[n] for n in names), dtype=np.int64, count=len(names))


def read_batches(path: str, column: str = BATCH_COLUMN) -> np.ndarray:
    """obs[column] of an h5ad file as strings (one per cell), without reading X; a missing column or a cell
    without a batch is a SourceError."""
    import anndata

    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as err:  # h5py/anndata raise OSError, KeyError, ... for damaged files
        raise SourceError(f"{path}: not a readable h5ad file ({type(err).__name__}: {err})") from None
    try:
        if column not in adata.obs:
            raise SourceError(f"{path}: no obs[{column!r}] column; the model needs each cell's batch "
                              "(prepare --batch COLUMN writes it)")
        values = adata.obs[column].to_numpy(dtype=object)
    finally:
        adata.file.close()
    return batch_column(values, f"{path}: obs[{column!r}]")


def load_counts(path: str) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray | None, np.ndarray]:
    """X (compact where the counts allow: `load_compact`), cell ids, labels and gene names of a canonical h5ad;
    through the ordinary reader, with its checks and messages, where compact loading does not apply."""
    from . import data

    X = load_compact(path)
    if X is not None:
        cells, labels, genes = read_annotations(path)
        if X.shape == (len(cells), len(genes)):
            return X, cells, labels, genes
    counts = data.load_canonical(path)
    return compact_counts(counts.X), counts.cells, counts.labels, counts.genes


@contextlib.contextmanager
def closed_on_error(X):
    """Close X (a StreamSource: its file) if the block raises; anything else is left as it is."""
    try:
        yield
    except BaseException:
        if isinstance(X, StreamSource):
            X.close()
        raise


def open_source(X: sp.spmatrix | Source, device: torch.device) -> Source:
    """A Source for a scipy matrix (in memory), or the given Source itself."""
    return X if hasattr(X, "batch") and hasattr(X, "epoch_order") else MemorySource(X, device)


def batch_tensor(batch_codes: np.ndarray | Tensor | None, rows: np.ndarray, device: torch.device) -> Tensor | None:
    """The batch codes of `rows` as a long tensor on the device (None when there are none)."""
    if batch_codes is None:
        return None
    return torch.as_tensor(batch_codes[np.asarray(rows)], dtype=torch.long).to(device, non_blocking=True)
