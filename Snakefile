# scvae-torch: data -> grid search -> final training -> evaluation -> clustering -> tables and figures.
# Run: snakemake --cores N [--configfile config/paper.yaml]. Rules live in rules/; see config/README.md.

from snakemake.utils import min_version

min_version("9.0")


# config/config.yaml is the default; a --configfile replaces it (Snakemake would otherwise merge the two).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/gridsearch.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/clustering.smk"
include: "rules/figures.smk"
include: "rules/benchmark.smk"
include: "rules/integration.smk"


# Run on the submitting host under a cluster profile: downloads need the internet (compute nodes often have
# none), and tables and figures take seconds, less than a scheduler round trip.
localrules:
    download_data,
    table1,
    table2,
    table3,
    clustering_table,
    figure2,
    figure3,
    figure5,
    learning_curves,
    benchmark_table,
    benchmark_figure,
    integration_table,
    integration_figure,


rule all:
    input:
        all_targets(),
    default_target: True
