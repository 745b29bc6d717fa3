"""Rules train_grid, train_final, train_ablation: train (or resume) one model in the folder of its metrics.json."""

import hashlib
import json
import sys
from pathlib import Path

import _common

_common.start(snakemake, torch_threads=True)

from scvae_torch.batches import SourceError, read_annotations  # noqa: E402
from scvae_torch.data import DataError  # noqa: E402
from scvae_torch.provenance import RECORD, RESUMABLE_SETTINGS  # noqa: E402
from scvae_torch.runs import train_dataset  # noqa: E402
from scvae_torch.training import TrainConfig, TrainingError, TrainingInterrupted  # noqa: E402

# Settings that may change between runs without invalidating a checkpoint (more epochs continue it): the
# library's own list, so that a resume the library would refuse is started afresh here instead.
RESUMABLE = RESUMABLE_SETTINGS
STATE = ("checkpoint.pt", "checkpoint.prev.pt", "best.pt", "history.tsv", "metrics.json", RECORD)

out_dir = Path(snakemake.output[0]).parent
out_dir.mkdir(parents=True, exist_ok=True)
spec = {"model": dict(snakemake.params.model), "training": dict(snakemake.params.training),
        "batch": bool(snakemake.params.batch)}
# a new split or other genes (the data set prepared again) also start the run afresh, as other settings do
try:
    genes = read_annotations(snakemake.input.data)[2]
except SourceError as err:
    print(f"error: {err}")
    sys.exit(1)
spec["inputs"] = {"split_sha256": hashlib.sha256(Path(snakemake.input.split).read_bytes()).hexdigest(),
                  "genes_sha256": hashlib.sha256("\n".join(map(str, genes)).encode()).hexdigest()}
spec_path = out_dir / "run_spec.json"


def comparable(s: dict) -> dict:
    return {"model": s["model"], "training": {k: v for k, v in s["training"].items() if k not in RESUMABLE},
            "inputs": s.get("inputs"), "batch": s.get("batch", False)}


old = json.loads(spec_path.read_text()) if spec_path.exists() else None
if old is not None and "inputs" not in old:  # a spec from before inputs were recorded: the library checks them
    old["inputs"] = spec["inputs"]
if old is not None and comparable(old) != comparable(spec):
    print(f"{out_dir}: settings changed since the saved checkpoint; starting this run afresh")
    for name in STATE:
        (out_dir / name).unlink(missing_ok=True)
spec_path.write_text(json.dumps(spec, indent=2) + "\n")

try:
    metrics = train_dataset(snakemake.input.data, str(out_dir), spec["model"],
                            TrainConfig.from_dict(spec["training"]), split_path=snakemake.input.split,
                            batch=spec["batch"])
except (TrainingError, DataError, ValueError) as err:
    print(f"error: {err}")
    sys.exit(1)
except TrainingInterrupted as err:
    print(err)
    sys.exit(128 + err.signum)
print(f"done: best validation ELBO {metrics['best_val_elbo']:.4f} at epoch {metrics['best_epoch']} "
      f"of {metrics['epochs_trained']}, on {metrics['device_name']}")
