"""Benchmark: training seconds per epoch and peak memory of scvae-torch (and of scVI, when installed).

Usage:
  python benchmarks/bench_train.py [--data FILE.h5ad | --cells 20000 --genes 27998 --sparsity 0.93]
      [--likelihoods poisson,nb,zinb] [--model vae] [--encoder 128] [--decoder 128] [--latent 10]
      [--batch-size 128] [--train-cells 18000] [--epochs 1] [--max-batches N] [--threads N]
      [--device cpu|cuda] [--precision float32|bfloat16] [--compile] [--scvi-python PYTHON] [--no-scvi]
      [--elbo-check EPOCHS] [--scaling 10000,50000,200000 --scaling-batches 200] [--set KEY=VALUE ...]

Each measurement runs in a fresh process (so that its peak resident set size, VmHWM, is its own) which
reads the h5ad file the way `scvae-torch train` does (in memory, or streamed) and trains for --epochs epochs
on --train-cells cells (the first --max-batches minibatches' worth of them, when given: seconds per epoch
are then scaled up to all the training cells), without validation passes. scVI (scvi-tools, same hidden
layer, latent size, batch size, likelihood, training cells and threads; its own data loader) is measured
the same way, in the same run, and the ratio printed. Its Python may be another environment
(--scvi-python, e.g. a venv made with --system-site-packages that sees the same torch).

--elbo-check E: trains NB for E epochs with the sparse-aware likelihood and with the dense one (same seed,
same model and minibatches) and prints both test ELBOs.
--scaling: simulates each size, then measures in-memory and streamed training (--scaling-batches minibatches).
Numbers depend on the machine's load: the header prints it (os.getloadavg); run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- worker processes: one measurement each, a JSON line on stdout ----

def _peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_rows(n_cells: int, n_train: int, seed: int) -> np.ndarray:
    """The same training cells for every implementation: a seeded choice of n_train of the cells."""
    return np.sort(np.random.default_rng(seed).permutation(n_cells)[:n_train])


def worker_scvae(job: dict) -> dict:
    """Train scvae-torch on the job's file; seconds per epoch from the training history."""
    import torch

    from scvae_torch.batches import Batch, MemorySource, StreamSource, load_counts
    from scvae_torch.training import TrainConfig, evaluate_terms, fit, resolve_device

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = resolve_device(job["device"])
    t0 = time.perf_counter()
    if job["stream"]:
        source = StreamSource(job["path"], device)
    else:
        # as `scvae-torch train` does: whole counts read into compact storage
        X = load_counts(job["path"])[0] if job["path"].endswith(".h5ad") else _load_npz(job["path"])
        source = MemorySource(X, device)
    load_s = time.perf_counter() - t0
    n_cells = source.shape[0]
    rows = (np.arange(job["first_cells"]) if job.get("first_cells")
            else _train_rows(n_cells, job["train_cells"], job["seed"]))
    if job.get("max_batches"):
        rows = rows[: job["max_batches"] * job["batch_size"]]
    if job.get("dense_likelihood"):
        memory = source

        class DenseCounts:  # the same minibatches with dense counts: the likelihood's dense path
            shape, device, description = memory.shape, memory.device, "dense likelihood"

            def epoch_order(self, r, seed, epoch):
                return memory.epoch_order(r, seed, epoch)

            def batch(self, r):
                b = memory.batch(r)
                return Batch(b.x)

        source = DenseCounts()
    model = dict(model=job["model"], likelihood=job["likelihood"], encoder=job["encoder"],
                 decoder=job["decoder"], latent=job["latent"], components=job["components"],
                 **job.get("settings", {}))
    tc = TrainConfig(epochs=job["epochs"], batch_size=job["batch_size"], lr=job["lr"], seed=job["seed"],
                     device=job["device"], threads=job["threads"], precision=job["precision"],
                     compile=job["compile"], checkpoint_every=10 ** 6)
    with tempfile.TemporaryDirectory() as out:
        metrics = fit(source, rows, np.array([], dtype=np.int64), model, tc, out)
        # with --max-batches: scaled up to the minibatches of all the training cells
        scale = np.ceil(job["train_cells"] / job["batch_size"]) / np.ceil(len(rows) / job["batch_size"]) \
            if job.get("max_batches") else 1.0
        seconds = [h["seconds"] * scale for h in _history(out)]
        result = {"seconds_per_epoch": float(np.mean(seconds[1:] if len(seconds) > 1 else seconds)),
                  "epoch_seconds": seconds, "cells_per_epoch": int(len(rows)), "load_seconds": load_s,
                  "device_name": metrics["device_name"], "data_source": metrics["data_source"],
                  "compiled": metrics["compiled"]}
        if job.get("test_cells"):
            from scvae_torch.training import load_model

            test = np.setdiff1d(np.arange(n_cells), rows)[: job["test_cells"]]
            torch.manual_seed(0)
            trained = load_model(out, device, which="last")
            result["test_elbo"] = evaluate_terms(trained, memory if job.get("dense_likelihood") else source,
                                                 test, device)["elbo"]
    if device.type == "cuda":
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _history(out: str) -> list[dict]:
    import pandas as pd

    return pd.read_csv(os.path.join(out, "history.tsv"), sep="\t").to_dict("records")


