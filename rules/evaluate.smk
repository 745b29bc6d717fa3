# Evaluation of every trained model on its test split: ELBO and its parts, importance-weighted
# log-likelihood, the latent of all cells (scanpy-ready h5ad) and decoded vs observed feature means.


rule evaluate:
    input:
        model="results/{group}/{dataset}/{run}/metrics.json",
        data="results/data/{dataset}/counts.h5ad",
        split="results/data/{dataset}/split.tsv",
    output:
        metrics="results/{group}/{dataset}/{run}/test_metrics.json",
        latent="results/{group}/{dataset}/{run}/latent.h5ad",
        feature_means="results/{group}/{dataset}/{run}/feature_means.tsv",
    params:
        iw_samples=config["evaluation"]["iw_samples"],
        seed=config["evaluation"]["seed"],
        # a CPU-only evaluation job must not insist on the GPU the training jobs asked for
        device="cpu" if config["training"]["device"] == "cpu" else "auto",
    threads: resource("evaluation", "threads")
    resources:
        runtime=resource("evaluation", "runtime"),
        mem_mb=resource("evaluation", "mem_mb"),
        gpu=resource("evaluation", "gpu"),
    log:
        "results/logs/{group}/{dataset}/{run}.evaluate.log",
    benchmark:
        "results/benchmarks/{group}/{dataset}/{run}.evaluate.tsv"
    conda:
        ENV
    script:
        "../workflow_scripts/evaluate.py"


rule table3:
    input:
        [f"{model_dir('models', d, f'{m}-{l}')}/test_metrics.json" for d, m, l in final_runs()],
    output:
        tsv=report("results/tables/table3_test_elbo.tsv", caption="../report/table3.rst", category="Tables"),
        md="results/tables/table3_test_elbo.md",
    params:
        runs=final_runs(),
    log:
        "results/logs/tables/table3.log",
    conda:
        ENV
    script:
        "../workflow_scripts/table3.py"
