# Final training: one job per (data set, model, likelihood) with the grid winner (or, for the Figure 2
# check data, the architecture in figures.figure2), and the Figure 5 GMVAE y-regularisation ablation.
# train_uncorrected trains a final model of the integration table once more without its data set's batch.
# Re-run after a kill, the job resumes from checkpoint.pt in its folder (kept: only metrics.json, written
# last, is a declared output); a changed architecture or optimiser setting starts the run afresh.


rule train_final:
    input:
        unpack(final_inputs),
    output:
        "results/models/{dataset}/{model}-{likelihood}/metrics.json",
    params:
        model=lambda wc: final_params(wc)["model"],
        training=lambda wc: final_params(wc)["training"],
        batch=lambda wc: final_params(wc)["batch"],
    threads: resource("training", "threads")
    resources:
        runtime=resource("training", "runtime"),
        mem_mb=resource("training", "mem_mb"),
        gpu=resource("training", "gpu"),
    log:
        "results/logs/models/{dataset}/{model}-{likelihood}.log",
    benchmark:
        "results/benchmarks/models/{dataset}/{model}-{likelihood}.tsv"
    conda:
        ENV
    script:
        "../workflow_scripts/train.py"


rule train_ablation:
    input:
        data="results/data/{dataset}/counts.h5ad",
        split="results/data/{dataset}/split.tsv",
    output:
        "results/ablation/{dataset}/gmvae-{likelihood}-y{reg}/metrics.json",
    params:
        model=lambda wc: ablation_params(wc)["model"],
        training=lambda wc: ablation_params(wc)["training"],
        batch=lambda wc: ablation_params(wc)["batch"],
    threads: resource("training", "threads")
    resources:
        runtime=resource("training", "runtime"),
        mem_mb=resource("training", "mem_mb"),
        gpu=resource("training", "gpu"),
    log:
        "results/logs/ablation/{dataset}/gmvae-{likelihood}-y{reg}.log",
    benchmark:
        "results/benchmarks/ablation/{dataset}/gmvae-{likelihood}-y{reg}.tsv"
    conda:
        ENV
    script:
        "../workflow_scripts/train.py"


rule train_uncorrected:
    input:
        unpack(final_inputs),
    output:
        "results/uncorrected/{dataset}/{model}-{likelihood}/metrics.json",
    params:
        model=lambda wc: final_params(wc, batch=False)["model"],
        training=lambda wc: final_params(wc, batch=False)["training"],
        batch=False,
    threads: resource("training", "threads")
    resources:
        runtime=resource("training", "runtime"),
        mem_mb=resource("training", "mem_mb"),
        gpu=resource("training", "gpu"),
    log:
        "results/logs/uncorrected/{dataset}/{model}-{likelihood}.log",
    benchmark:
        "results/benchmarks/uncorrected/{dataset}/{model}-{likelihood}.tsv"
    conda:
        ENV
    script:
        "../workflow_scripts/train.py"
