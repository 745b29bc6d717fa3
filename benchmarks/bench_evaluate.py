"""Benchmark: peak memory and time of `evaluate` with the counts in memory and read from the file (streamed).

Usage:
  python benchmarks/bench_evaluate.py --data FILE.h5ad [--run DIR] [--iw-samples 0] [--threads 2]

Without --run, a VAE (NB, one hidden layer of 128, latent 10) is first trained for one epoch on the first
minibatches of the file (`--train-batches`, streamed) into a temporary folder: the model's quality does
not matter here. A seeded 81/9/10 split of the file's cells is written next to it. Then `evaluate` runs in a
fresh process per mode (stream off, stream on) and the script prints seconds and peak RSS (VmHWM) of each;
the outputs of the two modes are compared (they are equal, see tests/test_evaluation.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def worker(job: dict) -> dict:
    """Evaluate in this process; seconds and peak RSS."""
    import torch

    from scvae_torch.runs import evaluate_dataset

    torch.set_num_threads(job["threads"])
    out = job["out"]
    t0 = time.perf_counter()
    metrics = evaluate_dataset(job["run"], job["data"], os.path.join(out, "metrics.json"),
                               os.path.join(out, "latent.h5ad"), split_path=job["split"],
                               iw_samples=job["iw_samples"], feature_means_path=os.path.join(out, "means.tsv"),
                               device="cpu", stream=job["stream"])
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb(), "elbo": metrics["elbo"]}


def main() -> None:
    """Parse arguments, train a model if none is given, and measure both modes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", required=False)
    parser.add_argument("--run", default=None)
    parser.add_argument("--iw-samples", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-batches", type=int, default=20)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if not args.data:
        parser.error("--data is required")

    from scvae_torch import data
    from scvae_torch.batches import StreamSource, read_annotations
    from scvae_torch.training import TrainConfig, fit

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cells, _, _ = read_annotations(args.data)
        split = os.path.join(tmp, "split.tsv")
        data.write_split(data.make_split(cells, seed=0), split)
        run = args.run
        if run is None:
            run = os.path.join(tmp, "run")
            source = StreamSource(args.data)
            import numpy as np

            fit(source, np.arange(args.train_batches * 128), np.arange(0), dict(model="vae", likelihood="nb",
                encoder=[128], decoder=[128], latent=10), TrainConfig(epochs=1, batch_size=128, threads=args.threads),
                run)
            source.close()
        print(f"# {len(cells):,} cells in {args.data}; load average {load[0]:.2f}; {args.threads} threads; "
              f"iw samples {args.iw_samples}")
        print("stream | seconds | peak RSS MB | test ELBO")
        print("--- | --- | --- | ---")
        for stream in ("off", "on"):
            out = os.path.join(tmp, stream)
            os.makedirs(out)
            job = dict(run=run, data=args.data, split=split, iw_samples=args.iw_samples, threads=args.threads,
                       stream=stream, out=out)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                                  capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if not lines:
                print(f"{stream} | error: {(proc.stderr or 'no output').strip().splitlines()[-1]}")
                continue
            r = json.loads(lines[-1])
            print(f"{stream} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['elbo']:.2f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