def _load_npz(path: str):
    import scipy.sparse as sp

    return sp.load_npz(path).tocsr()


def worker_scvi(job: dict) -> dict:
    """Train scVI (scvi-tools) on the job's file with the same architecture; seconds per training epoch."""
    import anndata
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    scvi.settings.seed = job["seed"]
    if job["threads"]:
        torch.set_num_threads(job["threads"])  # scvi's seed setting may reset threads
    adata = anndata.read_h5ad(job["path"])
    n_train = job["train_cells"] if not job.get("max_batches") else job["max_batches"] * job["batch_size"]
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, n_hidden=job["encoder"][0], n_latent=job["latent"],
                            n_layers=len(job["encoder"]), gene_likelihood=job["likelihood"], dispersion="gene")
    times: list[float] = []

    class EpochTimer(Callback):
        def on_train_epoch_start(self, trainer, module):
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            times.append(time.perf_counter() - self.t)

    accelerator = "gpu" if job["device"] == "cuda" else "cpu"
    # scVI draws its own n_train training cells; the rest is its validation set, never evaluated here
    model.train(max_epochs=job["epochs"], batch_size=job["batch_size"], train_size=n_train / adata.n_obs,
                validation_size=1 - n_train / adata.n_obs, accelerator=accelerator,
                devices=1, early_stopping=False, enable_progress_bar=False, callbacks=[EpochTimer()],
                plan_kwargs={"lr": job["lr"]}, logger=False, enable_checkpointing=False)
    times = [t * np.ceil(job["train_cells"] / job["batch_size"]) / np.ceil(n_train / job["batch_size"])
             for t in times]  # scaled up to all the training cells when --max-batches cut them
    return {"seconds_per_epoch": float(np.mean(times[1:] if len(times) > 1 else times)), "epoch_seconds": times,
            "cells_per_epoch": n_train, "scvi": scvi.__version__, "peak_rss_mb": _peak_rss_mb()}


# ---- the parent: data, jobs, tables ----

def run_job(job: dict, python: str = sys.executable) -> dict:
    """Run one measurement in a fresh process; its JSON result, or {'error': ...}."""
    cmd = [python, os.path.abspath(__file__), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}


def simulate(path: str, cells: int, genes: int, sparsity: float, seed: int) -> None:
    """An MB-20k-shaped simulated data set (scvae_torch.simulate.single_cell) as an h5ad (or .npz) file."""
    from scvae_torch.simulate import single_cell

    sim = single_cell(n_cells=cells, n_genes=genes, sparsity=sparsity, seed=seed)
    if path.endswith(".npz"):
        import scipy.sparse as sp

        sp.save_npz(path, sim.X.tocsr(), compressed=False)
        return
    import anndata

    from scvae_torch import data

    if hasattr(anndata.settings, "allow_write_nullable_strings"):  # pandas >= 3 makes string columns nullable
        anndata.settings.allow_write_nullable_strings = True
    counts = data.Counts(X=sim.X.tocsr(), genes=np.array([f"gene{i}" for i in range(genes)]),
                         cells=np.array([f"cell{i}" for i in range(cells)]), labels=sim.labels)
    data.write_canonical(counts, path)


