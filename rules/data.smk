# Data: simulate, download (checked against a given or recorded checksum) or read a local file into
# results/data/{dataset}/counts.h5ad, then a seeded train/validation/test split and Table 1.


rule simulate_data:
    output:
        counts="results/data/{dataset}/counts.h5ad",
        summary="results/data/{dataset}/summary.json",
        truth="results/data/{dataset}/truth.json",
    wildcard_constraints:
        dataset=datasets_from("simulate"),
    params:
        spec=lambda wc: dataset_spec(wc.dataset, "simulate"),
    log:
        "results/logs/data/{dataset}.simulate.log",
    conda:
        ENV
    script:
        "../workflow_scripts/simulate.py"


rule download_data:
    output:
        "resources/downloads/{dataset}/raw",
    wildcard_constraints:
        dataset=datasets_from("download"),
    params:
        spec=lambda wc: dataset_spec(wc.dataset, "download"),
    log:
        "results/logs/data/{dataset}.download.log",
    retries: 2
    conda:
        ENV
    script:
        "../workflow_scripts/download.py"


rule prepare_data:
    input:
        raw_input,
    output:
        counts="results/data/{dataset}/counts.h5ad",
        summary="results/data/{dataset}/summary.json",
    wildcard_constraints:
        dataset=f"{datasets_from('download')}|{datasets_from('file')}",
    params:
        spec=lambda wc: dataset_spec(wc.dataset),
    log:
        "results/logs/data/{dataset}.prepare.log",
    conda:
        ENV
    script:
        "../workflow_scripts/prepare.py"


rule split_data:
    input:
        counts="results/data/{dataset}/counts.h5ad",
    output:
        "results/data/{dataset}/split.tsv",
    params:
        split=canonical(config["split"]),
    log:
        "results/logs/data/{dataset}.split.log",
    conda:
        ENV
    script:
        "../workflow_scripts/split.py"


rule table1:
    input:
        expand("results/data/{dataset}/summary.json", dataset=list(config["datasets"])),
    output:
        tsv=report("results/tables/table1_datasets.tsv", caption="../report/table1.rst", category="Tables"),
        md="results/tables/table1_datasets.md",
    params:
        datasets=list(config["datasets"]),
        sources=[source_of(d) for d in config["datasets"]],
    log:
        "results/logs/tables/table1.log",
    conda:
        ENV
    script:
        "../workflow_scripts/table1.py"
