"""Rule table1: one row per data set - cells, genes, non-zeros, sparsity, labels (the review's Table 1)."""

import json

import pandas as pd

import _common

_common.start(snakemake)

rows = []
for dataset, source, path in zip(snakemake.params.datasets, snakemake.params.sources, snakemake.input):
    with open(path) as fh:
        s = json.load(fh)
    rows.append({"dataset": dataset, "source": source, "cells": s["cells"], "genes": s["genes"],
                 "nonzeros": s["nonzeros"], "sparsity_percent": s["sparsity_percent"],
                 "labels": s["labels"] or 0,
                 "cells_per_label": ", ".join(f"{k}: {v}" for k, v in (s["label_counts"] or {}).items()) or "-"})
table = pd.DataFrame(rows)
_common.write_table(table, snakemake.output.tsv, snakemake.output.md, "Table 1: data sets")
print(table.to_string())
