"""Rule latent_space: PCA of every run's latent on one data set, coloured by label and by cluster."""

import _common

_common.start(snakemake)

from scvae_torch import plots  # noqa: E402

plots.latent_space(dict(zip(snakemake.params.runs, snakemake.input.latents)), snakemake.input.assignments,
                   snakemake.output.png, snakemake.output.pdf,
                   title=f"latent space on {snakemake.wildcards.dataset} (PCA of latent means)")
