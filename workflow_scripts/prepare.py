"""Rule prepare_data: read a downloaded or local count matrix, validate it, write the canonical h5ad."""

import sys

import _common

_common.start(snakemake)

from scvae_torch import data  # noqa: E402

spec = snakemake.params.spec
if "download" in spec:
    from scvae_torch.download import REGISTRY

    opts = dict(spec["download"])
    if "name" in opts and "format" not in opts:
        opts["format"] = REGISTRY[opts["name"]].format
else:
    opts = dict(spec["file"])
keys = ("genome", "layer", "use_raw", "labels", "batch", "keep", "min_counts_cell", "min_counts_gene", "top_genes")
try:
    # a 10x HDF5 file larger than data.STREAM_ABOVE_GB in memory is converted block by block
    counts = data.prepare_input(snakemake.input[0], opts.get("format", "auto"), round_counts=opts.get("round", False),
                                **{k: opts[k] for k in keys if k in opts})
    summary = data.write_prepared(counts, snakemake.output.counts)
    data.write_summary(summary, snakemake.output.summary)
except data.DataError as err:
    print(f"error: {err}")
    sys.exit(1)
print(summary)
