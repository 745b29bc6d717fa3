"""The pipeline with a batch covariate: a simulated data set with two batches trains its final model conditioned on
them, the same model again without them, and the integration table and figure compare both with log-PCA; a
misspelt key under the new sections and a missing or incomplete batch column each stop with one line.

The real `snakemake` CLI on tiny data in a temporary folder (about 2 minutes on 2 cores)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from workflow_copy import copy_workflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake")
if SNAKEMAKE is None:
    pytest.skip("the snakemake command is not on PATH", allow_module_level=True)

SIM = {"kind": "single-cell", "n_cells": 600, "n_genes": 120, "n_types": 3, "n_batches": 2, "seed": 0}
RESOURCES = {"threads": 1, "runtime": 10, "mem_mb": 1000, "gpu": 0}
CONFIG = {
    "datasets": {"sim-batch": {"simulate": SIM}},
    "training": {"epochs": 6, "lr": 0.003, "checkpoint_every": 2, "device": "cpu", "resources": RESOURCES},
    "gridsearch": {"datasets": ["sim-batch"], "models": ["gmvae"], "likelihoods": ["nb"], "encoders": [[16]],
                   "latents": [4], "epochs": 2, "resources": RESOURCES},
    "evaluation": {"iw_samples": 10, "resources": RESOURCES},
    "integration": {"datasets": ["sim-batch"], "model": "gmvae", "likelihood": "nb", "n_pcs": 10},
}
TARGETS = ("results/tables/integration.tsv", "results/figures/integration.png")


def snakemake(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def with_config(work: Path, name: str, config: dict) -> str:
    (work / "config" / name).write_text(yaml.safe_dump(config))
    return f"config/{name}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    work = copy_workflow(tmp_path_factory.mktemp("batch"))
    snakemake(work, *TARGETS, "--cores", "2", "--configfile", with_config(work, "batch.yaml", CONFIG))
    return work


def test_simulated_batches_reach_the_final_model_and_not_the_uncorrected_one(pipeline):
    import anndata as ad
    import torch

    from scvae_torch import simulate

    counts = ad.read_h5ad(pipeline / "results" / "data" / "sim-batch" / "counts.h5ad")
    sim_args = {k: v for k, v in SIM.items() if k not in ("kind", "n_batches")}
    truth = simulate.single_cell(**sim_args, batches=SIM["n_batches"])
    assert list(counts.obs["batch"].astype(str)) == list(truth.batch)  # the simulator's own batches, in order
    run = pipeline / "results" / "{}" / "sim-batch" / "gmvae-nb" / "checkpoint.pt"
    corrected = torch.load(str(run).format("models"), weights_only=True)["model_config"]
    uncorrected = torch.load(str(run).format("uncorrected"), weights_only=True)["model_config"]
    assert corrected["batches"] == ["batch0", "batch1"]
    assert uncorrected["batches"] == []
    # the same architecture (the grid winner) for both
    same = ("encoder", "decoder", "latent", "components", "likelihood", "model")
    assert {k: corrected[k] for k in same} == {k: uncorrected[k] for k in same}
    latent = ad.read_h5ad(pipeline / "results" / "models" / "sim-batch" / "gmvae-nb" / "latent.h5ad")
    assert list(latent.obs["batch"].astype(str)) == list(truth.batch)


def test_integration_table_scores_three_methods(pipeline):
    t = pd.read_csv(pipeline / "results" / "tables" / "integration.tsv", sep="\t")
    assert list(t.columns) == ["dataset", "method", "likelihood", "clusters", "cell_types", "cells", "ari", "ami",
                               "batch_entropy", "batch_asw", "type_asw"]
    assert list(t["method"]) == ["gmvae+batch", "gmvae", "pca"] and set(t["dataset"]) == {"sim-batch"}
    assert list(t["clusters"]) == ["gmvae", "gmvae", "kmeans"]
    assert (t["cell_types"] == SIM["n_types"]).all() and (t["cells"] == SIM["n_cells"]).all()
    # ARI and AMI are below 0 for worse-than-chance clusters (6 epochs here), the mixing scores lie in [0, 1]
    agreement = t[["ari", "ami"]].to_numpy()
    assert np.isfinite(agreement).all() and (agreement >= -1).all() and (agreement <= 1).all(), t
    scores = t[["batch_entropy", "batch_asw", "type_asw"]].to_numpy()
    assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all(), t
    # three well-separated simulated types: the classical route finds them
    assert t.loc[t["method"] == "pca", "ari"].item() >= 0.8, t
    assert (pipeline / "results" / "tables" / "integration.md").read_text().count("\n| sim-batch |") == 3


def test_integration_scores_match_the_latents(pipeline):
    """The corrected row recomputed from the evaluated latent.h5ad and the data's labels and batches."""
    import anndata as ad

    from scvae_torch.integration import batch_entropy, type_asw

    t = pd.read_csv(pipeline / "results" / "tables" / "integration.tsv", sep="\t").set_index("method")
    counts = ad.read_h5ad(pipeline / "results" / "data" / "sim-batch" / "counts.h5ad")
    for method, group in (("gmvae+batch", "models"), ("gmvae", "uncorrected")):
        latent = ad.read_h5ad(pipeline / "results" / group / "sim-batch" / "gmvae-nb" / "latent.h5ad")
        Z = np.asarray(latent.obsm["X_scvae"], dtype=np.float64)
        labels, batch = counts.obs["label"].to_numpy(), counts.obs["batch"].to_numpy()
        assert np.isclose(t.loc[method, "batch_entropy"], batch_entropy(Z, batch))
        assert np.isclose(t.loc[method, "type_asw"], type_asw(Z, labels))


