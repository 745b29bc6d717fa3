"""Rule learning_curves: validation and training ELBO per epoch of every final model on one data set."""

from pathlib import Path

import _common

_common.start(snakemake)

from scvae_torch import plots  # noqa: E402

runs = {Path(path).parent.name: path for path in snakemake.input.models}
plots.learning_curves(runs, snakemake.output.png, snakemake.output.pdf,
                      title=f"learning curves on {snakemake.wildcards.dataset}")
