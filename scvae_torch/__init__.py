"""scvae-torch: variational auto-encoders for raw single-cell RNA-seq counts.

``from scvae_torch import SCVAE`` gives the model on an AnnData (imported on first use, so that commands that
do not train never import torch).
"""

__version__ = "0.1.0"
__all__ = ["SCVAE"]


def __getattr__(name: str):
    if name == "SCVAE":
        from .model import SCVAE

        return SCVAE
    raise AttributeError(f"module 'scvae_torch' has no attribute {name!r}")
