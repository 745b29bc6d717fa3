"""End-to-end tests of the Snakemake pipeline: the real `snakemake` CLI on config/test.yaml in a temporary folder.

Checks every table's columns and values, every figure file, the latent h5ad, the report, lint, the paper
config's plan, a misspelt key, a changed grid re-running only what changed, and a killed training resuming.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from workflow_copy import copy_workflow, job_counts

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake")
TEST_CONFIG = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
LIKELIHOODS = ["poisson", "nb", "zip", "zinb"]

if SNAKEMAKE is None:
    pytest.skip("the snakemake command is not on PATH", allow_module_level=True)


def snakemake(cwd: Path, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    """Run the snakemake CLI in cwd; on an unexpected failure show the end of its output."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def executed(output: str) -> dict[str, int]:
    """{rule: number of jobs} that a (non-dry) Snakemake run started, from its job headers."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        match = re.fullmatch(r"(?:local)?(?:rule|checkpoint) (\w+):", line.strip())
        if match and match.group(1) != "all":
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """The reduced pipeline, run once to completion with 2 cores."""
    work = copy_workflow(tmp_path_factory.mktemp("pipeline"))
    snakemake(work, "--cores", "2", "--configfile", "config/test.yaml")
    return work


def table(work: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(work / "results" / "tables" / f"{name}.tsv", sep="\t")


def no_nan(frame: pd.DataFrame) -> None:
    numeric = frame.select_dtypes("number")
    assert np.isfinite(numeric.to_numpy(dtype=float)).all(), frame[numeric.isna().any(axis=1)]
    assert not frame.isna().any().any(), frame[frame.isna().any(axis=1)]


GRID_RUNS = [(d, m, lik) for d in TEST_CONFIG["gridsearch"]["datasets"] for m in TEST_CONFIG["gridsearch"]["models"]
             for lik in TEST_CONFIG["gridsearch"]["likelihoods"]]


def test_every_result_file_of_the_design_is_written(pipeline):
    r = pipeline / "results"
    for name in ("table1_datasets", "table2_gridsearch", "table3_test_elbo", "clustering_ari"):
        assert (r / "tables" / f"{name}.tsv").stat().st_size > 0
        assert (r / "tables" / f"{name}.md").read_text().count("\n|") >= 2, f"{name}.md is not a Markdown table"
    for dataset in TEST_CONFIG["datasets"]:
        assert (r / "data" / dataset / "counts.h5ad").is_file()
        assert (r / "data" / dataset / "split.tsv").is_file()
    for d, m, lik in GRID_RUNS:
        assert len(list((r / "grid" / d / f"{m}-{lik}").glob("*/metrics.json"))) == 2
        run = r / "models" / d / f"{m}-{lik}"
        for name in ("checkpoint.pt", "best.pt", "history.tsv", "metrics.json", "test_metrics.json", "latent.h5ad"):
            assert (run / name).is_file(), run / name


def test_table1_describes_each_data_set(pipeline):
    t = table(pipeline, "table1_datasets")
    assert list(t.columns) == ["dataset", "source", "cells", "genes", "nonzeros", "sparsity_percent", "labels",
                               "cells_per_label"]
    no_nan(t)
    assert list(t["dataset"]) == list(TEST_CONFIG["datasets"])
    for row in t.itertuples():
        sim = TEST_CONFIG["datasets"][row.dataset]["simulate"]
        assert row.cells == sim["n_cells"]
        assert row.genes == sim.get("n_genes", sim.get("n_features"))
        assert math.isclose(row.sparsity_percent, 100 * (1 - row.nonzeros / (row.cells * row.genes)), abs_tol=1e-3)
    labels = dict(zip(t["dataset"], t["labels"]))
    assert labels == {"sim-sc": 3, "poisson-check": 0, "mixture": 5}


def test_table2_holds_the_best_architecture_and_final_training_uses_it(pipeline):
    t = table(pipeline, "table2_gridsearch")
    assert list(t.columns) == ["dataset", "model", "likelihood", "encoder", "decoder", "latent", "validation_elbo",
                               "epochs", "architecture", "architectures_tried"]
    no_nan(t)
    assert [tuple(r) for r in t[["dataset", "model", "likelihood"]].itertuples(index=False)] == GRID_RUNS
    assert (t["epochs"] == TEST_CONFIG["gridsearch"]["epochs"]).all()
    assert (t["architectures_tried"] == 2).all()
    for row in t.itertuples():
        grid = pipeline / "results" / "grid" / row.dataset / f"{row.model}-{row.likelihood}"
        elbos = {p.parent.name: json.loads(p.read_text())["best_val_elbo"] for p in grid.glob("*/metrics.json")}
        assert row.architecture == max(elbos, key=elbos.get)
        assert math.isclose(row.validation_elbo, max(elbos.values()), rel_tol=1e-9)
        final = json.loads((pipeline / "results" / "models" / row.dataset / f"{row.model}-{row.likelihood}" /
                            "metrics.json").read_text())
        assert ",".join(map(str, final["encoder"])) == str(row.encoder)
        assert ",".join(map(str, final["decoder"])) == str(row.decoder)
        assert final["latent"] == row.latent
        assert final["epochs_trained"] == TEST_CONFIG["training"]["epochs"]


def test_table3_test_elbo_and_importance_weighted_likelihood(pipeline):
    t = table(pipeline, "table3_test_elbo")
    assert list(t.columns) == ["dataset", "model", "likelihood", "encoder", "decoder", "latent", "epochs",
                               "best_epoch", "test_elbo", "test_log_lik", "test_kl_z", "test_kl_y",
                               "test_iw_log_lik", "iw_samples", "test_cells"]
    no_nan(t)
    assert len(t) == len(GRID_RUNS) + 1  # + the Figure 2 VAE on the check data
    assert np.allclose(t["test_log_lik"] - t["test_kl_z"] - t["test_kl_y"], t["test_elbo"], atol=1e-3)
    assert (t["test_kl_z"] >= 0).all() and (t["test_kl_y"] >= -1e-6).all()
    assert (t.loc[t["model"] == "vae", "test_kl_y"].abs() < 1e-9).all()
    # the importance-weighted estimate is a tighter bound than the ELBO
    assert (t["test_iw_log_lik"] > t["test_elbo"]).all()
    assert (t["iw_samples"] == TEST_CONFIG["evaluation"]["iw_samples"]).all()
    assert (t["test_elbo"] < 0).all()


def test_clustering_table_scores_every_method(pipeline):
    t = table(pipeline, "clustering_ari")
    assert list(t.columns) == ["dataset", "method", "run", "likelihood", "y_regularisation", "k", "clusters_found",
                               "test_cells", "ari", "ami"]
    no_nan(t)
    assert t["ari"].between(-1, 1).all() and t["ami"].between(-1, 1).all()
    assert set(t["dataset"]) == {"sim-sc", "mixture"}  # the labelled data sets
    methods = t.groupby("dataset")["method"].apply(set).to_dict()
    assert methods["sim-sc"] == {"gmvae_clusters", "kmeans_vae_latent", "kmeans_pca_lognorm"}
    assert methods["mixture"] == {"gmvae_clusters", "kmeans_pca_lognorm"}
    ablation = t[(t["dataset"] == "mixture") & (t["method"] == "gmvae_clusters")].set_index("y_regularisation")
    assert set(ablation.index) == {"none", "kl", "supervised"}
    # the GMVAE (the ELBO's KL term) recovers the k-means labels of the review's mixture data
    assert ablation.loc["kl", "ari"] >= 0.9, ablation


def test_clustering_scores_agree_with_assignments(pipeline):
    """ARI recomputed with scikit-learn from the written assignments and the data's own labels."""
    import anndata as ad
    from sklearn.metrics import adjusted_rand_score

    t = table(pipeline, "clustering_ari")
    for dataset in ("sim-sc", "mixture"):
        assign = pd.read_csv(pipeline / "results" / "clustering" / dataset / "assignments.tsv", sep="\t")
        labels = ad.read_h5ad(pipeline / "results" / "data" / dataset / "counts.h5ad").obs["label"].astype(str)
        assert list(assign["cell"].astype(str)) == list(labels.index)
        test = (assign["subset"] == "test").to_numpy()
        for row in t[t["dataset"] == dataset].itertuples():
            column = "pca_lognorm" if row.method == "kmeans_pca_lognorm" else row.run
            ari = adjusted_rand_score(labels.to_numpy()[test], assign[column].to_numpy()[test])
            assert math.isclose(ari, row.ari, abs_tol=1e-9), (dataset, row.run)


