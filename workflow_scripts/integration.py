"""Rule integration: batch mixing and cell-type scores of the corrected model, the same model without the batch
and PCA of log-normalised counts on one data set (all cells), and their embeddings for the figure."""

import sys

import _common

_common.start(snakemake)

from scvae_torch.data import DataError  # noqa: E402
from scvae_torch.integration import compare  # noqa: E402

p = snakemake.params
try:
    scores, embeddings = compare({f"{p.model}+batch": snakemake.input.corrected, p.model: snakemake.input.uncorrected},
                                 snakemake.input.data, n_pcs=p.n_pcs, neighbours=p.neighbours, seed=p.seed)
except DataError as err:
    print(f"error: {err}")
    sys.exit(1)
scores.insert(0, "dataset", snakemake.wildcards.dataset)
scores.insert(2, "likelihood", [("-" if m == "pca" else p.likelihood) for m in scores["method"]])
_common.write_table(scores, snakemake.output.scores)
_common.write_h5ad(embeddings, snakemake.output.embeddings)
print(scores.to_string())
