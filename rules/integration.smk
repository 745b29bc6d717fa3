# Batch correction on labelled data sets with a batch (integration.datasets): the final model, conditioned on
# the batch, against the same model trained without it (rules/train.smk: train_uncorrected, evaluated by the
# evaluate rule) and PCA of log-normalised counts; scored on all cells by scvae_torch.integration.


rule integration:
    input:
        corrected=lambda wc: f"{model_dir('models', wc.dataset, integration_run())}/latent.h5ad",
        uncorrected=lambda wc: f"{model_dir('uncorrected', wc.dataset, integration_run())}/latent.h5ad",
        data="results/data/{dataset}/counts.h5ad",
    output:
        scores="results/integration/{dataset}/scores.tsv",
        embeddings="results/integration/{dataset}/embeddings.h5ad",
    params:
        model=config["integration"]["model"],
        likelihood=config["integration"]["likelihood"],
        n_pcs=config["integration"]["n_pcs"],
        neighbours=config["integration"]["neighbours"],
        seed=config["integration"]["seed"],
    log:
        "results/logs/integration/{dataset}.log",
    conda:
        ENV
    script:
        "../workflow_scripts/integration.py"


rule integration_table:
    input:
        [f"results/integration/{d}/scores.tsv" for d, _, _ in integration_runs()],
    output:
        tsv=report("results/tables/integration.tsv", caption="../report/integration.rst", category="Tables"),
        md="results/tables/integration.md",
    log:
        "results/logs/tables/integration.log",
    conda:
        ENV
    script:
        "../workflow_scripts/integration_table.py"


rule integration_figure:
    input:
        [f"results/integration/{d}/embeddings.h5ad" for d, _, _ in integration_runs()],
    output:
        png=report("results/figures/integration.png", caption="../report/integration.rst", category="Figures"),
        pdf="results/figures/integration.pdf",
    params:
        datasets=[d for d, _, _ in integration_runs()],
    log:
        "results/logs/figures/integration.log",
    conda:
        ENV
    script:
        "../workflow_scripts/integration_figure.py"
