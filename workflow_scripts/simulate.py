"""Rule simulate_data: one synthetic data set as the canonical h5ad, its summary and its true parameters."""

import json
import sys

import numpy as np

import _common

_common.start(snakemake)

from scvae_torch import data, simulate  # noqa: E402

spec = dict(snakemake.params.spec)
kind = spec.pop("kind")
if "n_batches" in spec:  # the config's name for the simulator's `batches`
    spec["batches"] = spec.pop("n_batches")
generate = {"poisson-check": simulate.poisson_check, "gmvae-mixture": simulate.gmvae_mixture,
            "single-cell": simulate.single_cell}[kind]
try:
    sim = generate(**spec)
except ValueError as err:  # sizes that do not fit together
    print(f"error: datasets.{snakemake.wildcards.dataset}.simulate: {err}")
    sys.exit(1)
n_cells, n_genes = sim.X.shape
# the same names as `scvae-torch simulate`
counts = data.Counts(X=sim.X, genes=np.array([f"gene{j}" for j in range(n_genes)]),
                     cells=np.array([f"cell{i}" for i in range(n_cells)]), labels=sim.labels, batch=sim.batch)
summary = data.summarize(counts)
_common.write_text(snakemake.output.truth, json.dumps({"kind": kind, **spec, "truth": sim.truth_json()}))
data.write_canonical(counts, snakemake.output.counts)
data.write_summary(summary, snakemake.output.summary)
print(summary)
