"""The one source of the package's choices and defaults: models, likelihoods, input formats, splits, and the
model and training settings. config/schema.yaml repeats them for the pipeline (tests/test_config.py checks that
they are equal); the CLI reads its defaults from here. No torch and no data libraries are imported here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

LIKELIHOODS: tuple[str, ...] = ("poisson", "nb", "zip", "zinb")
MODELS: tuple[str, ...] = ("vae", "gmvae")
DISPERSIONS: tuple[str, ...] = ("gene", "gene-cell", "gene-batch")
Y_REGULARISATIONS: tuple[str, ...] = ("kl", "none", "supervised")
PRIORS_Y: tuple[str, ...] = ("uniform", "learned")  # GMVAE mixture weights p(y)
CLUSTER_POSTERIORS: tuple[str, ...] = ("elbo", "encoder")  # GMVAE clusters: ELBO-optimal q*(y|x), or q(y|x)
PRIOR_Z_VARIANCES: tuple[str, ...] = ("component", "shared")  # GMVAE p(z|y): own diagonal variance, or one for all
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")
STREAMING: tuple[str, ...] = ("auto", "on", "off")
FORMATS: tuple[str, ...] = ("auto", "10x-h5", "h5ad", "mtx")  # input formats of `prepare` (auto: detected)
SIMULATIONS: tuple[str, ...] = ("poisson-check", "gmvae-mixture", "single-cell")  # scvae_torch.simulate's sets
SUBSETS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.81, 0.09, 0.10)  # of the cells in train, validation, test
STREAM_ABOVE_GB = 4.0  # in-memory size (GiB) of the counts above which `prepare` and training go block by block
LR_DROP_FACTOR = 0.1  # TrainConfig.lr_drops: each cut multiplies the learning rate by this
IW_SAMPLES = 100  # importance samples for the test log-likelihood
DECODE_SAMPLES = 20  # draws z ~ q(z|x) per cell averaged for the decoded feature means (evaluation)


def _refuse_failed(checks: list[tuple[bool, str]]) -> None:
    """Raise ValueError with the message of the first check that failed."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _from_dict(cls, values: dict, what: str):
    """Build a settings dataclass from a dict, refusing unknown keys with one line naming them."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} option(s): {', '.join(unknown)}")
    return cls(**values)


@dataclass
class ModelConfig:
    """Architecture and likelihood of one model; stored in every checkpoint."""

    n_features: int
    model: str = "vae"
    likelihood: str = "nb"
    encoder: list[int] = field(default_factory=lambda: [100, 250])
    decoder: list[int] = field(default_factory=lambda: [250, 100])
    latent: int = 50
    components: int = 10
    dispersion: str = "gene"
    dropout: float = 0.1  # better validation ELBO on the CellBench sets and simulation (docs/clustering.md)
    batch_norm: bool = True
    log1p_input: bool = True
    normalise_input: bool = False  # encoders see the counts per 10,000 (library size removed) instead of the counts
    library_size: bool = True  # decoded mean = observed library size x softmax (docs/clustering.md)
    y_regularisation: str = "kl"
    prior_y: str = "learned"  # GMVAE mixture weights p(y): learned, or uniform (scVAE's default)
    cluster_posterior: str = "encoder"  # GMVAE clusters from the encoder's q(y|x), or q*(y|x) (docs/clustering.md)
    prior_z_variance: str = "component"  # GMVAE p(z|y) = N(mu_y, diag var_y), or one var shared by every y
    free_nats: float = 0.0
    batches: list[str] = field(default_factory=list)  # batch covariate's categories (code = position); [] = none
    batch_encoder: bool = False  # the encoders see the batch too (the decoder always does when there is one)

    def __post_init__(self) -> None:
        self.encoder = [int(s) for s in self.encoder]
        self.decoder = [int(s) for s in self.decoder]
        self.batches = [str(b) for b in self.batches]
        checks = [
            (self.model in MODELS, f"unknown model {self.model!r} (choose from {', '.join(MODELS)})"),
            (self.likelihood in LIKELIHOODS,
             f"unknown likelihood {self.likelihood!r} (choose from {', '.join(LIKELIHOODS)})"),
            (self.dispersion in DISPERSIONS,
             f"unknown dispersion {self.dispersion!r} (choose from {', '.join(DISPERSIONS)})"),
            (self.y_regularisation in Y_REGULARISATIONS,
             f"unknown y_regularisation {self.y_regularisation!r} (choose from {', '.join(Y_REGULARISATIONS)})"),
            (self.prior_y in PRIORS_Y, f"unknown prior_y {self.prior_y!r} (choose from {', '.join(PRIORS_Y)})"),
            (self.cluster_posterior in CLUSTER_POSTERIORS, f"unknown cluster_posterior {self.cluster_posterior!r} "
                                                           f"(choose from {', '.join(CLUSTER_POSTERIORS)})"),
            (self.prior_z_variance in PRIOR_Z_VARIANCES, f"unknown prior_z_variance {self.prior_z_variance!r} "
                                                         f"(choose from {', '.join(PRIOR_Z_VARIANCES)})"),
            (self.n_features >= 1, f"n_features must be >= 1, got {self.n_features}"),
            (self.latent >= 1, f"latent size must be >= 1, got {self.latent}"),
            (all(s >= 1 for s in self.encoder + self.decoder), "hidden layer sizes must be >= 1"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.free_nats >= 0.0, f"free_nats must be >= 0, got {self.free_nats}"),
            (self.model != "gmvae" or self.components >= 1, f"components must be >= 1, got {self.components}"),
            (self.model != "gmvae" or len(self.encoder) >= 1, "a GMVAE needs at least one encoder layer"),
            (len(set(self.batches)) == len(self.batches), "batch categories must be distinct"),
            (self.dispersion != "gene-batch" or self.batches,
             "dispersion 'gene-batch' needs a batch covariate (batch_key / --batch)"),
        ]
        _refuse_failed(checks)

    @property
    def n_batches(self) -> int:
        """Number of categories of the batch covariate (0: the model has none)."""
        return len(self.batches)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Build from a dict, refusing unknown keys."""
        return _from_dict(cls, values, "model")

    def to_dict(self) -> dict:
        """Plain-Python form (safe for weights_only checkpoints and JSON)."""
        return asdict(self)


