"""Rule table2: the best grid architecture per (data set, model, likelihood) by validation ELBO (Table 2)."""

import json
import math

import pandas as pd

import _common

_common.start(snakemake)


def layers(sizes):
    return ",".join(str(n) for n in sizes)


paths = iter(snakemake.input)
rows = []
for dataset, model, likelihood in snakemake.params.runs:
    for arch in snakemake.params.archs:  # same order as the rule's input list
        path = next(paths)
        with open(path) as fh:
            m = json.load(fh)
        rows.append({"dataset": dataset, "model": model, "likelihood": likelihood,
                     "encoder": layers(m["encoder"]), "decoder": layers(m["decoder"]), "latent": m["latent"],
                     "validation_elbo": m["best_val_elbo"], "epochs": m["epochs_trained"], "architecture": arch})
every = pd.DataFrame(rows)  # grid order
keys = ["dataset", "model", "likelihood"]
finite = every["validation_elbo"].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v))
if not finite.all():
    print(f"left out (non-finite validation ELBO):\n{every[~finite].to_string()}")
missing = set(map(tuple, every[keys].itertuples(index=False))) - set(
    map(tuple, every.loc[finite, keys].itertuples(index=False)))
if missing:
    raise SystemExit(f"error: every grid run diverged for {sorted(missing)}; no architecture to pick")
# idxmax takes the first maximum, so ties go to the earlier architecture in the grid: reproducible
winners = every[finite].groupby(keys, sort=False)["validation_elbo"].idxmax()
best = every.loc[winners.to_numpy()].copy()
best["architectures_tried"] = every.groupby(keys, sort=False).size().to_numpy()
every["rank"] = every[finite].groupby(keys, sort=False)["validation_elbo"].rank(ascending=False, method="first")
_common.write_table(best, snakemake.output.tsv, snakemake.output.md,
                    "Table 2: best architecture per likelihood (grid search, validation ELBO)")
_common.write_table(every, snakemake.output.all)
print(best.to_string())
