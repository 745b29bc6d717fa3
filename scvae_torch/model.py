"""SCVAE: the model on a user's AnnData, named as in scvi-tools (train, latent, clusters, expression, save/load).

The command line and the pipeline train and evaluate through this class too (`runs`): one training loop
(`training.fit`), so checkpoints, resume, signals, the non-finite guard and early stopping behave identically
everywhere; every default comes from `config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import distributions as D
from . import provenance
from .batches import SourceError, StreamSource, batch_codes, open_source
from .config import IW_SAMPLES, ModelConfig, TrainConfig
from .data import DataError
from .evaluation import cluster_probabilities, evaluate_model, latent_means
from .io import user_data
from .io.atomic import torch_save, write_h5ad, write_text
from .models import GMVAE, VAE, build_model
from .provenance import RunInputs, check_genes
from .training import (
    BEST,
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    HISTORY,
    TrainingError,
    fit,
    load_checkpoint,
    resolve_device,
    run_gene_order,
    run_split,
    select_genes,
)

log = logging.getLogger("scvae_torch.model")

# Where results go in the user's AnnData.
LATENT_KEY = "X_scvae"                                  # obsm: mean of q(z|x) per cell
CLUSTER_KEY = "scvae_cluster"                           # obs: GMVAE cluster (predict_clusters), categorical
PROBABILITIES_KEY = "scvae_cluster_probabilities"       # obsm: get_cluster_probabilities (GMVAE), cells x K
SETUP_KEY = "_scvae_setup"                              # uns: what setup_anndata recorded
# A saved model folder.
WEIGHTS = "model.pt"
SETTINGS = "settings.json"
# Cells x genes values per decoded minibatch (bounds the temporaries of the inference methods: 32 MB float32).
DECODE_VALUES = 1 << 23


class SCVAE:
    """A VAE or Gaussian-mixture VAE (GMVAE) of the raw counts in an AnnData.

    Parameters
    ----------
    adata
        Cells x genes AnnData holding raw counts (in memory; sparse stays sparse).
    layer
        Layer with the raw counts (default: ``adata.X``, or what `setup_anndata` recorded).
    labels_key
        Column of ``adata.obs`` with known cell types (only ``y_regularisation='supervised'`` trains on them).
    batch_key
        Column of ``adata.obs`` with each cell's batch (donor, plate, platform ...): the model is conditioned on
        it (a conditional VAE: the decoder always, the encoders with ``batch_encoder=True``), so that the latent
        space and the clusters need not encode it; ``dispersion="gene-batch"`` gives NB/ZINB dispersions per gene
        and batch. Its categories are stored with the model; data with a batch it never saw are refused.
    model
        ``"vae"`` or ``"gmvae"``; default from `scvae_torch.config.ModelConfig`.
    likelihood
        ``"nb"``, ``"zinb"``, ``"poisson"`` or ``"zip"``.
    components
        Mixture components K of a GMVAE (clusters).
    encoder, decoder
        Hidden layer sizes, e.g. ``[100, 250]``.
    latent
        Latent dimension.
    **model_options
        Any other `ModelConfig` field (``dispersion``, ``log1p_input``, ``library_size``, ``dropout`` ...).

    Examples
    --------
    >>> model = SCVAE(adata, model="gmvae", components=8)
    >>> model.train()
    >>> adata.obsm["X_scvae"], adata.obs["scvae_cluster"]
    """

    def __init__(self, adata, layer: str | None = None, labels_key: str | None = None, model: str | None = None,
                 likelihood: str | None = None, components: int | None = None, encoder: list[int] | None = None,
                 decoder: list[int] | None = None, latent: int | None = None, batch_key: str | None = None,
                 **model_options):
        setup = dict(adata.uns.get(SETUP_KEY, {}))
        self.layer = layer if layer is not None else setup.get("layer")
        self.labels_key = labels_key if labels_key is not None else setup.get("labels_key")
        self.batch_key = batch_key if batch_key is not None else setup.get("batch_key")
        if not adata.obs_names.is_unique:
            raise DataError(f"adata.obs_names: {int(adata.obs_names.duplicated().sum())} duplicate cell ids "
                            "(adata.obs_names_make_unique() first)")
        self._setup(user_data.counts(adata, self.layer), np.asarray(adata.obs_names, dtype=str),
                    np.asarray(adata.var_names, dtype=str), user_data.labels(adata, self.labels_key),
                    user_data.batch_names(adata, self.batch_key), "adata",
                    dict(model=model, likelihood=likelihood, components=components, encoder=encoder,
                         decoder=decoder, latent=latent, **model_options))
        self.adata = adata

    def _setup(self, X, cells: np.ndarray, genes: np.ndarray, labels: np.ndarray | None,
               batch_names: np.ndarray | None, source: str, settings: dict) -> None:
        """The data (counts, cell ids, genes, labels, batch codes) and an untrained module of the given settings."""
        if "batches" in settings:
            raise ValueError("the batch categories come from the data: give batch_key, not batches")
        settings = {k: v for k, v in settings.items() if v is not None}
        if batch_names is not None:
            settings["batches"] = sorted(set(batch_names.tolist()))
            self._codes = batch_codes(batch_names, settings["batches"], source)
        else:
            self._codes = None
        cfg = ModelConfig.from_dict({"n_features": len(genes), **settings})
        torch.manual_seed(0)
        self._init(build_model(cfg), torch.device("cpu"), genes, X, cells, labels, source,
                   trained=False)

    def _init(self, module: VAE, device: torch.device, genes: np.ndarray, X, cells: np.ndarray | None,
              labels: np.ndarray | None, source: str, trained: bool) -> None:
        """Every attribute but the AnnData keys (layer, labels_key, batch_key) and the batch codes: the module (on
        `device`, in eval mode), the data it holds (X None: none yet) and an empty training record."""
        self.adata, self._X, self.cells, self.labels, self.source = None, X, cells, labels, source
        self.genes, self.model_config, self.device = np.asarray(genes, dtype=str), module.cfg, device
        self.module: VAE = module.to(device).eval()
        self.train_config: TrainConfig | None = None
        self.history = pd.DataFrame()
        self.metrics: dict = {}
        self.is_trained = trained
        self.train_indices = self.validation_indices = self.test_indices = np.arange(0)

    @classmethod
    def _of_data(cls, X, cells: np.ndarray, genes: np.ndarray, labels: np.ndarray | None,
                 batch_names: np.ndarray | None, source: str, settings: dict) -> SCVAE:
        """An untrained model of counts that are not an AnnData's (a canonical file's: `runs.file_model`)."""
        self = cls.__new__(cls)
        self.layer = self.labels_key = self.batch_key = None
        self._setup(X, cells, genes, labels, batch_names, source, settings)
        return self

    @classmethod
    def _of_module(cls, module: VAE, device: torch.device, genes: np.ndarray, X=None, cells: np.ndarray | None = None,
                   labels: np.ndarray | None = None, codes: np.ndarray | None = None, source: str = "adata") -> SCVAE:
        """A trained model of `module` (on `device`, in eval mode), with the data given (X in its gene order) or
        none yet (`load`, `runs.run_model`)."""
        self = cls.__new__(cls)
        self.layer = self.labels_key = self.batch_key = None
        self._codes = codes
        self._init(module, device, genes, X, cells, labels, source, trained=True)
        return self

    def close(self) -> None:
        """Release the file of a model reading its counts from one (`runs.file_model` with streaming)."""
        if isinstance(self._X, StreamSource):
            self._X.close()

    def __enter__(self) -> SCVAE:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- set-up and training ------------------------------------------------------------------------------

    @staticmethod
    def setup_anndata(adata, layer: str | None = None, labels_key: str | None = None,
                      batch_key: str | None = None) -> None:
        """Record in ``adata.uns`` which layer holds the counts and which obs columns the labels and the batch
        (scvi-tools' habit)."""
        given = {"layer": layer, "labels_key": labels_key, "batch_key": batch_key}
        adata.uns[SETUP_KEY] = {k: v for k, v in given.items() if v is not None}

    def train(self, max_epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
              early_stopping: bool | None = None, patience: int | None = None, train_size: float = 0.9,
              validation_size: float | None = None, seed: int = 0, device: str = "auto",
              checkpoint_dir: str | Path | None = None, split_file: str | None = None,
              train_config: TrainConfig | None = None, **train_options) -> SCVAE:
        """Train on the cells of the AnnData, then write the latent (and clusters) into it.

        Parameters
        ----------
        max_epochs
            Most epochs; default from the number of cells (`scvae_torch.config.default_epochs`).
        lr, batch_size, early_stopping, patience
            Optimisation settings; each default is `scvae_torch.config.TrainConfig`'s.
        train_size, validation_size
            Fractions of the cells for training and for the validation ELBO (early stopping, best weights);
            the rest (default none) is held out as test cells (`test_indices`). Seeded by `seed`.
        seed
            Seed of the split, the initialisation and the minibatch order: same seed, same result.
        device
            ``"auto"`` (CUDA when there is one), ``"cpu"`` or ``"cuda"``.
        checkpoint_dir
            Keep the run folder here (checkpoint.pt, best.pt, history.tsv, split.tsv); run again with the same
            folder to resume a killed run (with the split saved there). Default: a temporary folder, removed
            afterwards.
        split_file
            A split.tsv (cell id, subset) to train with instead of a new split.
        train_config
            A whole `TrainConfig` (the command line's), in place of the options above and ``train_options``.
        **train_options
            Any other `TrainConfig` field (``kl_warmup``, ``pretrain_epochs``, ``weight_decay`` ...).

        Returns
        -------
        The model, trained, with the weights of its best validation ELBO.
        """
        if train_config is None:
            given = dict(epochs=max_epochs, lr=lr, batch_size=batch_size, early_stopping=early_stopping,
                         patience=patience, seed=seed, device=device, **train_options)
            train_config = TrainConfig.from_dict({k: v for k, v in given.items() if v is not None})
        tc = train_config
        validation_size = 1.0 - train_size if validation_size is None else validation_size
        # rounded: 1 - 0.81 - 0.09 is 0.09999999999999998, and the CLI's split must be data.DEFAULT_FRACTIONS exactly
        fractions = (train_size, validation_size, round(max(0.0, 1.0 - train_size - validation_size), 12))
        labels = self._training_labels()
        with _run_folder(checkpoint_dir) as out:
            subsets, split, split_path = run_split(out, self.cells, split_file, tc.seed, fractions)
            order = run_gene_order(out, self.genes, self.source)  # a resumed run: the genes it started with
            if order is not None:
                self._X, self.genes = select_genes(self._X, order), self.genes[order]
            self.train_indices, self.validation_indices, self.test_indices = (
                subsets[name] for name in ("train", "validation", "test"))
            inputs = RunInputs(self.genes, self.cells, subsets, self.source, split_file=split_path, split=split)
            try:
                self.metrics = fit(self._X, self.train_indices, self.validation_indices, self.model_config, tc,
                                   out, labels=labels, inputs=inputs, batch_codes=self._codes)
            except SourceError as err:  # a streamed block that cannot be read or holds no counts: one line
                raise TrainingError(f"{err}; {provenance.checkpoint_note(out)}") from None
            best = out / BEST if (out / BEST).exists() else out / CHECKPOINT
            self.module.load_state_dict(load_checkpoint(best, "cpu")["model_state"])
            self.history = pd.read_csv(out / HISTORY, sep="\t") if (out / HISTORY).exists() else pd.DataFrame()
        self.train_config = tc.resolved(self._X.shape[0], self.model_config.model)
        self.device = resolve_device(tc.device)
        self.module.to(self.device).eval()
        self.is_trained = True
        if self.adata is not None:
            self._write_results()
        return self

    def _training_labels(self) -> np.ndarray | None:
        """Label codes for the supervised y-regularisation ablation (the only training that reads labels)."""
        if self.model_config.y_regularisation != "supervised":
            return None
        if self.labels is None:
            raise DataError(f"{self.source}: y_regularisation 'supervised' needs labels "
                            f"({'give labels_key' if self.adata is not None else 'obs[label]'})")
        return pd.Categorical(self.labels).codes.astype(np.int64)

    def _write_results(self) -> None:
        """The latent, and a GMVAE's clusters and their probabilities, into the AnnData (documented keys)."""
        self.adata.obsm[LATENT_KEY] = self.get_latent_representation()
        if isinstance(self.module, GMVAE):
            probabilities = self.get_cluster_probabilities()
            self.adata.obsm[PROBABILITIES_KEY] = probabilities
            self.adata.obs[CLUSTER_KEY] = pd.Categorical(
                probabilities.argmax(1).astype(str), categories=[str(k) for k in range(probabilities.shape[1])])
        self.adata.uns["scvae"] = {"model": self.model_config.model, "likelihood": self.model_config.likelihood,
                                   "latent_key": LATENT_KEY}

    # ---- results ------------------------------------------------------------------------------------------

    def _matrix(self, adata) -> sp.csr_matrix:
        """Counts of `adata` (default: the model's own) in the model's gene order."""
        if adata is None:
            if self._X is None:
                raise ValueError("this model was loaded without data: pass adata=")
            return self._X
        X = user_data.counts(adata, self.layer)
        order = check_genes(self.genes, np.asarray(adata.var_names, dtype=str), "adata.var_names", "this SCVAE model")
        return X if order is None else X[:, order]

    def _batch_codes(self, adata) -> np.ndarray | None:
        """Each cell's batch code for `adata` (default: the model's own), None for a model without a batch;
        a batch the model was not trained with is a DataError."""
        if not self.model_config.n_batches:
            return None
        if adata is None:
            return self._codes
        names = user_data.batch_names(adata, self.batch_key)
        try:
            return batch_codes(names, self.model_config.batches, f"adata.obs[{self.batch_key!r}]")
        except SourceError as err:
            raise DataError(str(err)) from None

    def _transform_codes(self, transform_batch) -> list[int] | None:
        """Codes of the batches named by transform_batch (None: each cell's own batch)."""
        if transform_batch is None:
            return None
        if not self.model_config.n_batches:
            raise ValueError("transform_batch needs a model trained with a batch covariate (batch_key)")
        names = [transform_batch] if isinstance(transform_batch, str) else list(transform_batch)
        known = self.model_config.batches
        unknown = [str(n) for n in names if str(n) not in known]
        if unknown or not names:
            raise ValueError(f"transform_batch: unknown batch(es) {', '.join(map(repr, unknown))} (the model knows "
                             f"{', '.join(map(repr, known))})")
        return [known.index(str(n)) for n in names]

    def _rows(self, X: sp.csr_matrix, indices) -> np.ndarray:
        rows = np.arange(X.shape[0]) if indices is None else np.asarray(indices)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return rows

    def _minibatches(self, X: sp.csr_matrix, rows: np.ndarray, batch_size: int | None,
                     codes: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The cells as sparse count tensors on the model's device, in order, with their batch codes (or None)."""
        batch_size = batch_size or max(1, min(1024, DECODE_VALUES // max(X.shape[1], 1)))
        source = open_source(X, self.device)
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            b = None if codes is None else torch.as_tensor(codes[part], dtype=torch.long, device=self.device)
            yield source.batch(part).counts, b

    def _draw_z(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ q(z|x) (for a GMVAE: y ~ q(y|x), then z ~ q(z|x,y))."""
        return self.module.sample_z(x, b)

    @torch.no_grad()
    def get_latent_representation(self, adata=None, indices=None, give_mean: bool = True,
                                  batch_size: int | None = None) -> np.ndarray:
        """Each cell's latent representation: the mean of q(z|x) (mixed over q(y|x) for a GMVAE), or one draw.

        Returns
        -------
        numpy array, cells x latent.
        """
        X = self._matrix(adata)
        rows = self._rows(X, indices)
        codes = self._batch_codes(adata)
        if give_mean:
            return latent_means(self.module, X, rows, self.device, batch_size, batch_codes=codes)
        self.module.eval()
        return np.concatenate([self._draw_z(x, b).cpu().numpy()
                               for x, b in self._minibatches(X, rows, batch_size, codes)]) \
            if len(rows) else np.zeros((0, self.model_config.latent), np.float32)

    def _gmvae(self) -> GMVAE:
        if not isinstance(self.module, GMVAE):
            raise ValueError("a VAE has no clusters: use model='gmvae', or k-means on get_latent_representation()")
        return self.module

    def get_cluster_probabilities(self, adata=None, indices=None, batch_size: int | None = None,
                                  posterior: str | None = None) -> np.ndarray:
        """A GMVAE's probability of each of the K components for each cell (cells x K).

        Parameters
        ----------
        posterior
            "elbo": the q*(y|x) that maximises the ELBO given the trained q(z|x,y) and generative model,
            softmax over y of log p(y) + ELBO given y; "encoder": the encoder's q(y|x); None (default): the
            model's ``cluster_posterior`` ("encoder" unless set; docs/clustering.md).
        """
        module = self._gmvae()
        X = self._matrix(adata)
        return cluster_probabilities(module, X, self._rows(X, indices), self.device, batch_size,
                                     batch_codes=self._batch_codes(adata), posterior=posterior)

    def predict_clusters(self, adata=None, indices=None, batch_size: int | None = None,
                         posterior: str | None = None) -> np.ndarray:
        """A GMVAE's cluster of each cell (integers 0..K-1): argmax of get_cluster_probabilities."""
        return self.get_cluster_probabilities(adata, indices, batch_size, posterior).argmax(1)

    @torch.no_grad()
    def get_normalized_expression(self, adata=None, indices=None, library_size: float | None = 1e4,
                                  n_samples: int = 1, layer: str | None = None, batch_size: int | None = None,
                                  transform_batch: str | list[str] | None = None) -> np.ndarray:
        """Decoded expected counts per cell and gene, on a common library size.

        Parameters
        ----------
        transform_batch
            For a model with a batch covariate: decode every cell as if measured in this batch (a name), or
            average the decoded means over several (a list of names; all of them: ``model.batches``). None
            decodes each cell in its own batch. The encoder always sees the cell's own batch.
        library_size
            Each cell's decoded means scaled to sum to this (default 10,000, as counts per 10k); None keeps the
            decoded means E[x | z] at the cell's own depth.
        n_samples
            1: decode the mean of q(z|x); more: average the decoded means of that many draws z ~ q(z|x).
        layer
            Also store the result in ``adata.layers[layer]`` (all cells only).

        Returns
        -------
        numpy array, cells x genes (float32).
        """
        X = self._matrix(adata)
        rows = self._rows(X, indices)
        codes = self._batch_codes(adata)
        targets = self._transform_codes(transform_batch)
        self.module.eval()
        out = np.empty((len(rows), X.shape[1]), np.float32)
        start = 0
        for x, b in self._minibatches(X, rows, batch_size, codes):
            decode_in = [b] if targets is None else [torch.full_like(b, t) for t in targets]
            means = 0.0
            for _ in range(n_samples):
                z = self.module.latent(x, b) if n_samples == 1 else self._draw_z(x, b)
                for target in decode_in:  # the same z decoded in each batch asked for
                    scaled = self._decoded_mean(z, x, target)
                    if library_size is not None and len(decode_in) > 1:  # each batch's profile on the common depth
                        scaled = scaled / scaled.sum(1, keepdim=True) * library_size
                    means = means + scaled
            means = means / (n_samples * len(decode_in))
            if library_size is not None:
                means = means / means.sum(1, keepdim=True) * library_size
            out[start:start + len(means)] = means.cpu().numpy()
            start += len(means)
        if layer is not None:
            if indices is not None:
                raise ValueError("layer= stores the expression of all cells: leave indices out")
            (self.adata if adata is None else adata).layers[layer] = out
        return out

    def _decoded_mean(self, z: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return D.mean(self.model_config.likelihood, self.module.decode(z, x, b)).double()

    @torch.no_grad()
    def posterior_predictive_sample(self, adata=None, indices=None, n_samples: int = 1,
                                    use_latent_mean: bool = False, batch_size: int | None = None) -> np.ndarray:
        """Counts drawn from p(x|z) with z ~ q(z|x) (or z = its mean when use_latent_mean).

        Returns
        -------
        numpy array (float32 whole numbers): cells x genes when n_samples is 1, else n_samples x cells x genes.
        """
        X = self._matrix(adata)
        rows = self._rows(X, indices)
        self.module.eval()
        out = np.empty((n_samples, len(rows), X.shape[1]), np.float32)
        start = 0
        for x, b in self._minibatches(X, rows, batch_size, self._batch_codes(adata)):
            for s in range(n_samples):
                z = self.module.latent(x, b) if use_latent_mean else self._draw_z(x, b)
                drawn = D.sample(self.model_config.likelihood, self.module.decode(z, x, b))
                out[s, start:start + len(drawn)] = drawn.cpu().numpy()
            start += x.shape[0]
        return out[0] if n_samples == 1 else out

    def get_elbo(self, adata=None, indices=None) -> float:
        """Mean ELBO per cell (a lower bound on log p(x); higher is better), e.g. on ``indices=model.test_indices``."""
        return self.evaluate(adata, indices, n_samples=0)["elbo"]

    def get_marginal_ll(self, adata=None, indices=None, n_samples: int = 100, seed: int = 0) -> float:
        """Importance-weighted estimate of log p(x) per cell with n_samples draws from q (higher is better)."""
        return self.evaluate(adata, indices, n_samples=n_samples, seed=seed)["iw_log_lik"]

    def evaluate(self, adata=None, indices=None, n_samples: int = IW_SAMPLES, seed: int = 0) -> dict[str, float]:
        """The mean ELBO and its terms per cell (``elbo``, ``log_lik``, ``kl_z``, ``kl_y``) and, with n_samples
        > 0, the importance-weighted log p(x) (``iw_log_lik``) in one pass; seeded."""
        X = self._matrix(adata)
        return evaluate_model(self.module, X, self._rows(X, indices), iw_samples=n_samples, seed=seed,
                              device=self.device, batch_codes=self._batch_codes(adata))

    # ---- save and load ------------------------------------------------------------------------------------

    def save(self, dir_path: str | Path, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Write the weights (model.pt), the settings and genes (settings.json) and history.tsv to dir_path."""
        folder = Path(dir_path)
        if (folder / WEIGHTS).exists() and not overwrite:
            raise FileExistsError(f"{folder / WEIGHTS} exists; pass overwrite=True to replace it")
        folder.mkdir(parents=True, exist_ok=True)
        settings = {"model_config": self.model_config.to_dict(),
                    "train_config": None if self.train_config is None else dataclasses.asdict(self.train_config),
                    "layer": self.layer, "labels_key": self.labels_key, "batch_key": self.batch_key,
                    "genes": self.genes.tolist(),
                    "is_trained": self.is_trained}
        torch_save({"format": CHECKPOINT_FORMAT, "model_config": self.model_config.to_dict(),
                    "model_state": {k: v.cpu() for k, v in self.module.state_dict().items()}},
                   folder / WEIGHTS)
        write_text(folder / SETTINGS, json.dumps(settings, indent=1) + "\n")
        write_text(folder / HISTORY, self.history.to_csv(sep="\t", index=False))
        if save_anndata:
            if self.adata is None:
                raise ValueError("this model holds no AnnData to save")
            write_h5ad(self.adata, folder / "adata.h5ad")

    @classmethod
    def load(cls, dir_path: str | Path, adata=None, device: str = "auto") -> SCVAE:
        """A model saved by `save`; with `adata`, its counts are checked and put in the model's gene order."""
        folder = Path(dir_path)
        try:
            settings = json.loads((folder / SETTINGS).read_text())
        except FileNotFoundError:
            raise TrainingError(f"{folder}: no {SETTINGS}; not a folder written by SCVAE.save") from None
        except json.JSONDecodeError as err:
            raise TrainingError(f"{folder / SETTINGS}: damaged ({err})") from None
        if adata is None and (folder / "adata.h5ad").exists():
            import anndata

            adata = anndata.read_h5ad(folder / "adata.h5ad")
        state = load_checkpoint(folder / WEIGHTS, "cpu")
        module = build_model(ModelConfig.from_dict(state["model_config"]))
        module.load_state_dict(state["model_state"])
        self = cls._of_module(module, resolve_device(device), settings["genes"])
        self.layer, self.labels_key = settings["layer"], settings["labels_key"]
        self.batch_key = settings.get("batch_key")
        tc = settings.get("train_config")
        self.train_config = None if tc is None else TrainConfig.from_dict(tc)
        self.history = pd.read_csv(folder / HISTORY, sep="\t") if (folder / HISTORY).stat().st_size > 1 \
            else pd.DataFrame()
        self.is_trained = bool(settings.get("is_trained", True))
        if adata is not None:
            self.cells = np.asarray(adata.obs_names, dtype=str)
            self._X = self._matrix(adata)
            self._codes = self._batch_codes(adata)
            self.adata = adata
            self.labels = user_data.labels(adata, self.labels_key) if self.labels_key in adata.obs else None
        return self

    @property
    def batches(self) -> list[str]:
        """The batch covariate's categories (empty for a model without one)."""
        return list(self.model_config.batches)

    def __repr__(self) -> str:
        c = self.model_config
        extra = f", K={c.components}" if c.model == "gmvae" else ""
        state = f"trained {len(self.history)} epochs" if self.is_trained else "not trained"
        return (f"SCVAE({c.model}-{c.likelihood}, {c.n_features} genes, latent {c.latent}{extra}; {state})")


@contextlib.contextmanager
def _run_folder(checkpoint_dir: str | Path | None) -> Iterator[Path]:
    """The run folder of a training: the one given, or a temporary one removed afterwards."""
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="scvae-") as tmp:
        yield Path(tmp)