@dataclass
class TrainConfig:
    """Optimisation settings for one training run (defaults mirror config/schema.yaml)."""

    epochs: int | None = None   # None: chosen from the number of cells (default_epochs)
    batch_size: int | None = None  # None: chosen from the number of cells (default_batch_size)
    lr: float = 1e-3
    weight_decay: float = 0.0
    kl_warmup: int = 0          # epochs of linear KL warm-up (0 = none)
    seed: int = 0
    device: str = "auto"        # auto | cpu | cuda
    checkpoint_every: int = 10  # epochs
    pretrain_epochs: int | None = None  # GMVAE: epochs as a plain VAE before p(z|y) is set by k-means (None: auto)
    init_restarts: int = 1      # GMVAE: k-means initialisations of p(z|y) tried; the best validation ELBO is kept
    mixture_restarts: int = 1   # GMVAE: restarts of the trained mixture from k-means of its latent (docs/clustering.md)
    lr_drops: int = 1           # at early stopping, cut the learning rate (x LR_DROP_FACTOR) and train on, this often
    early_stopping: bool = True  # stop when the validation ELBO has not improved for `patience` epochs
    patience: int = 30          # epochs without a better validation ELBO before early stopping
    iw_samples: int = 0         # importance samples for the validation log-likelihood each epoch (0 = off)
    threads: int = 0            # CPU threads for torch (0 = torch's default)
    precision: str = "float32"  # float32 | bfloat16 (autocast for the MLPs; likelihood sums stay float32)
    compile: bool = False       # torch.compile the likelihood's dense x = 0 part (eager where unavailable)
    stream: str = "auto"        # on: read minibatches from the h5ad file; off: load it; auto: on above stream_above_gb
    stream_above_gb: float = STREAM_ABOVE_GB  # in-memory size (GiB) of the count matrix above which stream=auto streams

    def __post_init__(self) -> None:
        checks = [
            (self.epochs is None or self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.batch_size is None or self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.kl_warmup >= 0, f"KL warm-up must be >= 0, got {self.kl_warmup}"),
            (self.device in DEVICES, f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.pretrain_epochs is None or self.pretrain_epochs >= 0,
             f"pretrain_epochs must be >= 0, got {self.pretrain_epochs}"),
            (self.init_restarts >= 1, f"init_restarts must be >= 1, got {self.init_restarts}"),
            (self.mixture_restarts >= 0, f"mixture_restarts must be >= 0, got {self.mixture_restarts}"),
            (self.lr_drops >= 0, f"lr_drops must be >= 0, got {self.lr_drops}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.precision in PRECISIONS, f"precision must be float32 or bfloat16, got {self.precision!r}"),
            (self.stream in STREAMING, f"stream must be auto, on or off, got {self.stream!r}"),
            (self.stream_above_gb > 0, f"stream_above_gb must be > 0, got {self.stream_above_gb}"),
        ]
        _refuse_failed(checks)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict, refusing unknown keys."""
        return _from_dict(cls, values, "training")

    def resolved(self, n_cells: int, model: str) -> TrainConfig:
        """A copy with the data-dependent defaults filled in: epochs and minibatch size from the number of cells,
        pre-training."""
        epochs = default_epochs(n_cells) if self.epochs is None else self.epochs
        batch_size = default_batch_size(n_cells) if self.batch_size is None else self.batch_size
        pretrain = self.pretrain_epochs
        if pretrain is None:
            pretrain = default_pretrain_epochs(epochs) if model == "gmvae" else 0
        return replace(self, epochs=epochs, batch_size=batch_size, pretrain_epochs=pretrain)


# Epochs when none are given: 400 passes over 20,000 cells' worth of cells, at most 400 epochs (scvi-tools'
# rule); early stopping usually ends a run well before. Below 1,000 cells 400 epochs are too few minibatches to
# converge, so a small set gets 400,000 cells' worth (chosen with minibatches of 100; with the small-set minibatch
# of 16 early stopping ends runs far sooner), at most 2,000 epochs: measured in docs/defaults.md.
EPOCH_BUDGET_CELLS = 20_000 * 400
MAX_EPOCHS = 400
SMALL_SET_BUDGET_CELLS = 400_000
MAX_SMALL_SET_EPOCHS = 2_000


def default_epochs(n_cells: int) -> int:
    """Epochs for a data set of n_cells when none are given: 400 from 1,000 to 20,000 cells, fewer above, more
    below (400,000 / cells, at most 2,000)."""
    n = max(n_cells, 1)
    large = min(MAX_EPOCHS, max(1, round(EPOCH_BUDGET_CELLS / n)))
    return int(max(large, min(MAX_SMALL_SET_EPOCHS, -(-SMALL_SET_BUDGET_CELLS // n))))


# Cells per minibatch when none are given: 100 (scVAE's), 16 below 1,000 cells, where 100 makes an epoch 3 to 6
# minibatches; 16 gave the best validation ELBO of 100, 32 and 16 on both CellBench sets (docs/defaults.md).
BATCH_SIZE = 100
SMALL_SET_BATCH_SIZE = 16
SMALL_SET_CELLS = 1_000


def default_batch_size(n_cells: int) -> int:
    """Cells per minibatch for a data set of n_cells when none are given: 100, or 16 below 1,000 cells."""
    return SMALL_SET_BATCH_SIZE if n_cells < SMALL_SET_CELLS else BATCH_SIZE


PRETRAIN_EPOCHS = 20  # GMVAE pre-training when none is given (10 split the largest type: docs/clustering.md)


def default_pretrain_epochs(epochs: int) -> int:
    """GMVAE pre-training (as a VAE, then p(z|y) by k-means on its latent) when none is given."""
    return min(PRETRAIN_EPOCHS, epochs // 3)
