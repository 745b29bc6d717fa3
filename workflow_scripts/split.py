"""Rule split_data: the seeded train/validation/test split of one data set."""

import _common

_common.start(snakemake)

from scvae_torch import data  # noqa: E402

counts = data.load_canonical(snakemake.input.counts)
opts = snakemake.params.split
stratify = bool(opts["stratify"]) and counts.labels is not None
if opts["stratify"] and not stratify:
    print("no labels in this data set: split not stratified")
split = data.make_split(counts.cells, counts.labels, fractions=tuple(opts["fractions"]), seed=opts["seed"],
                        stratify=stratify)
data.write_split(split, snakemake.output[0])
print(split.value_counts().to_string())
