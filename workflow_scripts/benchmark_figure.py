"""Rule benchmark_figure: test ELBO and ARI of scvae-torch and its peers per data set."""

import _common

_common.start(snakemake)

from scvae_torch import plots  # noqa: E402

plots.benchmark(snakemake.input[0], snakemake.output.png, snakemake.output.pdf)
