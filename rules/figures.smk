# Figures (PNG at 150 dpi and PDF), each drawn by one function of scvae_torch.plots from result files.
# Training curves are read from history.tsv next to each run's metrics.json (see rules/train.smk).


rule figure2:
    input:
        unpack(figure2_inputs),
    output:
        png=report(
            "results/figures/figure2_vae_synthetic_poisson.png",
            caption="../report/figure2.rst",
            category="Figures",
        ),
        pdf="results/figures/figure2_vae_synthetic_poisson.pdf",
    log:
        "results/logs/figures/figure2.log",
    conda:
        ENV
    script:
        "../workflow_scripts/figure2.py"


rule figure3:
    input:
        model=lambda wc: f"{figure_run('figure3', 'vae-poisson')}/metrics.json",
    output:
        png=report(
            "results/figures/figure3_poisson_stability.png",
            caption="../report/figure3.rst",
            category="Figures",
        ),
        pdf="results/figures/figure3_poisson_stability.pdf",
    log:
        "results/logs/figures/figure3.log",
    conda:
        ENV
    script:
        "../workflow_scripts/figure3.py"


rule figure5:
    input:
        unpack(figure5_inputs),
    output:
        png=report(
            "results/figures/figure5_gmvae_ablation.png",
            caption="../report/figure5.rst",
            category="Figures",
        ),
        pdf="results/figures/figure5_gmvae_ablation.pdf",
    params:
        regularisations=lambda wc: config["figures"]["figure5"]["regularisations"],
    log:
        "results/logs/figures/figure5.log",
    conda:
        ENV
    script:
        "../workflow_scripts/figure5.py"


rule learning_curves:
    input:
        models=lambda wc: [
            f"{model_dir('models', d, f'{m}-{l}')}/metrics.json"
            for d, m, l in grid_runs()
            if d == wc.dataset
        ],
    output:
        png=report(
            "results/figures/learning_curves_{dataset}.png",
            caption="../report/learning_curves.rst",
            category="Figures",
        ),
        pdf="results/figures/learning_curves_{dataset}.pdf",
    log:
        "results/logs/figures/learning_curves_{dataset}.log",
    conda:
        ENV
    script:
        "../workflow_scripts/learning_curves.py"


rule latent_space:
    input:
        latents=lambda wc: [f"{d}/latent.h5ad" for d in run_dirs(wc.dataset).values()],
        assignments="results/clustering/{dataset}/assignments.tsv",
    output:
        png=report(
            "results/figures/latent_space_{dataset}.png",
            caption="../report/latent_space.rst",
            category="Figures",
        ),
        pdf="results/figures/latent_space_{dataset}.pdf",
    params:
        runs=lambda wc: list(run_dirs(wc.dataset)),
    log:
        "results/logs/figures/latent_space_{dataset}.log",
    conda:
        ENV
    script:
        "../workflow_scripts/latent_space.py"
