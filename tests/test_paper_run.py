"""The paper path run for real at reduced scale: config/paper.yaml end to end on 2 cores.

The 10x-MB-20k download is served from a local HTTP server: a small Cell Ranger v2 file shaped like MB-20k
(genome group mm10, 27,998 genes, ENSMUSG ids) that the test writes, given with its sha256. Epochs, the
grid and the simulated sizes are cut down by a second config file merged over config/paper.yaml (Snakemake
merges several --configfile files key by key; its --config parses nested values as strings, so numbers
cannot be overridden there). Everything else - models, the split, log1p_input false, no
pre-training, no early stopping - is the paper's.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from workflow_copy import copy_workflow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake")
PAPER = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
MB_GENES = 27998  # 10x-MB-20k: 20,000 cells x 27,998 genes (mm10)
MB_CELLS = 300

if SNAKEMAKE is None:
    pytest.skip("the snakemake command is not on PATH", allow_module_level=True)


def write_mb20k_like(path: Path, n_cells: int = MB_CELLS, seed: int = 0) -> None:
    """A Cell Ranger v2 HDF5 file with MB-20k's layout: group mm10, 27,998 genes, barcodes ACGT...-1."""
    import h5py

    rng = np.random.default_rng(seed)
    # two groups of cells with different expressed genes, every cell with counts
    groups = rng.poisson(np.where(np.arange(n_cells)[:, None] % 2 == 0, 4.0, 0.5), size=(n_cells, 50))
    rest = sp.random(n_cells, MB_GENES - 50, density=0.01, format="csr", random_state=rng,
                     data_rvs=lambda k: rng.integers(1, 6, size=k))
    X = sp.hstack([sp.csr_matrix(groups), rest], format="csr").astype(np.int32)
    X.eliminate_zeros()
    bases = np.array(list("ACGT"))
    barcodes = ["".join(rng.choice(bases, 16)) + "-1" for _ in range(n_cells)]
    genes = [f"ENSMUSG{i:011d}" for i in range(MB_GENES)]
    with h5py.File(path, "w") as f:
        group = f.create_group("mm10")
        group.create_dataset("data", data=X.data)
        group.create_dataset("indices", data=X.indices.astype(np.int64))
        group.create_dataset("indptr", data=X.indptr.astype(np.int64))
        group.create_dataset("shape", data=np.array([MB_GENES, n_cells], dtype=np.int32))
        group.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        group.create_dataset("genes", data=np.array(genes, dtype="S"))
        group.create_dataset("gene_names", data=np.array([f"Gene{i}" for i in range(MB_GENES)], dtype="S"))


@pytest.fixture()
def served(tmp_path):
    """(url, sha256, file) of the MB-20k-shaped file served on 127.0.0.1."""
    folder = tmp_path / "site"
    folder.mkdir()
    h5 = folder / "1M_neurons_neuron20k.h5"
    write_mb20k_like(h5)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{h5.name}", hashlib.sha256(h5.read_bytes()).hexdigest(), h5
    server.shutdown()
    server.server_close()


def reduced(url: str, sha256: str) -> dict:
    """The overrides merged over config/paper.yaml: scale only."""
    small = {"threads": 1, "runtime": 10, "mem_mb": 2000, "gpu": 0}
    return {
        "datasets": {
            "10x-MB-20k": {"download": {"url": url, "sha256": sha256}},
            "sim-sc": {"simulate": {"n_cells": 400, "n_genes": 100}},
            "mixture": {"simulate": {"n_cells": 1000}},
        },
        "training": {"epochs": 3, "checkpoint_every": 1, "device": "cpu", "resources": small},
        # two of the four likelihoods (poisson: Figure 3's run; nb), one architecture: ~50 jobs
        "gridsearch": {"likelihoods": ["poisson", "nb"], "encoders": [[16]], "latents": [4], "resources": small},
        "evaluation": {"iw_samples": 5, "resources": small},
        "clustering": {"n_pcs": 10},
        "figures": {"figure2": {"epochs": 4}, "figure5": {"encoder": [16], "decoder": [16], "epochs": 4}},
    }


def test_paper_config_runs_end_to_end_at_reduced_scale(tmp_path, served):
    url, sha256, h5 = served
    work = copy_workflow(tmp_path / "paper")
    (work / "config" / "reduced.yaml").write_text(yaml.safe_dump(reduced(url, sha256)))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([SNAKEMAKE, "--cores", "2", "--configfile", "config/paper.yaml", "config/reduced.yaml"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]

    results = work / "results"
    # the download is the served file, verified against the given checksum
    assert (work / "resources" / "downloads" / "10x-MB-20k" / "raw").read_bytes() == h5.read_bytes()
    # every paper table (TSV and Markdown) and every figure (PNG and PDF), named from paper.yaml
    grid = {**PAPER["gridsearch"], "likelihoods": ["poisson", "nb"]}
    for name in ("table1_datasets", "table2_gridsearch", "table3_test_elbo", "clustering_ari"):
        assert len(pd.read_csv(results / "tables" / f"{name}.tsv", sep="\t")) > 0, name
        assert (results / "tables" / f"{name}.md").read_text().count("\n|") >= 2, name
    figures = ["figure2_vae_synthetic_poisson", "figure3_poisson_stability", "figure5_gmvae_ablation"]
    figures += [f"learning_curves_{d}" for d in grid["datasets"]]
    figures += [f"latent_space_{d}" for d in ("10x-MB-20k", "sim-sc", "mixture")]
    for name in figures:
        assert (results / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (results / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name

    t1 = pd.read_csv(results / "tables" / "table1_datasets.tsv", sep="\t").set_index("dataset")
    assert (t1.loc["10x-MB-20k", "cells"], t1.loc["10x-MB-20k", "genes"]) == (MB_CELLS, MB_GENES)
    assert t1.loc["10x-MB-20k", "source"] == "download"
    # the grid of paper.yaml's data sets, models and likelihoods, each trained in full and tested
    t3 = pd.read_csv(results / "tables" / "table3_test_elbo.tsv", sep="\t")
    runs = {(d, m, lik) for d in grid["datasets"] for m in grid["models"] for lik in grid["likelihoods"]}
    assert runs <= set(zip(t3["dataset"], t3["model"], t3["likelihood"]))
    assert (t3["epochs"] == 3).sum() == len(runs) and np.isfinite(t3["test_elbo"]).all()
    # the paper's settings held: the encoders saw raw counts
    import json

    spec = json.loads((results / "models" / "10x-MB-20k" / "vae-nb" / "run_spec.json").read_text())
    assert spec["model"]["log1p_input"] is False and spec["training"]["early_stopping"] is False
