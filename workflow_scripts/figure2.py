"""Rule figure2: VAE (Poisson) on the check data - training curves and learned vs true rates."""

import _common

_common.start(snakemake)

from scvae_torch import plots  # noqa: E402

plots.figure2(snakemake.input.model, snakemake.input.feature_means, snakemake.input.truth,
              snakemake.output.png, snakemake.output.pdf)
