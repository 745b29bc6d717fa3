"""Benchmark: read an MB-20k-shaped 10x Cell Ranger v2 HDF5 file (20,000 cells x 27,998 genes, ~93% zeros).

Usage: python benchmarks/bench_read.py [--cells 20000] [--genes 27998] [--zeros 0.93] [--seed 0]
                                       [--file PATH] [--no-prepare] [--streamed]
Simulates the file cell by cell (sparse generation, never a dense matrix; gzip level 1 + shuffle and chunk
sizes like Cell Ranger v2's PyTables files), then, each in a fresh process, times
  read:    scvae_torch.data.read_10x_h5 (validation included)
  prepare: read + summarize + write_canonical (what `scvae-torch prepare` does)
  prepare-streamed (with --streamed): the same conversion block by block (`prepare --stream on`)
and prints seconds, peak traced memory (tracemalloc: numpy buffers) and peak resident-set growth
(ru_maxrss, everything incl. HDF5 buffers) next to the bytes of the resulting CSR arrays and of a dense
float32 matrix. With --file the simulated file is kept there (and reused when it exists).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

MB = 1 << 20


def simulate_10x_v2(path: str, n_cells: int, n_genes: int, zeros: float, seed: int, block: int = 1000) -> int:
    """Write a Cell Ranger v2-layout file, block of cells by block; returns the number of non-zeros."""
    rng = np.random.default_rng(seed)
    opts = dict(compression="gzip", compression_opts=1, shuffle=True)
    with h5py.File(path, "w") as f:
        g = f.create_group("mm10")
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(16384,), **opts)
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(8192,), **opts)
        indptr = [0]
        for start in range(0, n_cells, block):
            per_cell = rng.binomial(n_genes, 1.0 - zeros, size=min(block, n_cells - start))
            genes = np.concatenate([np.sort(rng.choice(n_genes, size=k, replace=False)) for k in per_cell])
            values = rng.geometric(0.35, size=genes.size).astype(np.int32)  # counts >= 1, mean ~2.9
            end = data.shape[0] + genes.size
            data.resize((end,))
            indices.resize((end,))
            data[end - genes.size:] = values
            indices[end - genes.size:] = genes
            indptr.extend((indptr[-1] + np.cumsum(per_cell)).tolist())
        g.create_dataset("indptr", data=np.asarray(indptr, dtype=np.int64), **opts)
        g.create_dataset("shape", data=np.array([n_genes, n_cells], dtype=np.int32))
        g.create_dataset("barcodes", data=np.array([f"{i:016d}-1".encode() for i in range(n_cells)]), **opts)
        g.create_dataset("genes", data=np.array([f"ENSMUSG{i:011d}".encode() for i in range(n_genes)]), **opts)
        g.create_dataset("gene_names", data=np.array([f"Gene{i}".encode() for i in range(n_genes)]), **opts)
        return indptr[-1]


def measure(path: str, mode: str) -> dict:
    """In this (fresh) process: read (and for 'prepare' also summarize and write) and report time and memory."""
    import resource
    import tracemalloc

    from scvae_torch import data

    if mode.startswith("prepare"):
        import anndata  # noqa: F401  (import cost is not part of the measurement)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    if mode == "prepare-streamed":
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
            summary = data.write_prepared(data.prepare_input(path, stream="on"), os.path.join(tmp, "counts.h5ad"))
        seconds = time.perf_counter() - t0
        _, traced_peak = tracemalloc.get_traced_memory()
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cells, genes, nnz = summary["cells"], summary["genes"], summary["nonzeros"]
        return {"mode": mode, "seconds": seconds, "traced_peak": traced_peak, "rss_growth": rss_after - rss_before,
                "csr_bytes": 8 * nnz + 8 * (cells + 1), "shape": [cells, genes], "nnz": nnz,
                "dense_bytes": cells * genes * 4}
    counts = data.read_10x_h5(path)
    if mode == "prepare":
        data.summarize(counts)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
            data.write_canonical(counts, os.path.join(tmp, "counts.h5ad"))
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    X = counts.X
    return {"mode": mode, "seconds": seconds, "traced_peak": traced_peak, "rss_growth": rss_after - rss_before,
            "csr_bytes": X.data.nbytes + X.indices.nbytes + X.indptr.nbytes, "shape": list(X.shape),
            "nnz": int(X.nnz), "dense_bytes": X.shape[0] * X.shape[1] * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--genes", type=int, default=27998)
    parser.add_argument("--zeros", type=float, default=0.93)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file", default=None, help="keep the simulated file here (reused if it exists)")
    parser.add_argument("--no-prepare", action="store_true", help="skip the read + summary + write measurement")
    parser.add_argument("--streamed", action="store_true", help="also measure the block-by-block conversion")
    parser.add_argument("--measure", choices=("read", "prepare", "prepare-streamed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.file, args.measure)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or os.path.join(tmp, "mb20k_like.h5")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            nnz = simulate_10x_v2(path, args.cells, args.genes, args.zeros, args.seed)
            print(f"simulated {args.cells} x {args.genes} v2 file, {nnz:,} non-zeros "
                  f"({100 * (1 - nnz / (args.cells * args.genes)):.2f}% zeros), {os.path.getsize(path) / MB:.0f} MiB "
                  f"on disk, in {time.perf_counter() - t0:.1f} s")
        modes = (("read",) if args.no_prepare else ("read", "prepare")) + \
            (("prepare-streamed",) if args.streamed else ())
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--measure", mode, "--file", path],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:16s} {r['seconds']:6.2f} s   peak traced {r['traced_peak'] / MB:7.0f} MiB "
                  f"({r['traced_peak'] / r['csr_bytes']:.2f} x CSR)   peak RSS growth {r['rss_growth'] / MB:7.0f} MiB "
                  f"({r['rss_growth'] / r['csr_bytes']:.2f} x CSR)   CSR arrays {r['csr_bytes'] / MB:.0f} MiB, "
                  f"dense float32 would be {r['dense_bytes'] / MB:.0f} MiB")


if __name__ == "__main__":
    main()