def _small_count_share(path: str) -> str:
    """How many of the file's stored counts the NB/ZINB count tables cover (distributions.TABLE_COUNTS)."""
    import h5py

    from scvae_torch.distributions import TABLE_COUNTS

    with h5py.File(path, "r") as f:
        values = f["X/data"][: 10 ** 7]  # the first 10 million stored counts
    return (f"stored counts: {np.mean(values <= TABLE_COUNTS):.0%} up to {TABLE_COUNTS}, {np.mean(values == 1):.0%} "
            f"are 1 (first {len(values):,})")


def _has_scvi(python: str) -> bool:
    proc = subprocess.run([python, "-c", "import scvi"], capture_output=True)
    return proc.returncode == 0


def _fmt(result: dict, key: str, spec: str) -> str:
    return "error" if "error" in result else format(result[key], spec)


def _setting(text: str) -> tuple[str, object]:
    """'key=value' as a model setting (true/false and numbers parsed as JSON, anything else a string)."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    """Parse arguments, make or take the data, run the measurements and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help="an h5ad file to use instead of simulated data")
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--genes", type=int, default=27998)
    parser.add_argument("--sparsity", type=float, default=0.93)
    parser.add_argument("--likelihoods", default="poisson,nb,zinb")
    parser.add_argument("--model", default="vae")
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--encoder", default="128")
    parser.add_argument("--decoder", default="128")
    parser.add_argument("--latent", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-cells", type=int, default=18000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-batches", type=int, default=0, help="train on this many minibatches' worth of cells")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scvi-python", default=sys.executable, help="Python with scvi-tools")
    parser.add_argument("--no-scvi", action="store_true")
    parser.add_argument("--no-main", action="store_true", help="skip the per-likelihood table")
    parser.add_argument("--elbo-check", type=int, default=0, metavar="EPOCHS")
    parser.add_argument("--scaling", default="", help="comma-separated cell counts, e.g. 10000,50000,200000")
    parser.add_argument("--scaling-batches", type=int, default=200)
    parser.add_argument("--workdir", default=None, help="where simulated files go (default: a temp folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a model setting of scvae-torch's, e.g. library_size=false (to time one setting or "
                             "to compare with commits whose defaults differ); repeatable")
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(worker_scvi(job) if job["kind"] == "scvi" else worker_scvae(job)), flush=True)
        return

    import torch

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
    os.makedirs(workdir, exist_ok=True)
    try:
        import anndata  # noqa: F401
        ext = ".h5ad"
    except ImportError:  # a bare machine: in-memory runs from .npz only
        ext = ".npz"
    load = os.getloadavg()
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""), flush=True)
    base = dict(kind="scvae", model=args.model, components=args.components,
                encoder=[int(s) for s in args.encoder.split(",")], decoder=[int(s) for s in args.decoder.split(",")],
                latent=args.latent, batch_size=args.batch_size, train_cells=args.train_cells, epochs=args.epochs,
                max_batches=args.max_batches, lr=args.lr, threads=args.threads, device=args.device,
                precision=args.precision, compile=args.compile, seed=args.seed, stream=False,
                settings=dict(_setting(text) for text in args.set))

    path = args.data
    if not args.no_main or args.elbo_check:
        if path is None:
            path = os.path.join(workdir, f"sim_{args.cells}x{args.genes}{ext}")
            if not os.path.exists(path):
                t = time.perf_counter()
                simulate(path, args.cells, args.genes, args.sparsity, args.seed)
                print(f"# simulated {args.cells} x {args.genes} at {args.sparsity:.0%} zeros -> {path} "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
    if path and path.endswith(".h5ad"):
        print(f"# {_small_count_share(path)}", flush=True)
    scvi = not args.no_scvi and args.device in ("cpu", "cuda") and _has_scvi(args.scvi_python)
    if not args.no_main:
        arch = (f"{args.model} encoder {args.encoder} decoder {args.decoder} latent {args.latent}, batch "
                f"{args.batch_size}, {args.train_cells} training cells" +
                (f" (first {args.max_batches} minibatches)" if args.max_batches else "") +
                f", {args.epochs} epoch(s), {args.precision}" + (", compiled" if args.compile else "") +
                "".join(f", {text}" for text in args.set))
        print(f"\n## seconds per training epoch and peak RSS: {arch}")
        print("likelihood | scvae-torch s/epoch | peak RSS MB | scVI s/epoch | scVI peak RSS MB | scVI / scvae-torch")
        print("--- | --- | --- | --- | --- | ---")
        for likelihood in args.likelihoods.split(","):
            mine = run_job({**base, "likelihood": likelihood, "path": path})
            theirs = run_job({**base, "kind": "scvi", "likelihood": likelihood, "path": path}, args.scvi_python) \
                if scvi else {"error": "scvi-tools not installed"}
            ratio = (f"{theirs['seconds_per_epoch'] / mine['seconds_per_epoch']:.2f}"
                     if "error" not in mine and "error" not in theirs else "-")
            print(f"{likelihood} | {_fmt(mine, 'seconds_per_epoch', '.2f')} | {_fmt(mine, 'peak_rss_mb', '.0f')} | "
                  f"{_fmt(theirs, 'seconds_per_epoch', '.2f')} | {_fmt(theirs, 'peak_rss_mb', '.0f')} | {ratio}",
                  flush=True)
            for who, r in (("scvae-torch", mine), ("scVI", theirs)):
                if "error" in r and not r["error"].startswith("scvi-tools not"):
                    print(f"#   {who} {likelihood}: {r['error']}")
                elif "epoch_seconds" in r:
                    print(f"#   {who} {likelihood}: epochs {', '.join(f'{s:.2f}' for s in r['epoch_seconds'])} s"
                          + (f"; {r['device_name']}; {r['data_source']}" if who == "scvae-torch" else "")
                          + (f"; GPU peak {r['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in r else ""))
    if args.elbo_check:
        print(f"\n## test ELBO after {args.elbo_check} epoch(s), NB, sparse-aware vs dense likelihood (same seed)")
        print("likelihood path | s/epoch | test ELBO (2000 held-out cells)")
        print("--- | --- | ---")
        for dense in (False, True):
            r = run_job({**base, "likelihood": "nb", "path": path, "epochs": args.elbo_check, "test_cells": 2000,
                         "dense_likelihood": dense})
            print(f"{'dense' if dense else 'sparse-aware'} | {_fmt(r, 'seconds_per_epoch', '.2f')} | "
                  f"{_fmt(r, 'test_elbo', '.4f')}" + (f"  ({r['error']})" if "error" in r else ""), flush=True)
    if args.scaling:
        print(f"\n## scaling: NB, {args.scaling_batches} minibatches of {args.batch_size} per measurement; "
              "s/epoch = per-minibatch time x minibatches in 90% of the cells")
        print("cells | streaming | ms/minibatch | s/epoch (90% of cells) | peak RSS MB | load s")
        print("--- | --- | --- | --- | --- | ---")
        for n in (int(s) for s in args.scaling.split(",")):
            p = os.path.join(workdir, f"sim_{n}x{args.genes}.h5ad")
            if not os.path.exists(p):
                simulate(p, n, args.genes, args.sparsity, args.seed)
            first = min(args.scaling_batches * args.batch_size, int(0.9 * n))
            for stream in (False, True):
                r = run_job({**base, "likelihood": "nb", "path": p, "stream": stream, "epochs": 1, "max_batches": 0,
                             "first_cells": first})
                if "error" in r:
                    print(f"{n} | {'on' if stream else 'off'} | error: {r['error']}")
                    continue
                per_batch = r["seconds_per_epoch"] / np.ceil(first / args.batch_size)
                epoch = per_batch * np.ceil(0.9 * n / args.batch_size)
                print(f"{n} | {'on' if stream else 'off'} | {per_batch * 1e3:.0f} | {epoch:.1f} | "
                      f"{r['peak_rss_mb']:.0f} | {r['load_seconds']:.1f}", flush=True)
    load = os.getloadavg()
    print(f"\n# load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
