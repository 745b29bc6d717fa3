"""Rule integration_figure: each integration method's embedding by batch and by cell type."""

import _common

_common.start(snakemake)

from scvae_torch import plots  # noqa: E402

plots.integration(dict(zip(snakemake.params.datasets, snakemake.input)), snakemake.output.png, snakemake.output.pdf)
