"""The fit loop: minibatches from CSR, Adam, KL warm-up, checkpoint/resume, history, non-finite guard."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class TrainConfig:
    """Optimisation settings for one training run."""

    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    kl_warmup: int = 0          # epochs of linear KL warm-up (0 = none)
    seed: int = 0
    device: str = "auto"        # auto | cpu | cuda
    checkpoint_every: int = 10  # epochs


def fit(X: sp.csr_matrix, train_idx: np.ndarray, val_idx: np.ndarray, model_config: dict,
        train_config: TrainConfig, out_dir: str) -> dict:
    """Train (or resume) a model in out_dir; writes checkpoint.pt, best.pt, history.tsv, metrics.json."""
    raise NotImplementedError
