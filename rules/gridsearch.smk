# Grid search: one short training per (data set, model, likelihood, architecture); Table 2 keeps the best
# architecture per (data set, model, likelihood) by validation ELBO. Table 2 is a checkpoint: the final
# training reads its winner from it, so a changed grid re-trains only the likelihoods whose winner changed.


rule train_grid:
    input:
        data="results/data/{dataset}/counts.h5ad",
        split="results/data/{dataset}/split.tsv",
    # checkpoint.pt, best.pt and history.tsv are the run's resumable state, deliberately not declared:
    # Snakemake deletes declared outputs before a re-run, and metrics.json is written last.
    output:
        "results/grid/{dataset}/{model}-{likelihood}/{arch}/metrics.json",
    params:
        model=lambda wc: model_config(wc.dataset, wc.model, wc.likelihood, wc.arch),
        training=lambda wc: train_config(epochs=config["gridsearch"]["epochs"]),
        batch=lambda wc: conditioned(wc.dataset),
    threads: resource("gridsearch", "threads")
    resources:
        runtime=resource("gridsearch", "runtime"),
        mem_mb=resource("gridsearch", "mem_mb"),
        gpu=resource("gridsearch", "gpu"),
    log:
        "results/logs/grid/{dataset}/{model}-{likelihood}/{arch}.log",
    benchmark:
        "results/benchmarks/grid/{dataset}/{model}-{likelihood}/{arch}.tsv"
    conda:
        ENV
    script:
        "../workflow_scripts/train.py"


checkpoint table2:
    input:
        [
            f"results/grid/{d}/{m}-{l}/{arch}/metrics.json"
            for d, m, l in grid_runs()
            for arch in grid_archs()
        ],
    output:
        tsv=report(
            "results/tables/table2_gridsearch.tsv", caption="../report/table2.rst", category="Tables"
        ),
        md="results/tables/table2_gridsearch.md",
        all="results/tables/gridsearch_all.tsv",
    params:
        runs=grid_runs(),
        archs=grid_archs(),
        epochs=config["gridsearch"]["epochs"],
    log:
        "results/logs/tables/table2.log",
    conda:
        ENV
    script:
        "../workflow_scripts/table2.py"
