# Clustering against known labels: the GMVAE's own clusters, k-means on each VAE latent, and k-means on
# PCA of log-normalised counts (the classical scanpy baseline); ARI and AMI on the test cells.


rule cluster:
    input:
        latents=lambda wc: [f"{d}/latent.h5ad" for d in run_dirs(wc.dataset).values()],
        data="results/data/{dataset}/counts.h5ad",
        split="results/data/{dataset}/split.tsv",
    output:
        scores="results/clustering/{dataset}/scores.tsv",
        assignments="results/clustering/{dataset}/assignments.tsv",
    params:
        runs=lambda wc: list(run_dirs(wc.dataset)),
        k=lambda wc: components(wc.dataset),
        n_pcs=config["clustering"]["n_pcs"],
        seed=config["clustering"]["seed"],
    log:
        "results/logs/clustering/{dataset}.log",
    benchmark:
        "results/benchmarks/clustering/{dataset}.tsv"
    conda:
        ENV
    script:
        "../workflow_scripts/cluster.py"


rule clustering_table:
    input:
        [f"results/clustering/{d}/scores.tsv" for d in run_datasets() if labelled(d)],
    output:
        tsv=report("results/tables/clustering_ari.tsv", caption="../report/clustering.rst", category="Tables"),
        md="results/tables/clustering_ari.md",
    log:
        "results/logs/tables/clustering_ari.log",
    conda:
        ENV
    script:
        "../workflow_scripts/clustering_table.py"
