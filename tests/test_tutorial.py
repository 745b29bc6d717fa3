"""docs/tutorial.md runs: its python blocks in order, on simulated counts (and on a real set when shared)."""

import os
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scvae_torch import simulate

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", TUTORIAL.read_text(), flags=re.S | re.M)


def _run(adata: ad.AnnData) -> dict:
    namespace = {"adata": adata}
    for block in _blocks():
        exec(compile(block, str(TUTORIAL), "exec"), namespace)
    return namespace


def test_the_tutorial_has_code():
    assert len(_blocks()) >= 6


def test_the_tutorial_runs_on_simulated_counts():
    sim = simulate.single_cell(400, 60, 3, seed=2)
    adata = ad.AnnData(sp.csr_matrix(sim.X, dtype=np.float32))
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"gene{j}" for j in range(adata.n_vars)]
    adata.obs["cell_type"] = sim.labels
    ns = _run(adata)
    result = ns["adata"]
    assert result.obsm["X_scvae"].shape == (400, ns["model"].model_config.latent)
    assert "scvae_cluster" in result.obs and "scvae_normalized" in result.layers


@pytest.mark.slow
def test_the_tutorial_runs_on_a_real_set():
    folder = os.environ.get("SCVAE_SHARED_DATA")
    if not folder:
        pytest.skip("SCVAE_SHARED_DATA is not set")
    from scvae_torch.data import read_mtx

    counts = read_mtx(os.path.join(folder, "cellbench_celseq2_3cl.counts.mtx.gz"), labels="cell_type")
    adata = ad.AnnData(counts.X)
    adata.obs_names = counts.cells.astype(str)
    adata.var_names = counts.genes.astype(str)
    adata.obs["cell_type"] = counts.labels.astype(str)
    ns = _run(adata)
    result = ns["adata"]
    assert result.n_vars == 2000 and result.obsm["X_scvae"].shape[0] == 274
    assert result.obs["scvae_cluster"].notna().all() and "scvae_normalized" in result.layers
    # with the defaults the GMVAE's own clusters find the three cell lines (docs/clustering.md)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(result.obs["cell_type"], result.obs["scvae_cluster"]) >= 0.9