def test_integration_figure_is_written(pipeline):
    from PIL import Image

    png = pipeline / "results" / "figures" / "integration.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) >= 300
    assert (pipeline / "results" / "figures" / "integration.pdf").read_bytes()[:5] == b"%PDF-"


def test_misspelt_key_under_integration_is_refused(tmp_path):
    work = copy_workflow(tmp_path / "bad")
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["integration"]["neighbors"] = 15
    proc = snakemake(work, "-n", "--configfile", with_config(work, "bad.yaml", config), check=False)
    expected = "config: integration: Additional properties are not allowed ('neighbors' was unexpected)"
    assert proc.returncode != 0 and expected in proc.stdout + proc.stderr
    assert not (work / "results").exists()


def test_integration_of_a_data_set_without_batch_is_refused(tmp_path):
    work = copy_workflow(tmp_path / "nobatch")
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["datasets"]["sim-batch"]["correct_batch"] = False
    proc = snakemake(work, "-n", "--configfile", with_config(work, "nobatch.yaml", config), check=False)
    assert proc.returncode != 0
    assert "config: integration.datasets: 'sim-batch': has no batch to correct" in proc.stdout + proc.stderr


def test_missing_or_incomplete_batch_column_is_one_line_in_the_prepare_log(tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    work = copy_workflow(tmp_path / "prep")
    X = sp.csr_matrix(np.arange(1, 61, dtype=np.float32).reshape(12, 5))
    obs = pd.DataFrame({"cell_type": ["a", "b"] * 6, "plate": ["p1"] * 11 + [None]},
                       index=[f"c{i}" for i in range(12)])
    ad.AnnData(X=X, obs=obs).write_h5ad(work / "cells.h5ad")
    config = {"datasets": {"nocol": {"file": {"path": str(work / "cells.h5ad"), "batch": "donor"}},
                           "gap": {"file": {"path": str(work / "cells.h5ad"), "batch": "plate"}}},
              "gridsearch": {"datasets": []}}
    proc = snakemake(work, "results/data/nocol/counts.h5ad", "results/data/gap/counts.h5ad", "--cores", "1",
                     "--keep-going", "--configfile", with_config(work, "prep.yaml", config), check=False)
    assert proc.returncode != 0
    for name, column in (("nocol", "donor"), ("gap", "plate")):
        assert not (work / "results" / "data" / name / "counts.h5ad").exists()
        lines = (work / "results" / "logs" / "data" / f"{name}.prepare.log").read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and repr(column) in lines[0], lines
        assert "Traceback" not in proc.stderr


def test_keep_selects_cells_in_the_prepare_job(tmp_path):
    """A data set's `file: {keep: {column: [values]}}` keeps those cells (the CellBench sets' singlets)."""
    import anndata as ad
    import scipy.sparse as sp

    work = copy_workflow(tmp_path / "keep")
    X = sp.csr_matrix(np.arange(1, 61, dtype=np.float32).reshape(12, 5))
    obs = pd.DataFrame({"cell_type": ["a", "b"] * 6, "demuxlet_cls": ["SNG", "SNG", "DBL"] * 4,
                        "plate": ["p1", "p2"] * 6}, index=[f"c{i}" for i in range(12)])
    ad.AnnData(X=X, obs=obs).write_h5ad(work / "cells.h5ad")
    config = {"datasets": {"sng": {"file": {"path": str(work / "cells.h5ad"), "labels": "cell_type",
                                            "batch": "plate", "keep": {"demuxlet_cls": ["SNG"]}}}},
              "gridsearch": {"datasets": []}}
    snakemake(work, "results/data/sng/counts.h5ad", "--cores", "1", "--configfile",
              with_config(work, "keep.yaml", config))
    out = ad.read_h5ad(work / "results" / "data" / "sng" / "counts.h5ad")
    singlets = obs.index[obs["demuxlet_cls"] == "SNG"]
    assert list(out.obs_names) == list(singlets)
    np.testing.assert_array_equal(out.X.toarray(), X.toarray()[obs["demuxlet_cls"].to_numpy() == "SNG"])
    assert list(out.obs["batch"]) == list(obs.loc[singlets, "plate"])
