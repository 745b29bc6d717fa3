"""Rule clustering_table: ARI and AMI of every clustering on every labelled data set, in one table."""

import pandas as pd

import _common

_common.start(snakemake)

COLUMNS = ["dataset", "method", "run", "likelihood", "y_regularisation", "k", "clusters_found", "test_cells",
           "ari", "ami"]
parts = [pd.read_csv(path, sep="\t") for path in snakemake.input]
table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
_common.write_table(table[COLUMNS], snakemake.output.tsv, snakemake.output.md,
                    "Clustering against known labels (test cells): ARI and AMI")
print(table.to_string())
