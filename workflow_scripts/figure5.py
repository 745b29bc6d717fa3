"""Rule figure5: the GMVAE y-regularisation ablation (ARI and class probabilities)."""

import _common

_common.start(snakemake)

from scvae_torch import plots  # noqa: E402

plots.figure5(snakemake.input.scores, dict(zip(snakemake.params.regularisations, snakemake.input.latents)),
              snakemake.output.png, snakemake.output.pdf)
