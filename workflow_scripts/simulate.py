"""Rule simulate_data: one synthetic data set as the canonical h5ad, its summary and its true parameters."""

import json

import numpy as np

import _common

_common.start(snakemake)

from scvae_torch import data, simulate  # noqa: E402

spec = dict(snakemake.params.spec)
kind = spec.pop("kind")
generate = {"poisson-check": simulate.poisson_check, "gmvae-mixture": simulate.gmvae_mixture,
            "single-cell": simulate.single_cell}[kind]
sim = generate(**spec)
n_cells, n_genes = sim.X.shape
counts = data.Counts(X=sim.X.tocsr(), genes=np.array([f"gene{j}" for j in range(n_genes)]),
                     cells=np.array([f"cell{i}" for i in range(n_cells)]),
                     labels=None if sim.labels is None else np.asarray(sim.labels).astype(str))
summary = data.summarize(counts)
data.write_canonical(counts, snakemake.output.counts)
data.write_summary(summary, snakemake.output.summary)
truth = {"kind": kind, **{k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in sim.truth.items()}}
_common.atomic_text(json.dumps(truth, default=lambda v: v.item() if hasattr(v, "item") else str(v)),
                    snakemake.output.truth)
print(summary)