def test_latent_h5ad_is_ready_for_scanpy(pipeline):
    import anndata as ad

    for d, m, lik in GRID_RUNS:
        latent = ad.read_h5ad(pipeline / "results" / "models" / d / f"{m}-{lik}" / "latent.h5ad")
        assert latent.n_obs == TEST_CONFIG["datasets"][d]["simulate"]["n_cells"]
        assert latent.obsm["X_scvae"].shape == (latent.n_obs, TEST_CONFIG["gridsearch"]["latents"][0])
        assert np.isfinite(latent.obsm["X_scvae"]).all()
        assert set(latent.obs["subset"]) == {"train", "validation", "test"}
        assert ("scvae_cluster" in latent.obs) == (m == "gmvae")
    # the Figure 5 ablation reads its clusters from the encoder (cluster_posterior: encoder): argmax of the
    # q(y|x) stored beside them
    for run in (pipeline / "results" / "ablation" / "mixture").iterdir():
        latent = ad.read_h5ad(run / "latent.h5ad")
        argmax = latent.obsm["scvae_responsibilities"].argmax(1).astype(str)
        assert (latent.obs["scvae_cluster"].astype(str).to_numpy() == argmax).all(), run.name


FIGURES = ["figure2_vae_synthetic_poisson", "figure3_poisson_stability", "figure5_gmvae_ablation",
           "learning_curves_sim-sc", "latent_space_sim-sc", "latent_space_mixture"]


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_valid_png_and_pdf(pipeline, name):
    from PIL import Image

    png = pipeline / "results" / "figures" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert min(image.size) >= 300
        assert round(image.info["dpi"][0]) >= 150
    assert (pipeline / "results" / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


def test_report_gathers_tables_and_figures(pipeline):
    snakemake(pipeline, "--configfile", "config/test.yaml", "--report", "results/report.html")
    html = (pipeline / "results" / "report.html").read_text(errors="replace")
    for name in ("table2_gridsearch.tsv", "clustering_ari.tsv", "figure3_poisson_stability.png"):
        assert name in html


def test_changed_grid_reruns_only_what_changed(pipeline, tmp_path):
    """A new architecture: its grid jobs run, Table 2 is rebuilt, and only likelihoods whose winner changed re-train."""
    work = tmp_path / "changed"
    shutil.copytree(pipeline, work, symlinks=True)  # keeps modification times and .snakemake metadata
    config = yaml.safe_load((work / "config" / "test.yaml").read_text())
    config["gridsearch"]["encoders"].append([8])
    config["datasets"] = {name: {source: dict(reversed(spec.items())) for source, spec in ds.items()}
                          for name, ds in config["datasets"].items()}  # key order must not matter
    (work / "config" / "grown.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = table(work, "table2_gridsearch").set_index(["dataset", "model", "likelihood"])["architecture"]
    proc = snakemake(work, "--cores", "2", "--configfile", "config/grown.yaml")
    after = table(work, "table2_gridsearch").set_index(["dataset", "model", "likelihood"])["architecture"]
    ran = executed(proc.stdout + proc.stderr)
    assert ran.get("train_grid") == len(GRID_RUNS)  # one new architecture per run, nothing else
    changed = int((before != after).sum())
    assert ran.get("train_final", 0) == changed
    assert "simulate_data" not in ran and "split_data" not in ran and "train_ablation" not in ran


def test_lint_is_clean():
    proc = snakemake(ROOT, "--lint")
    assert "Congratulations" in proc.stdout + proc.stderr


def test_paper_config_plans_with_gpu_training(tmp_path):
    work = copy_workflow(tmp_path / "paper")
    proc = snakemake(work, "-n", "--configfile", "config/paper.yaml")
    ran = job_counts(proc.stdout)
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    g = paper["gridsearch"]
    n_grid = len(g["datasets"]) * len(g["models"]) * len(g["likelihoods"]) * len(g["encoders"]) * len(g["latents"])
    assert ran["train_grid"] == n_grid
    assert ran["download_data"] == 1
    assert ran["train_final"] == len(g["datasets"]) * len(g["models"]) * len(g["likelihoods"]) + 1
    final_jobs = [block.split("\n[")[0] for block in proc.stdout.split("rule train_final:")[1:]]
    assert len(final_jobs) == ran["train_final"] and all("gpu=1" in job for job in final_jobs)
    assert not (work / "results").exists()


def test_figures_set_to_null_are_skipped(tmp_path):
    work = copy_workflow(tmp_path / "nofig")
    config = dict(TEST_CONFIG, figures={**TEST_CONFIG["figures"], "figure2": None, "figure5": None})
    (work / "config" / "nofig.yaml").write_text(yaml.safe_dump(config))
    ran = job_counts(snakemake(work, "-n", "--configfile", "config/nofig.yaml").stdout)
    assert "figure2" not in ran and "figure5" not in ran and "train_ablation" not in ran
    assert ran["figure3"] == 1


def test_misspelt_key_fails_before_any_job(tmp_path):
    work = copy_workflow(tmp_path / "bad")
    config = dict(TEST_CONFIG, training={**TEST_CONFIG["training"], "lerning_rate": 0.1})
    (work / "config" / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(work, "--cores", "1", "--configfile", "config/bad.yaml", check=False)
    assert proc.returncode != 0
    assert "config: training: Additional properties are not allowed ('lerning_rate' was unexpected)" in proc.stderr
    assert not (work / "results").exists()


# ---- a killed final training resumes ----------------------------------------------------------------

RESUME_EPOCHS = 12
RESUME_CONFIG = {
    "datasets": {"pc": {"simulate": {"kind": "poisson-check", "n_cells": 20000, "n_features": 10}}},
    "training": {"epochs": RESUME_EPOCHS, "batch_size": 50, "checkpoint_every": 1, "device": "cpu"},
    "gridsearch": {"datasets": []},
    "figures": {"figure2": {"dataset": "pc", "encoder": [32], "decoder": [32], "latent": 2,
                            "epochs": RESUME_EPOCHS, "lr": 0.001}},
}
RESUME_TARGET = "results/models/pc/vae-poisson/metrics.json"


def _descendants(pid: int) -> list[int]:
    """Process ids below pid (from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _training_pid(root: int) -> int | None:
    for pid in _descendants(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b".train.py" in cmdline:
            return pid
    return None


def _start_and_wait(work: Path, epochs_done: int, *extra: str) -> subprocess.Popen:
    """Start snakemake on the resume target; return once history.tsv holds `epochs_done` epochs."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([SNAKEMAKE, RESUME_TARGET, "--cores", "1", "--configfile", "config/resume.yaml", *extra],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    history = work / "results" / "models" / "pc" / "vae-poisson" / "history.tsv"
    deadline = time.time() + 900  # a hang guard, not a time limit
    while time.time() < deadline:
        if history.exists() and len(pd.read_csv(history, sep="\t")) >= epochs_done:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended ({proc.returncode}) before epoch {epochs_done}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("training did not reach the kill point in time")


def test_killed_final_training_resumes_from_its_checkpoint(tmp_path):
    work = copy_workflow(tmp_path / "resume")
    (work / "config" / "resume.yaml").write_text(yaml.safe_dump(RESUME_CONFIG))
    run = work / "results" / "models" / "pc" / "vae-poisson"

    # 1. the training job is killed (as by the OOM killer): Snakemake reports the failure
    proc = _start_and_wait(work, 3)
    pid = _training_pid(proc.pid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=600) != 0
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    first = pd.read_csv(run / "history.tsv", sep="\t")

    # 2. re-run: resumes; then the whole Snakemake run is killed (a lost node), unlocked and re-run incomplete
    proc = _start_and_wait(work, len(first) + 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=600)
    snakemake(work, "--configfile", "config/resume.yaml", "--unlock")
    snakemake(work, RESUME_TARGET, "--cores", "1", "--rerun-incomplete", "--configfile", "config/resume.yaml")

    metrics = json.loads((run / "metrics.json").read_text())
    history = pd.read_csv(run / "history.tsv", sep="\t")
    assert metrics["epochs_trained"] == RESUME_EPOCHS
    assert 0 < metrics["epochs_this_run"] < RESUME_EPOCHS - len(first)  # the last run continued, not restarted
    assert list(history["epoch"]) == list(range(1, RESUME_EPOCHS + 1))
    # epochs trained before the first kill are kept as they were
    kept = first[first["epoch"] <= history["epoch"].max()].iloc[:-1]
    pd.testing.assert_frame_equal(history.iloc[:len(kept)], kept)
    log = (work / "results" / "logs" / "models" / "pc" / "vae-poisson.log").read_text()
    assert "resuming" in log


# ---- downloaded and local data sets ------------------------------------------------------------------

@pytest.fixture()
def http_server():
    """Serve tests/data/10x on 127.0.0.1 (a stand-in for the 10x download site)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ROOT / "tests" / "data" / "10x"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_downloaded_and_local_data_sets_reach_table1(tmp_path, http_server):
    """A URL download (checksum verified) and a local 10x MEX folder become canonical files and Table 1 rows."""
    import hashlib

    h5 = ROOT / "tests" / "data" / "10x" / "scanpy_v3_filtered_feature_bc_matrix.h5"
    work = copy_workflow(tmp_path / "sources")
    config = {
        "datasets": {
            "web": {"download": {"url": f"{http_server}/{h5.name}", "format": "10x-h5",
                                 "sha256": hashlib.sha256(h5.read_bytes()).hexdigest()}},
            "local": {"file": {"path": str(h5.parent / "scanpy_v3_filtered_feature_bc_matrix"), "format": "mtx"}},
            "picked": {"file": {"path": str(h5), "min_counts_gene": 1, "top_genes": 40}},
        },
        "gridsearch": {"datasets": []},
    }
    (work / "config" / "sources.yaml").write_text(yaml.safe_dump(config))
    snakemake(work, "results/tables/table1_datasets.tsv", "--cores", "2", "--configfile", "config/sources.yaml")
    t = table(work, "table1_datasets").set_index("dataset")
    # the README of the fixtures: 1107 cells x 507 genes, 23,866 non-zeros, the .h5 and the MEX folder identical
    for name in ("web", "local"):
        assert (t.loc[name, "cells"], t.loc[name, "genes"], t.loc[name, "nonzeros"]) == (1107, 507, 23866)
    assert (work / "resources" / "downloads" / "web" / "raw").read_bytes() == h5.read_bytes()
    # top_genes reaches prepare: the 40 genes the library ranks first among those with counts, recorded
    import anndata

    from scvae_torch import data

    picked = anndata.read_h5ad(work / "results" / "data" / "picked" / "counts.h5ad")
    expected = data.read_counts(h5, min_counts_gene=1, top_genes=40)
    assert t.loc["picked", "genes"] == 40 and list(picked.var_names) == list(expected.genes)
    assert dict(picked.uns["scvae_prepare"])["top_genes"] == 40


def test_download_with_a_wrong_checksum_leaves_nothing(tmp_path, http_server):
    h5 = ROOT / "tests" / "data" / "10x" / "scanpy_v3_filtered_feature_bc_matrix.h5"
    work = copy_workflow(tmp_path / "badsum")
    config = {"datasets": {"web": {"download": {"url": f"{http_server}/{h5.name}", "sha256": "0" * 64}}},
              "gridsearch": {"datasets": []}}
    (work / "config" / "badsum.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(work, "results/data/web/counts.h5ad", "--cores", "1", "--configfile", "config/badsum.yaml",
                     check=False)
    assert proc.returncode != 0
    folder = work / "resources" / "downloads" / "web"
    assert not (folder / "raw").exists() and not (folder / "raw.part").exists()
    assert not (work / "results" / "data" / "web" / "counts.h5ad").exists()
    assert "sha256" in (work / "results" / "logs" / "data" / "web.download.log").read_text()
