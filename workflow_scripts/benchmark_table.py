"""Rule benchmark_table: scvae-torch and its peers per data set - test ELBO, importance-weighted LL, ARI, AMI,
job wall time and peak memory (from Snakemake's benchmark files)."""

import json
from pathlib import Path

import pandas as pd

import _common

_common.start(snakemake)

COLUMNS = ["dataset", "method", "likelihood", "clustering", "test_elbo", "test_iw_log_lik", "iw_samples", "ari",
           "ami", "test_cells", "job_seconds", "max_rss_mb"]
inp = snakemake.input


def job(path):
    """(wall seconds, peak resident memory in MB) of one job, from its Snakemake benchmark file."""
    row = pd.read_csv(path, sep="\t").iloc[-1]
    return float(row["s"]), float(row["max_rss"]) if pd.notna(row["max_rss"]) else float("nan")


def parts(path):
    """dataset and run name from results/<group>/<dataset>/<run>/<file>."""
    return Path(path).parts[-3], Path(path).parts[-2]


scores = pd.concat([pd.read_csv(p, sep="\t") for p in inp.scores]).set_index(["dataset", "run"])
rows = []
for test_path, bench_path in zip(inp.tests, inp.train_bench):
    dataset, run = parts(test_path)
    model, likelihood = run.split("-", 1)
    test = json.loads(Path(test_path).read_text())
    score = scores.loc[(dataset, run)]
    seconds, rss = job(bench_path)
    rows.append({"dataset": dataset, "method": f"scvae-torch {model.upper()}", "likelihood": likelihood,
                 "clustering": "GMVAE clusters" if score["method"] == "gmvae_clusters" else "k-means on latent",
                 "test_elbo": test["elbo"], "test_iw_log_lik": test.get("iw_log_lik"),
                 "iw_samples": test["iw_samples"], "ari": score["ari"], "ami": score["ami"],
                 "test_cells": test["n_cells"], "job_seconds": seconds, "max_rss_mb": rss})
for path, bench_path in zip(inp.scvi, inp.scvi_bench):
    dataset, run = parts(path)
    m = json.loads(Path(path).read_text())
    seconds, rss = job(bench_path)
    rows.append({"dataset": dataset, "method": f"scVI {m['scvi_version']}", "likelihood": m["likelihood"],
                 "clustering": "k-means on latent", "test_elbo": m["test_elbo"],
                 "test_iw_log_lik": m["test_iw_log_lik"],
                 "iw_samples": m["iw_samples"], "ari": m["ari"], "ami": m["ami"], "test_cells": m["test_cells"],
                 "job_seconds": seconds, "max_rss_mb": rss})
names = {"kmeans_pca_lognorm": "k-means on PCA", "leiden_knn": "Leiden on kNN graph"}
for path, bench_path in zip(inp.scanpy, inp.scanpy_bench):
    dataset, _ = parts(path)
    m = json.loads(Path(path).read_text())
    seconds, rss = job(bench_path)
    for name, s in m["methods"].items():
        rows.append({"dataset": dataset, "method": f"log-normalise + PCA ({m['implementation']})", "likelihood": "-",
                     "clustering": names[name], "ari": s["ari"], "ami": s["ami"], "test_cells": m["test_cells"],
                     "job_seconds": seconds, "max_rss_mb": rss})
table = pd.DataFrame(rows, columns=COLUMNS)
table["iw_samples"] = table["iw_samples"].astype("Int64")
_common.write_table(table, snakemake.output.tsv)
shown = table.astype(object).where(table.notna(), "-")  # no ELBO for the scanpy route
_common.write_text(snakemake.output.md, "# Benchmark: scvae-torch against scVI and the scanpy route (per test cell; "
                   "ARI and AMI on test cells)\n\n" + _common.markdown(shown))
print(table.to_string())
