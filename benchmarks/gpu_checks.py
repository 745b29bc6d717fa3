"""Checks that need a CUDA GPU (CI has none): run on a GPU machine, print one line per check, exit 1 on failure.

Usage: python benchmarks/gpu_checks.py [--out DIR] [--cpu-checkpoint DIR]
  1. sparse-aware ELBO and gradients on CUDA (batches gathered from the GPU-resident CSR) equal the dense
     ones, float64, VAE and GMVAE, every likelihood;
  2. GPU-resident and pinned-memory minibatches equal the rows of the CSR matrix;
  3. a checkpoint written on the GPU loads on the CPU (map_location) and gives the GPU's latent values;
     with --cpu-checkpoint DIR (a run folder trained on a CPU, holding expected_latent.npy of cells.npz),
     that one loads on the GPU and gives the CPU's values;
  4. training twice with the same seed on the GPU, and stopping/resuming, give identical weights (or the
     largest difference, when CUDA's atomic additions make the runs differ).
Writes DIR/gpu_checkpoint (a run folder) and DIR/gpu_expected_latent.npy for the reverse check on a CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scvae_torch.batches import MemorySource  # noqa: E402
from scvae_torch.models import build_model  # noqa: E402
from scvae_torch.training import TrainConfig, fit, load_checkpoint, load_model  # noqa: E402

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def counts(n=300, g=200, seed=0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=0.1, format="csr", random_state=seed, dtype=np.float64)
    X.data = np.ceil(np.exp(rng.normal(0.5, 1.5, X.nnz)))
    return X.astype(np.float32)


def elbo_and_grads(model, x, c):
    model.zero_grad()
    torch.manual_seed(0)
    out = model(x, counts=c)
    out["loss"].backward()
    return out, {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=tempfile.mkdtemp())
    parser.add_argument("--cpu-checkpoint", default=None)
    parser.add_argument("--device", default="cuda", help="cpu only to try the script out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "Sparse CSR tensor support")
    dev = torch.device(args.device)
    X = counts()
    rows = np.random.default_rng(1).permutation(X.shape[0])[:128]
    resident, pinned = MemorySource(X, dev, resident=True), MemorySource(X, dev, resident=False)
    expected = torch.from_numpy(X.toarray()[rows])
    for name, src in (("resident", resident), ("pinned", pinned)):
        b = src.batch(rows)
        check(f"{name} minibatch equals the CSR rows", torch.equal(b.x.cpu(), expected)
              and torch.equal(b.counts.to_dense().cpu(), expected) and b.x.device.type == dev.type)

    batch = resident.batch(rows)
    for model_name in ("vae", "gmvae"):
        for likelihood in ("poisson", "nb", "zip", "zinb"):
            torch.manual_seed(1)
            model = build_model(dict(n_features=X.shape[1], model=model_name, likelihood=likelihood,
                                     dispersion="gene" if likelihood != "zinb" else "gene-cell",
                                     encoder=[32], decoder=[32], latent=4, components=5)).double().to(dev)
            dense, gd = elbo_and_grads(model, batch.x.double(), None)
            sparse, gs = elbo_and_grads(model, batch.x.double(), batch.counts)
            err = max((sparse["elbo"] - dense["elbo"]).abs().max().item(),
                      max(((gs[k] - gd[k]).abs().max() / gd[k].abs().max().clamp_min(1e-6)).item() for k in gd))
            check(f"CUDA sparse == dense, {model_name}-{likelihood}", err < 1e-8, f"largest difference {err:.1e}")

    model = dict(model="vae", likelihood="nb", encoder=[16], decoder=[16], latent=3)
    cfg = dict(batch_size=32, lr=1e-3, seed=3, checkpoint_every=1, device=dev.type)
    tmp = tempfile.mkdtemp()
    fit(X, np.arange(240), np.arange(240, 300), model, TrainConfig(epochs=4, **cfg), f"{tmp}/a")
    fit(X, np.arange(240), np.arange(240, 300), model, TrainConfig(epochs=4, **cfg), f"{tmp}/b")
    fit(X, np.arange(240), np.arange(240, 300), model, TrainConfig(epochs=2, **cfg), f"{tmp}/c")
    fit(X, np.arange(240), np.arange(240, 300), model, TrainConfig(epochs=4, **cfg), f"{tmp}/c")
    a, b, c = (load_checkpoint(f"{tmp}/{d}/checkpoint.pt", "cpu")["model_state"] for d in "abc")
    diff_b = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    diff_c = max((a[k].double() - c[k].double()).abs().max().item() for k in a)
    check("GPU: same seed twice gives identical weights", diff_b == 0.0, f"largest difference {diff_b:.1e}")
    check("GPU: stopped and resumed run equals uninterrupted", diff_c == 0.0, f"largest difference {diff_c:.1e}")

    cells = X[:50]
    on_gpu = load_model(f"{tmp}/a", dev)
    on_cpu = load_model(f"{tmp}/a", "cpu")
    z_gpu = on_gpu.latent(torch.from_numpy(cells.toarray()).to(dev)).detach().cpu()
    z_cpu = on_cpu.latent(torch.from_numpy(cells.toarray())).detach()
    check("GPU-written checkpoint loads on the CPU with the same latent values",
          next(on_cpu.parameters()).device.type == "cpu" and torch.allclose(z_cpu, z_gpu, atol=1e-5),
          f"largest difference {(z_cpu - z_gpu).abs().max().item():.1e}")
    os.makedirs(args.out, exist_ok=True)
    shutil.copy(f"{tmp}/a/checkpoint.pt", os.path.join(args.out, "gpu_checkpoint.pt"))
    sp.save_npz(os.path.join(args.out, "gpu_cells.npz"), cells)
    np.save(os.path.join(args.out, "gpu_expected_latent.npy"), z_gpu.numpy())
    if args.cpu_checkpoint:
        folder = args.cpu_checkpoint
        theirs = load_model(os.path.join(folder, "checkpoint.pt"), dev)
        x = torch.from_numpy(sp.load_npz(os.path.join(folder, "cells.npz")).toarray()).to(dev)
        z = theirs.latent(x).detach().cpu().numpy()
        want = np.load(os.path.join(folder, "expected_latent.npy"))
        check("CPU-written checkpoint loads on the GPU with the same latent values",
              np.allclose(z, want, atol=1e-5), f"largest difference {np.abs(z - want).max():.1e}")
    print("all GPU checks passed" if not FAILED else f"{len(FAILED)} GPU check(s) failed", flush=True)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
