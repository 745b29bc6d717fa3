"""Benchmark: simulate MB-20k-shaped single-cell counts (20,000 cells x 27,998 genes, 93% zeros).

Usage: python benchmarks/bench_simulate.py [--cells 20000] [--genes 27998] [--types 6] [--sparsity 0.93] [--seed 0]
Times scvae_torch.simulate.single_cell (wall and CPU seconds) and prints the realised sparsity, the peak resident
set size of the process (imports included), and the bytes of the resulting CSR arrays next to those of a dense
float32 matrix of the same shape; then runs it again under tracemalloc (which slows it down, so untimed) for the
peak of the numpy buffers alone.
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

from scvae_torch.simulate import single_cell

MB = 1 << 20


def main() -> None:
    """Parse the sizes, run the generator once, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--genes", type=int, default=27998)
    parser.add_argument("--types", type=int, default=6)
    parser.add_argument("--sparsity", type=float, default=0.93)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run = lambda: single_cell(args.cells, args.genes, args.types, seed=args.seed, sparsity=args.sparsity)
    wall, cpu = time.perf_counter(), time.process_time()
    X = run().X
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    csr = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    print(f"single_cell({args.cells}, {args.genes}, {args.types}, sparsity={args.sparsity}, seed={args.seed})")
    print(f"  wall {wall:.2f} s, cpu {cpu:.2f} s")
    print(f"  zeros {100 * (1 - X.nnz / (X.shape[0] * X.shape[1])):.2f}% (target {100 * args.sparsity:.2f}%), "
          f"{X.nnz} non-zeros, mean library {X.sum() / X.shape[0]:.0f}")
    print(f"  peak RSS {rss:.0f} MB, CSR arrays {csr / MB:.0f} MB, "
          f"dense float32 would be {X.shape[0] * X.shape[1] * 4 / MB:.0f} MB")
    del X
    tracemalloc.start()
    run()
    print(f"  peak traced (numpy buffers, second run) {tracemalloc.get_traced_memory()[1] / MB:.0f} MB")
    tracemalloc.stop()

if __name__ == "__main__":
    main()
