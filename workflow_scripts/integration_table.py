"""Rule integration_table: the integration scores of every data set in one table."""

import pandas as pd

import _common

_common.start(snakemake)

table = pd.concat([pd.read_csv(path, sep="\t") for path in snakemake.input], ignore_index=True)
_common.write_table(table, snakemake.output.tsv, snakemake.output.md,
                    "Batch correction: cell-type clusters (ARI, AMI), batch mixing and type separation (all cells)")
print(table.to_string())
