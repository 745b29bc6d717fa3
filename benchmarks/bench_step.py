"""Benchmark: where one training minibatch's time goes, and the alternatives measured for it (CPU).

Usage:
  python benchmarks/bench_step.py [--genes 27998] [--batch 128] [--density 0.07] [--threads 2] [--steps 40]
      [--likelihoods poisson,nb,zinb] [--compile]

Random MB-20k-shaped minibatches (counts 1 + Poisson(2) at 7% density), VAE with one hidden layer of 128
and latent 10 as in bench_train.py. Prints:
  1. ms per minibatch of the training step (forward, backward, Adam) per likelihood and the minor page
     faults per step, with freed memory kept for reuse (training.reuse_freed_memory) and without, and with
     --compile also with training's compile option (training.compile_model), alone and with the MLPs and
     the decoder compiled as well; each in a fresh process, since the allocator setting is process-wide;
  2. the NB step with the encoder's first layer as torch.sparse.mm of the CSR minibatch (weights kept
     transposed, the minibatch converted to CSC by scipy for the weight gradient) against the dense layer;
     and that layer alone, dense against F.embedding_bag of the stored entries;
  3. the encoders' input: scipy toarray + dense log1p against models.encoder_input on the CSR minibatch;
  4. the five large matrix products of one step in float32 and bfloat16;
  5. single element-wise passes over a cells x genes tensor whose inputs are not in cache;
  6. with --compile: the x = 0 part with its derivatives (distributions.dense_zero_part), eager against
     torch.compile.
Numbers depend on the machine's load: the header prints it; run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")


def _timed(f, n: int) -> float:
    """Mean milliseconds of f() over n calls, after 3 warm-up calls."""
    for _ in range(3):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def _counts(args, cells: int, seed: int = 0):
    """A random CSR count matrix of the benchmark's shape."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    return sp.random(cells, args.genes, density=args.density, format="csr", random_state=seed,
                     data_rvs=lambda n: rng.poisson(2, n) + 1).astype(np.float32)


def _sparse_first_layer(model):
    """Replace the VAE encoder's first layer by torch.sparse.mm with transposed weights (a measured alternative)."""
    import scipy.sparse as sp
    import torch

    class SparseLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, crow, col, values, shape, weight_t, bias):
            out = torch.sparse.mm(torch.sparse_csr_tensor(crow, col, values, shape), weight_t) + bias
            csc = sp.csr_matrix((values.numpy(), col.numpy(), crow.numpy()), shape=shape).tocsc()
            ctx.transposed = torch.sparse_csr_tensor(torch.from_numpy(csc.indptr).long(),
                                                     torch.from_numpy(csc.indices).long(),
                                                     torch.from_numpy(csc.data), (shape[1], shape[0]))
            return out

        @staticmethod
        def backward(ctx, grad):
            return None, None, None, None, torch.sparse.mm(ctx.transposed, grad), grad.sum(0)

    first = model.encoder.net[0]
    weight_t = torch.nn.Parameter(first.weight.detach().t().contiguous())
    model.register_parameter("first_weight_t", weight_t)
    del first.weight
    rest = model.encoder.net[1:]

    def encode(x):
        h = rest(SparseLinear.apply(x.crow_indices(), x.col_indices(), torch.log1p(x.values()), tuple(x.shape),
                                    weight_t, first.bias))
        return model.z_mu(h), model.z_logvar(h).clamp(-15, 15)

    model.encode = encode


