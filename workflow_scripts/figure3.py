"""Rule figure3: Poisson stability - B and the largest rate per epoch of the final VAE-Poisson run."""

import _common

_common.start(snakemake)

from scvae_torch import plots  # noqa: E402

dataset = snakemake.config["figures"]["figure3"]["dataset"]
plots.figure3(snakemake.input.model, snakemake.output.png, snakemake.output.pdf,
              title=f"Poisson stability: VAE-Poisson on {dataset}")
