"""The real-data benchmark in the pipeline (config/benchmark.yaml, rules/benchmark.smk).

A reduced run on the shared labelled data sets (SCVAE_SHARED_DATA; skipped when unset): every method's row,
its numbers against the files they come from (Table 3, the clustering scores, scVI's own metrics), the bound
ELBO <= importance-weighted log-likelihood, the benchmark files' times, the figure and the report. scVI runs
where scvi-tools is importable by SCVAE_SCVI_PYTHON (default: this interpreter), and is skipped with one log
line where it is not.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import yaml
from workflow_copy import copy_workflow, job_counts

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake")
BENCH = yaml.safe_load((ROOT / "config" / "benchmark.yaml").read_text())
SCVI_PYTHON = os.environ.get("SCVAE_SCVI_PYTHON", sys.executable)

if SNAKEMAKE is None:
    pytest.skip("the snakemake command is not on PATH", allow_module_level=True)


def importable(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def snakemake(cwd: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


REDUCED = {
    "datasets": {name: {"file": {"top_genes": 500}} for name in BENCH["datasets"]},
    "training": {"epochs": 3},
    "gridsearch": {"likelihoods": ["nb"]},
    "evaluation": {"iw_samples": 10},
    "benchmark": {"peers": {"scvi": {"python": SCVI_PYTHON}, "scanpy": {"n_pcs": 10}}},
}


@pytest.mark.slow
def test_reduced_benchmark_on_the_shared_data_sets(tmp_path):
    shared = os.environ.get("SCVAE_SHARED_DATA")
    if not shared:
        pytest.skip("SCVAE_SHARED_DATA is not set")
    work = copy_workflow(tmp_path / "bench")
    (work / "config" / "reduced.yaml").write_text(yaml.safe_dump(REDUCED))
    snakemake(work, "--cores", "2", "--configfile", "config/benchmark.yaml", "config/reduced.yaml",
              env={"SCVAE_SHARED_DATA": shared})
    tables = work / "results" / "tables"
    t = pd.read_csv(tables / "benchmark.tsv", sep="\t")
    # cellbench_5cl_3plates is scored on its singlets: demuxlet's doublets have no one cell line to score against
    cells = pd.read_csv(Path(shared) / "cellbench_5cl_3plates.cells.tsv.gz", sep="\t")
    kept = ad.read_h5ad(work / "results" / "data" / "cellbench_5cl_3plates" / "counts.h5ad", backed="r").obs_names
    assert set(kept) == set(cells.loc[cells["demuxlet_cls"] == "SNG", "cell_id"]) and len(kept) == 571
    assert list(t.columns) == ["dataset", "method", "likelihood", "clustering", "test_elbo", "test_iw_log_lik",
                               "iw_samples", "ari", "ami", "test_cells", "job_seconds", "max_rss_mb"]
    assert (tables / "benchmark.md").read_text().count("\n|") >= len(t) + 1
    assert set(t["dataset"]) == set(BENCH["benchmark"]["datasets"])
    has_scvi = importable(SCVI_PYTHON, "scvi")
    leiden = importable(sys.executable, "scanpy") and importable(sys.executable, "leidenalg")
    for dataset, rows in t.groupby("dataset"):
        methods = list(rows["method"].str.split(" ").str[0] + ":" + rows["clustering"])
        expected = ["scvae-torch:k-means on latent", "scvae-torch:GMVAE clusters", "log-normalise:k-means on PCA"]
        expected += ["scVI:k-means on latent"] * has_scvi + ["log-normalise:Leiden on kNN graph"] * leiden
        assert sorted(methods) == sorted(expected), (dataset, methods)
    # every job was timed and measured by Snakemake
    assert (t["job_seconds"] > 0).all() and (t["max_rss_mb"] > 0).all()
    assert t["ari"].between(-1, 1).all() and t["ami"].between(-1, 1).all()

    # scvae-torch's rows are Table 3's test ELBO and the clustering table's ARI
    t3 = pd.read_csv(tables / "table3_test_elbo.tsv", sep="\t").set_index(["dataset", "model", "likelihood"])
    ari = pd.read_csv(tables / "clustering_ari.tsv", sep="\t").set_index(["dataset", "run"])["ari"]
    ours = t[t["method"].str.startswith("scvae-torch")]
    assert len(ours) == 2 * len(BENCH["benchmark"]["datasets"])
    for row in ours.itertuples():
        model = row.method.split()[-1].lower()
        assert math.isclose(row.test_elbo, t3.loc[(row.dataset, model, row.likelihood), "test_elbo"], rel_tol=1e-9)
        assert math.isclose(row.ari, ari.loc[(row.dataset, f"{model}-{row.likelihood}")], abs_tol=1e-9)
        assert row.test_elbo <= row.test_iw_log_lik
    if has_scvi:
        scvi = t[t["method"].str.startswith("scVI")]
        assert (scvi["test_elbo"] < 0).all() and (scvi["test_elbo"] <= scvi["test_iw_log_lik"] + 1e-3).all()
        for row in scvi.itertuples():
            # matched to scvae-torch's VAE of the same likelihood: latent size, epochs budget, test cells
            peer = json.loads((work / "results" / "peers" / row.dataset / f"scvi-{row.likelihood}" /
                               "metrics.json").read_text())
            vae = json.loads((work / "results" / "models" / row.dataset / f"vae-{row.likelihood}" /
                              "metrics.json").read_text())
            assert peer["latent"] == vae["latent"] and peer["max_epochs"] == 3 >= peer["epochs_trained"]
            assert row.test_cells == ours[ours["dataset"] == row.dataset]["test_cells"].iloc[0]

    png = work / "results" / "figures" / "benchmark.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "results" / "figures" / "benchmark.pdf").read_bytes()[:5] == b"%PDF-"
    snakemake(work, "--configfile", "config/benchmark.yaml", "config/reduced.yaml", "--report", "report.html",
              env={"SCVAE_SHARED_DATA": shared})
    html = (work / "report.html").read_text(errors="replace")
    assert "benchmark.tsv" in html and "benchmark.png" in html


def _plan(tmp_path: Path, benchmark: dict, **env) -> subprocess.CompletedProcess:
    """A dry run of the test config with a benchmark section on its labelled simulated set."""
    work = copy_workflow(tmp_path / "plan")
    config = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    config["benchmark"] = benchmark
    (work / "config" / "bench.yaml").write_text(yaml.safe_dump(config))
    return snakemake(work, "-n", "--configfile", "config/bench.yaml", env=env, check=False)


def test_scvi_peer_is_skipped_with_one_line_when_scvi_tools_is_missing(tmp_path):
    # an interpreter without site-packages: the standard library only, so no scvi-tools
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    proc = _plan(tmp_path, {"datasets": ["sim-sc"], "peers": {"scvi": {"python": str(bare)}}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("scvi-tools is not importable") == 1
    jobs = job_counts(proc.stdout)
    assert "peer_scvi" not in jobs and jobs["peer_scanpy"] == 1 and jobs["benchmark_table"] == 1


def test_scvi_peer_is_planned_per_grid_likelihood_it_has(tmp_path):
    if not importable(SCVI_PYTHON, "scvi"):
        pytest.skip(f"scvi-tools is not importable by {SCVI_PYTHON}")
    proc = _plan(tmp_path, {"datasets": ["sim-sc"], "peers": {"scvi": {"python": SCVI_PYTHON}, "scanpy": None}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_counts(proc.stdout)
    # test.yaml's grid has poisson and zinb: scVI has both
    assert jobs["peer_scvi"] == 2 and "peer_scanpy" not in jobs


@pytest.mark.parametrize("datasets, message", [
    (["mixture"], "config: benchmark.datasets: 'mixture' is not in gridsearch.datasets"),
    (["nowhere"], "config: benchmark.datasets: 'nowhere' is not in gridsearch.datasets"),
])
def test_benchmark_of_a_data_set_outside_the_grid_fails_with_one_line(tmp_path, datasets, message):
    proc = _plan(tmp_path, {"datasets": datasets})
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


def test_data_dir_comes_from_the_config_then_the_environment(tmp_path):
    work = copy_workflow(tmp_path / "dirs")
    target = "results/data/cellbench_celseq2_3cl/counts.h5ad"
    given = snakemake(work, target, "-n", "--configfile", "config/benchmark.yaml", "--config",
                      "data_dir=/nowhere/given", env={"SCVAE_SHARED_DATA": "/nowhere/env"}, check=False)
    assert "/nowhere/given/cellbench_celseq2_3cl.counts.mtx.gz" in given.stderr + given.stdout
    from_env = snakemake(work, target, "-n", "--configfile", "config/benchmark.yaml",
                         env={"SCVAE_SHARED_DATA": "/nowhere/env"}, check=False)
    assert "/nowhere/env/cellbench_celseq2_3cl.counts.mtx.gz" in from_env.stderr + from_env.stdout
