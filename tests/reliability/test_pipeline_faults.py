"""The whole pipeline: a `snakemake` run killed twice (SIGKILL of its process group, as when a node is lost) and
finished with --rerun-incomplete gives the same tables and models as a clean run; two clean runs give
byte-identical tables. On a reduced config (every table, tiny data) in temporary copies of the workflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from reliability_support import FAULT, GUARANTEE, cases, python_env, same_weights
from workflow_copy import copy_workflow

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]

SNAKEMAKE = shutil.which("snakemake")
if SNAKEMAKE is None:
    pytest.skip("the snakemake command is not on PATH", allow_module_level=True)

CONFIG = {
    "datasets": {"sc": {"simulate": {"kind": "single-cell", "n_cells": 300, "n_genes": 40, "n_types": 3, "seed": 0}}},
    "training": {"epochs": 4, "lr": 0.003, "checkpoint_every": 1, "device": "cpu", "resources": {"threads": 1}},
    "gridsearch": {"datasets": ["sc"], "models": ["vae", "gmvae"], "likelihoods": ["poisson"],
                   "encoders": [[8], [16]], "latents": [2], "epochs": 1, "resources": {"threads": 1}},
    "evaluation": {"iw_samples": 5, "resources": {"threads": 1}},
    "clustering": {"n_pcs": 5},
    "figures": {"figure2": None, "figure3": None, "figure5": None},
}
TABLES = ["table1_datasets", "table2_gridsearch", "table3_test_elbo", "clustering_ari"]
TARGETS = [f"results/tables/{name}.tsv" for name in TABLES]
TIMING = ("seconds", "time", "runtime", "s_per", "elapsed")  # columns or keys that measure time, not results


def workflow_copy(dest: Path) -> Path:
    """A fresh copy of the workflow with the reduced config in config/reliability.yaml."""
    copy_workflow(dest)
    (dest / "config" / "reliability.yaml").write_text(yaml.safe_dump(CONFIG))
    return dest


def command(*extra: str) -> list[str]:
    return [SNAKEMAKE, *TARGETS, "--cores", "2", "--configfile", "config/reliability.yaml", *extra]


def run(work: Path, *extra: str) -> None:
    proc = subprocess.run(command(*extra), cwd=work, env=python_env(), capture_output=True, text=True,
                          timeout=1800)  # a hang guard
    assert proc.returncode == 0, proc.stderr[-4000:]


def kill_when(work: Path, ready, what: str, *extra: str) -> None:
    """Start snakemake in its own process group and SIGKILL the whole group once ready() holds."""
    proc = subprocess.Popen(command(*extra), cwd=work, env=python_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900  # a hang guard
    try:
        while not ready():
            assert proc.poll() is None, f"snakemake ended ({proc.returncode}) before {what}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=600)


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The reduced pipeline run twice from nothing, in two folders."""
    runs = []
    for name in ("clean_a", "clean_b"):
        work = workflow_copy(tmp_path_factory.mktemp(name) / "work")
        run(work)
        runs.append(work)
    return runs[0], runs[1]


def table(work: Path, name: str) -> pd.DataFrame:
    frame = pd.read_csv(work / "results" / "tables" / f"{name}.tsv", sep="\t")
    return frame.drop(columns=[c for c in frame.columns if any(t in c.lower() for t in TIMING)])


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if not any(t in k.lower() for t in TIMING)}
    return obj


@GUARANTEE
def test_two_clean_runs_give_byte_identical_tables(clean_runs):
    a, b = clean_runs
    names = sorted(p.name for p in (a / "results" / "tables").glob("*.tsv"))
    assert set(names) >= {f"{t}.tsv" for t in TABLES}, names
    assert names == sorted(p.name for p in (b / "results" / "tables").glob("*.tsv"))
    for name in names:
        assert (a / "results" / "tables" / name).read_bytes() == (b / "results" / "tables" / name).read_bytes(), name
    cases(len(names))


@FAULT
def test_killed_snakemake_rerun_incomplete_gives_the_clean_results(clean_runs, tmp_path):
    """Killed during the grid search, re-run and killed again inside a final training, then finished with
    --rerun-incomplete: every table equals the clean run's, and every model has the same weights."""
    clean, _ = clean_runs
    work = workflow_copy(tmp_path / "work")
    results = work / "results"
    kill_when(work, lambda: any(results.glob("grid/sc/*/*/metrics.json")), "the first grid search result")
    assert not (results / "tables" / "table3_test_elbo.tsv").exists()
    run(work, "--unlock")
    kill_when(work, lambda: any(results.glob("models/sc/*/checkpoint.pt")), "a final training's first checkpoint",
              "--rerun-incomplete")
    assert not (results / "tables" / "table3_test_elbo.tsv").exists()
    run(work, "--unlock")
    run(work, "--rerun-incomplete")

    for name in TABLES + ["gridsearch_all"]:
        pd.testing.assert_frame_equal(table(work, name), table(clean, name), check_exact=True, obj=name)
    runs = sorted(p.parent.relative_to(clean / "results") for p in (clean / "results").glob("**/checkpoint.pt"))
    assert runs == sorted(p.parent.relative_to(results) for p in results.glob("**/checkpoint.pt"))
    assert len(runs) == 6, runs  # 4 grid runs, 2 final runs
    for folder in runs:
        same_weights(clean / "results" / folder / "checkpoint.pt", results / folder / "checkpoint.pt")
        same_weights(clean / "results" / folder / "best.pt", results / folder / "best.pt")
    for metrics in (clean / "results" / "models").glob("sc/*/test_metrics.json"):
        mine = results / metrics.relative_to(clean / "results")
        assert without_timing(json.loads(mine.read_text())) == without_timing(json.loads(metrics.read_text()))
        latent = mine.parent / "latent.h5ad"
        assert np.array_equal(ad.read_h5ad(latent).obsm["X_scvae"],
                              ad.read_h5ad(metrics.parent / "latent.h5ad").obsm["X_scvae"])
    cases(2)
