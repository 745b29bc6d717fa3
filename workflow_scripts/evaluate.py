"""Rule evaluate: test ELBO, importance-weighted log-likelihood, latent.h5ad and feature means of one run."""

import sys
from pathlib import Path

import _common

_common.start(snakemake, torch_threads=True)

from scvae_torch.data import DataError  # noqa: E402
from scvae_torch.runs import evaluate_dataset  # noqa: E402
from scvae_torch.training import TrainingError  # noqa: E402

try:
    metrics = evaluate_dataset(
        str(Path(snakemake.input.model).parent), snakemake.input.data, snakemake.output.metrics,
        snakemake.output.latent, split_path=snakemake.input.split, iw_samples=snakemake.params.iw_samples,
        seed=snakemake.params.seed, feature_means_path=snakemake.output.feature_means,
        device=snakemake.params.device)
except (TrainingError, DataError) as err:
    print(f"error: {err}")
    sys.exit(1)
print(f"test ELBO {metrics['elbo']:.4f}, importance-weighted log p(x) {metrics.get('iw_log_lik', float('nan')):.4f} "
      f"on {metrics['n_cells']} cells")
