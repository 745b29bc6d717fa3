"""Micro-benchmark: dense vs sparse-aware per-cell log-likelihood, forward + backward, float32 CPU.

Usage: python benchmarks/bench_likelihood.py [--cells 128] [--genes 28000] [--zeros 0.93] [--repeats 7]
                                            [--threads N] [--device cpu|cuda]
Prints, per likelihood, the median seconds of log_prob_cells(...).sum().backward() with a dense count
minibatch and with the same minibatch as a torch sparse CSR tensor, their ratio, and the largest
difference between the two per-cell values (float32 rounding; the tests check equality in float64).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from scvae_torch import distributions as D


def make_batch(cells: int, genes: int, zeros: float, seed: int) -> torch.Tensor:
    """A float32 count minibatch with the given fraction of zeros and heavy-tailed non-zero counts."""
    g = torch.Generator().manual_seed(seed)
    nonzero = torch.rand(cells, genes, generator=g) >= zeros
    counts = 1 + torch.poisson(torch.exp(torch.randn(cells, genes, generator=g) * 1.5), generator=g)
    return counts * nonzero


def make_params(likelihood: str, cells: int, genes: int, seed: int) -> dict[str, torch.Tensor]:
    """Decoder-like float32 parameters (log_theta per gene), as leaves needing gradients."""
    g = torch.Generator().manual_seed(seed + 1)
    shapes = {"log_mean": (cells, genes), "log_theta": (genes,), "logit_pi": (cells, genes)}
    return {
        name: (torch.randn(*shapes[name], generator=g) * 2).requires_grad_()
        for name in D.PARAMETERS[likelihood]
    }


def time_one(likelihood: str, x: torch.Tensor, params: dict[str, torch.Tensor], repeats: int) -> float:
    """Median wall time of one forward + backward pass."""
    times = []
    for _ in range(repeats + 2):  # the first two passes warm up and are dropped
        for p in params.values():
            p.grad = None
        _synchronize(x.device)
        start = time.perf_counter()
        D.log_prob_cells(likelihood, x, params).sum().backward()
        _synchronize(x.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    """Run the benchmark and print one line per likelihood."""
    warnings.filterwarnings("ignore", "Sparse CSR tensor support", UserWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=128)
    parser.add_argument("--genes", type=int, default=28000)
    parser.add_argument("--zeros", type=float, default=0.93)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    x = make_batch(args.cells, args.genes, args.zeros, args.seed).to(device)
    x_csr = x.to_sparse_csr()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 {device.type}; "
        f"batch {args.cells} x {args.genes}, {1 - x_csr.values().numel() / x.numel():.1%} zeros; "
        f"forward + backward, median of {args.repeats}"
    )
    print(f"{'likelihood':<10} {'dense s':>9} {'sparse s':>9} {'speed-up':>9} {'max |diff|':>11}")
    for likelihood in D.LIKELIHOODS:
        params = {k: v.detach().to(device).requires_grad_() for k, v in
                  make_params(likelihood, args.cells, args.genes, args.seed).items()}
        dense = time_one(likelihood, x, params, args.repeats)
        sparse = time_one(likelihood, x_csr, params, args.repeats)
        with torch.no_grad():
            diff = (D.log_prob_cells(likelihood, x, params) - D.log_prob_cells(likelihood, x_csr, params)).abs()
        print(f"{likelihood:<10} {dense:9.4f} {sparse:9.4f} {dense / sparse:8.1f}x {diff.max().item():11.3g}")


if __name__ == "__main__":
    main()
