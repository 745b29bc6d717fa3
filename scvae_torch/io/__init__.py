"""Reading, checking and writing count data; `scvae_torch.data` gathers the public names.

Modules: `validation` (DataError, Counts, value and name checks), `hdf5` (HDF5 access), one reader per format
(`tenx`, `h5ad`, `mtx`), `formats` (detection, `read_counts`), `filters` (count thresholds, gene selection,
summary), `canonical` (the canonical counts.h5ad), `stream` (block-by-block 10x conversion), `prepare` (what
the `prepare` command runs), `splits` (train/validation/test), `atomic` (every output written atomically).
Nothing is imported here, so that `scvae_torch.io.atomic` stays cheap to import.
"""
