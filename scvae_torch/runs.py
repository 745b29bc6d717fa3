"""Run folders of the command line and the pipeline: train a canonical h5ad into one, evaluate one; both through
`SCVAE`, so that its training, defaults and inference are the only ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import provenance
from .batches import SourceError, batch_codes, closed_on_error, open_source, read_batches
from .config import IW_SAMPLES, TrainConfig
from .data import DEFAULT_FRACTIONS, read_split
from .evaluation import cluster_scores, decoded_feature_means, observed_feature_means
from .io.atomic import write_h5ad, write_text
from .model import LATENT_KEY, SCVAE
from .models import GMVAE
from .training import TrainingError, load_model, open_counts, resolve_device, select_genes


def file_model(data_path: str, batch: bool = False, stream: str = TrainConfig.stream,
               stream_above_gb: float = TrainConfig.stream_above_gb, device: str = "auto", **settings) -> SCVAE:
    """An untrained `SCVAE` of the counts in a canonical h5ad, held compactly in memory or, with stream 'on' (or
    'auto' above stream_above_gb GiB), read from the file minibatch by minibatch; batch=True conditions it on the
    file's obs['batch']. settings: the model's, as for `SCVAE`. Close it (or use `with`) to release the file."""
    X, cells, labels, genes = open_counts(data_path, stream, stream_above_gb, device)
    with closed_on_error(X):
        names = None
        if batch:
            try:
                names = read_batches(data_path)
            except SourceError as err:
                raise TrainingError(str(err)) from None
        return SCVAE._of_data(X, cells, genes, labels, names, data_path, settings)


def train_dataset(data_path: str, out_dir: str, model_config: dict, train_config: TrainConfig,
                  split_path: str | None = None, batch: bool = False) -> dict:
    """Train (or resume) on a canonical h5ad in out_dir; returns the run's metrics (metrics.json).

    Without a split file, the run's saved split (resuming) or a new seeded one of `data.DEFAULT_FRACTIONS`.
    batch: condition the model on the file's obs['batch'] (its categories, sorted, are stored in the model's
    configuration and so in every checkpoint). A resumed run must get the genes (reordered by name when only
    their order differs) and the split it started with; nothing is written before they are checked.
    """
    with file_model(data_path, batch=batch, stream=train_config.stream, stream_above_gb=train_config.stream_above_gb,
                    device=train_config.device, **model_config) as model:
        model.train(train_config=train_config, checkpoint_dir=out_dir, split_file=split_path,
                    train_size=DEFAULT_FRACTIONS[0], validation_size=DEFAULT_FRACTIONS[1])
    return model.metrics


def evaluate_dataset(model_dir: str, data_path: str, metrics_path: str, latent_path: str,
                     split_path: str | None = None, iw_samples: int = IW_SAMPLES, seed: int = 0,
                     feature_means_path: str | None = None, device: str = "auto", stream: str = "auto",
                     stream_above_gb: float = TrainConfig.stream_above_gb) -> dict:
    """Evaluate a run folder on the test split; write metrics JSON, latent.h5ad and optional feature means.

    stream as in training: 'on' (or 'auto' above stream_above_gb GiB) reads the counts from the file
    minibatch by minibatch instead of holding them (compactly) in memory."""
    model = None
    try:
        model = run_model(model_dir, data_path, device=device, stream=stream, stream_above_gb=stream_above_gb)
        return _evaluate(model, model_dir, metrics_path, latent_path, split_path, iw_samples, seed,
                         feature_means_path)
    except SourceError as err:  # a streamed block that cannot be read or holds no counts, a batch not trained on
        raise TrainingError(f"{err}; nothing was written") from None
    finally:
        if model is not None:
            model.close()


def run_model(run_dir: str | Path, data_path: str, device: str = "auto", stream: str = "auto",
              stream_above_gb: float = TrainConfig.stream_above_gb) -> SCVAE:
    """The model a training run folder holds (best.pt), on a canonical h5ad with the run's genes (put in its order
    by name). A run still being written, or one that never trained an epoch, is refused. Close it after use."""
    dev = resolve_device(device)
    module = load_model(run_dir, dev)  # first: a damaged or unsafe model file is named as such
    provenance.check_evaluable(run_dir)  # not locked by a training, checkpointed, trained
    X, cells, labels, genes = open_counts(data_path, stream, stream_above_gb, dev)
    with closed_on_error(X):
        order = provenance.align_genes(run_dir, genes, data_path)  # the model's gene order, by name
        if order is not None:
            X, genes = select_genes(X, order), genes[order]
        codes = None
        if module.cfg.n_batches:  # names -> the codes the model was trained with; an unseen batch is refused
            codes = batch_codes(read_batches(data_path), module.cfg.batches, f"{data_path}: obs['batch']")
    return SCVAE._of_module(module, dev, genes, X=open_source(X, dev), cells=cells, labels=labels, codes=codes,
                            source=data_path)  # opened once, for every pass


def _evaluate(model: SCVAE, model_dir: str, metrics_path: str, latent_path: str, split_path: str | None,
              iw_samples: int, seed: int, feature_means_path: str | None) -> dict:
    """evaluate_dataset's work on a model with its counts opened."""
    import anndata as ad

    cells, labels, codes = model.cells, model.labels, model._codes
    split = Path(split_path) if split_path else Path(model_dir) / "split.tsv"
    subsets = read_split(str(split), cells)
    provenance.check_evaluation_split(model_dir, cells, subsets, str(split))  # test cells it never trained on
    test = subsets["test"]
    cfg = model.model_config
    metrics = {"model": cfg.model, "likelihood": cfg.likelihood,
               **model.evaluate(indices=test, n_samples=iw_samples, seed=seed)}

    obs = pd.DataFrame(index=pd.Index(cells.astype(str), name="cell"))
    subset_of = np.empty(len(cells), dtype=object)
    for name, rows in subsets.items():
        subset_of[rows] = name
    obs["subset"] = pd.Categorical(subset_of)
    if labels is not None:
        obs["label"] = pd.Categorical(labels.astype(str))
    if codes is not None:
        obs["batch"] = pd.Categorical(np.asarray(cfg.batches)[codes], categories=cfg.batches)
    latent = ad.AnnData(X=sp.csr_matrix((len(cells), 0), dtype=np.float32), obs=obs)
    latent.obsm[LATENT_KEY] = model.get_latent_representation()
    if isinstance(model.module, GMVAE):
        # the encoder's q(y|x) (Figure 5 draws it); the clusters as the model's cluster_posterior reads them
        encoder = model.get_cluster_probabilities(posterior="encoder")
        latent.obsm["scvae_responsibilities"] = encoder
        clusters = (encoder if cfg.cluster_posterior == "encoder" else model.get_cluster_probabilities()).argmax(1)
        latent.obs["scvae_cluster"] = pd.Categorical(clusters.astype(str))
        if labels is not None:
            metrics["test_cluster"] = cluster_scores(labels[test], clusters[test])
    latent.uns["scvae"] = {"model": cfg.model, "likelihood": cfg.likelihood}
    write_h5ad(latent, latent_path)
    if feature_means_path:
        X = model._X
        table = pd.DataFrame({"feature": model.genes.astype(str),
                              "observed_mean": observed_feature_means(X, test),
                              "decoded_mean": decoded_feature_means(model.module, X, test, model.device,
                                                                     batch_codes=codes, seed=seed)})
        write_text(feature_means_path, table.to_csv(sep="\t", index=False))
    write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return metrics
