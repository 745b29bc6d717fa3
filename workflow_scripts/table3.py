"""Rule table3: test ELBO, its parts and the importance-weighted log-likelihood of every final model (Table 3)."""

import json
from pathlib import Path

import pandas as pd

import _common

_common.start(snakemake)

rows = []
for (dataset, model, likelihood), path in zip(snakemake.params.runs, snakemake.input):
    test = json.loads(Path(path).read_text())
    trained = json.loads((Path(path).parent / "metrics.json").read_text())
    rows.append({"dataset": dataset, "model": model, "likelihood": likelihood,
                 "encoder": ",".join(map(str, trained["encoder"])), "decoder": ",".join(map(str, trained["decoder"])),
                 "latent": trained["latent"], "epochs": trained["epochs_trained"], "best_epoch": trained["best_epoch"],
                 "test_elbo": test["elbo"], "test_log_lik": test["log_lik"], "test_kl_z": test["kl_z"],
                 "test_kl_y": test["kl_y"], "test_iw_log_lik": test.get("iw_log_lik"),
                 "iw_samples": test["iw_samples"], "test_cells": test["n_cells"]})
table = pd.DataFrame(rows)
_common.write_table(table, snakemake.output.tsv, snakemake.output.md,
                    "Table 3: test ELBO and importance-weighted log-likelihood per cell")
print(table.to_string())
