"""Rules train_grid, train_final, train_ablation: train (or resume) one model in the folder of its metrics.json."""

import json
import sys
from pathlib import Path

import _common

_common.start(snakemake, torch_threads=True)

from scvae_torch.data import DataError  # noqa: E402
from scvae_torch.training import TrainConfig, TrainingError, TrainingInterrupted, train_dataset  # noqa: E402

# Settings that may change between runs without invalidating a checkpoint (more epochs continue it).
RESUMABLE = {"epochs", "device", "checkpoint_every", "compile", "stream", "stream_above_gb"}
STATE = ("checkpoint.pt", "checkpoint.prev.pt", "best.pt", "history.tsv", "metrics.json")

out_dir = Path(snakemake.output[0]).parent
out_dir.mkdir(parents=True, exist_ok=True)
spec = {"model": dict(snakemake.params.model), "training": dict(snakemake.params.training)}
spec_path = out_dir / "run_spec.json"


def comparable(s: dict) -> dict:
    return {"model": s["model"], "training": {k: v for k, v in s["training"].items() if k not in RESUMABLE}}


if spec_path.exists() and comparable(json.loads(spec_path.read_text())) != comparable(spec):
    print(f"{out_dir}: settings changed since the saved checkpoint; starting this run afresh")
    for name in STATE:
        (out_dir / name).unlink(missing_ok=True)
spec_path.write_text(json.dumps(spec, indent=2) + "\n")

try:
    metrics = train_dataset(snakemake.input.data, str(out_dir), spec["model"],
                            TrainConfig.from_dict(spec["training"]), split_path=snakemake.input.split)
except (TrainingError, DataError, ValueError) as err:
    print(f"error: {err}")
    sys.exit(1)
except TrainingInterrupted as err:
    print(err)
    sys.exit(128 + err.signum)
print(f"done: best validation ELBO {metrics['best_val_elbo']:.4f} at epoch {metrics['best_epoch']} "
      f"of {metrics['epochs_trained']}, on {metrics['device_name']}")
