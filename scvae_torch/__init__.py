"""scvae-torch: variational auto-encoders for raw single-cell RNA-seq counts."""

__version__ = "0.1.0"
