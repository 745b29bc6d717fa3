# Real-data benchmark: scvae-torch's models against peers on the labelled data sets of benchmark.datasets,
# on the same genes and split. scVI runs under benchmark.peers.scvi.python (skipped when scvi-tools is
# missing there); the scanpy route falls back to scikit-learn. One table and one figure sum it all up.


rule peer_scvi:
    input:
        data="results/data/{dataset}/counts.h5ad",
        split="results/data/{dataset}/split.tsv",
        model="results/models/{dataset}/vae-{likelihood}/metrics.json",  # latent, epochs, optimiser to match
    output:
        "results/peers/{dataset}/scvi-{likelihood}/metrics.json",
    params:
        python=lambda wc: scvi_python(),
        script=f"{workflow.basedir}/workflow_scripts/scvi_peer.py",  # a command: it must find _common.py
        iw_samples=config["evaluation"]["iw_samples"],
        seed=config["clustering"]["seed"],
    threads: lambda wc: config["benchmark"]["peers"]["scvi"]["resources"]["threads"]
    resources:
        runtime=lambda wc: config["benchmark"]["peers"]["scvi"]["resources"]["runtime"],
        mem_mb=lambda wc: config["benchmark"]["peers"]["scvi"]["resources"]["mem_mb"],
    log:
        "results/logs/peers/{dataset}/scvi-{likelihood}.log",
    benchmark:
        "results/benchmarks/peers/{dataset}/scvi-{likelihood}.tsv"
    conda:
        "../envs/scvi.yaml"
    shell:
        "{params.python:q} {params.script:q} --data {input.data:q} --split {input.split:q} "
        "--model {input.model:q} --likelihood {wildcards.likelihood:q} --iw-samples {params.iw_samples:q} "
        "--seed {params.seed:q} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule peer_scanpy:
    input:
        data="results/data/{dataset}/counts.h5ad",
        split="results/data/{dataset}/split.tsv",
    output:
        "results/peers/{dataset}/scanpy/metrics.json",
    params:
        n_pcs=lambda wc: config["benchmark"]["peers"]["scanpy"]["n_pcs"],
        leiden=lambda wc: config["benchmark"]["peers"]["scanpy"]["leiden"],
        seed=config["clustering"]["seed"],
    threads: lambda wc: config["benchmark"]["peers"]["scanpy"]["resources"]["threads"]
    resources:
        runtime=lambda wc: config["benchmark"]["peers"]["scanpy"]["resources"]["runtime"],
        mem_mb=lambda wc: config["benchmark"]["peers"]["scanpy"]["resources"]["mem_mb"],
    log:
        "results/logs/peers/{dataset}/scanpy.log",
    benchmark:
        "results/benchmarks/peers/{dataset}/scanpy.tsv"
    conda:
        ENV
    script:
        "../workflow_scripts/scanpy_peer.py"


rule benchmark_table:
    input:
        unpack(benchmark_inputs),
    output:
        tsv=report("results/tables/benchmark.tsv", caption="../report/benchmark.rst", category="Tables"),
        md="results/tables/benchmark.md",
    log:
        "results/logs/tables/benchmark.log",
    conda:
        ENV
    script:
        "../workflow_scripts/benchmark_table.py"


rule benchmark_figure:
    input:
        "results/tables/benchmark.tsv",
    output:
        png=report("results/figures/benchmark.png", caption="../report/benchmark.rst", category="Figures"),
        pdf="results/figures/benchmark.pdf",
    log:
        "results/logs/figures/benchmark.log",
    conda:
        ENV
    script:
        "../workflow_scripts/benchmark_figure.py"