def worker(job: dict) -> dict:
    """Time the training step for one likelihood in this process; a JSON-able result."""
    import torch

    from scvae_torch.batches import MemorySource
    from scvae_torch.models import build_model
    from scvae_torch.training import TrainConfig, adam, compile_model, reuse_freed_memory

    torch.set_num_threads(job["threads"])
    if job["reuse"]:
        reuse_freed_memory()
    args = argparse.Namespace(**job)
    source = MemorySource(_counts(args, 20 * job["batch"]))
    torch.manual_seed(0)
    model = build_model(dict(model="vae", likelihood=job["likelihood"], encoder=[128], decoder=[128], latent=10,
                             n_features=job["genes"], log1p_input=True))
    if job.get("sparse_first_layer"):
        _sparse_first_layer(model)
    if job.get("compile") and not compile_model(model, torch.device("cpu")):
        return {"error": "torch.compile is unavailable here"}
    if job.get("compile_modules"):  # what the compile option also did before: the MLPs and the whole decoder
        for child in (model.encoder, model.decoder):
            child.compile()
    optimiser = adam(model, TrainConfig())
    parts = dict.fromkeys(("forward", "backward", "adam"), 0.0)

    def step(i: int) -> None:
        batch = source.batch(np.arange(i % 20 * job["batch"], (i % 20 + 1) * job["batch"]))
        t0 = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss = model(batch.counts)["loss"]
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimiser.step()
        t3 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[key] += dt

    for i in range(5):
        step(i)
    parts = dict.fromkeys(parts, 0.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for i in range(job["steps"]):
        step(i)
    total = (time.perf_counter() - t) / job["steps"] * 1e3
    return {"total": total, **{k: v / job["steps"] * 1e3 for k, v in parts.items()},
            "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / job["steps"]}


def run_worker(job: dict) -> dict:
    """worker(job) in a fresh process."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": (proc.stderr or "no output").strip().splitlines()[-1]}


def main() -> None:
    """Parse arguments and print the six measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--genes", type=int, default=27998)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.07)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--likelihoods", default="poisson,nb,zinb")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch
    import torch.nn.functional as F

    from scvae_torch.models import encoder_input
    from scvae_torch.training import reuse_freed_memory

    load = os.getloadavg()
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"torch {torch.__version__}, {args.threads} threads; minibatch {args.batch} x {args.genes} at "
          f"{args.density:.0%} non-zeros")
    base = dict(genes=args.genes, batch=args.batch, density=args.density, threads=args.threads, steps=args.steps)

    print("\n## 1. training step, ms per minibatch (minor page faults per step)")
    print("likelihood | freed memory | total | forward | backward | Adam | faults")
    print("--- | --- | --- | --- | --- | --- | ---")
    for likelihood in args.likelihoods.split(","):
        for reuse, compiled in ((True, False), (False, False)) + (((True, True),) if args.compile else ()):
            r = run_worker({**base, "likelihood": likelihood, "reuse": reuse, "compile": compiled})
            kept = ("kept for reuse" if reuse else "returned (glibc default)") + (", compiled" if compiled else "")
            print(f"{likelihood} | {kept} | " + (r["error"] if "error" in r else
                  f"{r['total']:.1f} | {r['forward']:.1f} | {r['backward']:.1f} | {r['adam']:.1f} | "
                  f"{r['faults']:.0f}"), flush=True)
        if args.compile:
            r = run_worker({**base, "likelihood": likelihood, "reuse": True, "compile": True, "compile_modules": True})
            print(f"{likelihood} | kept for reuse, compiled, MLPs and decoder compiled too | " + (
                r["error"] if "error" in r else f"{r['total']:.1f} | {r['forward']:.1f} | {r['backward']:.1f} | "
                f"{r['adam']:.1f} | {r['faults']:.0f}"), flush=True)

    print("\n## 2. NB step, encoder's first layer dense or torch.sparse.mm (ms per minibatch)")
    for sparse in (False, True):
        r = run_worker({**base, "likelihood": "nb", "reuse": True, "sparse_first_layer": sparse})
        print(f"{'sparse.mm + CSC for the gradient' if sparse else 'dense'}: " +
              (r["error"] if "error" in r else f"{r['total']:.1f}"), flush=True)

    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    S = _counts(args, args.batch)
    from scvae_torch.batches import torch_csr

    csr = torch_csr(S.indptr, S.indices, S.data, S.shape)
    # the first layer alone, forward and backward: dense input against F.embedding_bag of the stored entries
    weight = torch.randn(128, args.genes, requires_grad=True)
    weight_t = torch.randn(args.genes, 128, requires_grad=True)
    dense_in = torch.log1p(torch.from_numpy(S.toarray()))
    index, offsets = torch.from_numpy(S.indices).long(), torch.from_numpy(S.indptr[:-1]).long()
    per_entry = torch.log1p(torch.from_numpy(S.data))

    def dense_layer():
        F.linear(dense_in, weight).sum().backward()
        weight.grad = None

    def bag_layer():
        F.embedding_bag(index, weight_t, offsets, mode="sum", per_sample_weights=per_entry).sum().backward()
        weight_t.grad = None

    print(f"the first layer alone, forward + backward: dense {_timed(dense_layer, 20):.1f}, "
          f"F.embedding_bag with per-entry weights {_timed(bag_layer, 20):.1f}")
    print("\n## 3. the encoders' input (ms)")
    print(f"scipy toarray + dense log1p: {_timed(lambda: torch.log1p(torch.from_numpy(S.toarray())), 30):.2f}")
    print(f"models.encoder_input on the CSR minibatch: {_timed(lambda: encoder_input(csr, True), 30):.2f}")

    print("\n## 4. the five large matrix products of one step (ms)")
    H, B, G = 128, args.batch, args.genes
    shapes = {"encoder forward x @ W.T": ((B, G), (G, H)), "encoder weight gradient g.T @ x": ((H, B), (B, G)),
              "decoder forward h @ W.T": ((B, H), (H, G)), "decoder weight gradient g.T @ h": ((G, B), (B, H)),
              "decoder input gradient g @ W": ((B, G), (G, H))}
    print("product | float32 | bfloat16")
    print("--- | --- | ---")
    sums = [0.0, 0.0]
    for name, (a, b) in shapes.items():
        times = []
        for dtype in (torch.float32, torch.bfloat16):
            left, right = torch.randn(*a, dtype=dtype), torch.randn(*b, dtype=dtype)
            times.append(_timed(lambda: left @ right, 20))
        sums = [s + t for s, t in zip(sums, times)]
        print(f"{name} | {times[0]:.2f} | {times[1]:.2f}")
    print(f"all five | {sums[0]:.2f} | {sums[1]:.2f}")

    print("\n## 5. one element-wise pass over a minibatch x genes tensor, inputs not in cache (ms)")
    pool = [(torch.randn(B, G), torch.randn(B, G)) for _ in range(12)]  # 12 x 2 x 14 MB: beyond the caches
    ops = {"multiply": lambda u, v: u * v, "exp": lambda u, v: torch.exp(u), "sigmoid": lambda u, v: torch.sigmoid(u),
           "softplus": lambda u, v: F.softplus(u), "logaddexp": lambda u, v: torch.logaddexp(u, v)}
    for name, op in ops.items():
        i = iter(range(10 ** 9))
        print(f"{name}: {_timed(lambda: op(*pool[next(i) % len(pool)]), 36):.2f}")

    if args.compile:
        print("\n## 6. x = 0 part with its derivatives: eager vs torch.compile (ms; compile time in s)")

        from scvae_torch.distributions import dense_zero_part

        sets = [(torch.randn(B, G), torch.randn(G) * 0.1, torch.randn(B, G)) for _ in range(8)]
        compiled = torch.compile(dense_zero_part, dynamic=True)
        for likelihood in args.likelihoods.split(","):
            i = iter(range(10 ** 9))
            eager = _timed(lambda: dense_zero_part(likelihood, *sets[next(i) % 8], True), 30)
            t = time.perf_counter()
            compiled(likelihood, *sets[0], True)
            seconds = time.perf_counter() - t
            i = iter(range(10 ** 9))
            print(f"{likelihood}: eager {eager:.2f}, compiled "
                  f"{_timed(lambda: compiled(likelihood, *sets[next(i) % 8], True), 30):.2f} "
                  f"(first call {seconds:.1f} s)", flush=True)
    load = os.getloadavg()
    print(f"\n# load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
