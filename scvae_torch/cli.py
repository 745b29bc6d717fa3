"""The `scvae-torch` command: prepare, simulate, train, evaluate. Thin: parse, call the library, report."""

from __future__ import annotations

import argparse
import sys

from .cli_args import (
    OneLineParser,
    StderrLog,
    UsageError,
    cell_filter,
    int_list,
    non_negative_int,
    one_of,
    open_fraction,
    positive_int,
    split_fractions,
)
from .config import (
    CLUSTER_POSTERIORS,
    DEFAULT_FRACTIONS,
    DEVICES,
    DISPERSIONS,
    FORMATS,
    IW_SAMPLES,
    LIKELIHOODS,
    MODELS,
    PRECISIONS,
    PRIOR_Z_VARIANCES,
    PRIORS_Y,
    SIMULATIONS,
    STREAM_ABOVE_GB,
    STREAMING,
    SUBSETS,
    Y_REGULARISATIONS,
)

# --- prepare --------------------------------------------------------------------------------------

_SPLIT_FRACTIONS = ",".join(f"{f:.2f}" for f in DEFAULT_FRACTIONS)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="read a count matrix (10x HDF5, h5ad, Matrix Market) into the canonical h5ad",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Read raw counts, validate them, and write the canonical AnnData file "
                                   "(X = CSR float32 counts, obs['label'] when labels exist), optionally with a "
                                   "summary JSON and a seeded train/validation/test split. Nothing is written "
                                   "when the input is bad.")
    p.add_argument("input", metavar="INPUT",
                   help="10x Cell Ranger .h5 (v2 or v3), AnnData .h5ad, 10x MEX folder (matrix.mtx[.gz], "
                        "features.tsv[.gz]/genes.tsv[.gz], barcodes.tsv[.gz]) or NAME.counts.mtx[.gz] with "
                        "NAME.genes.tsv[.gz] and NAME.cells.tsv[.gz] next to it")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="input format; auto: a folder or .mtx[.gz] is mtx, .h5ad (or HDF5 with obs/var) is h5ad, "
                        "other HDF5 is 10x-h5")
    p.add_argument("--genome", default=None,
                   help="10x-h5: genome to read (v2: the genome group, required when there are several; "
                        "v3: keep features of this genome)")
    p.add_argument("--layer", default=None, help="h5ad: read counts from this layer instead of X")
    p.add_argument("--use-raw", action="store_true", help="h5ad: read counts from raw.X (with raw.var names)")
    p.add_argument("--labels", metavar="COLUMN", default=None,
                   help="cell labels: an obs column (h5ad) or a column of NAME.cells.tsv (mtx), e.g. cell_type; "
                        "stored as obs['label']")
    p.add_argument("--batch", metavar="COLUMN", default=None,
                   help="each cell's batch (donor, plate, platform ...): an obs column (h5ad) or a column of "
                        "NAME.cells.tsv (mtx); stored as obs['batch'] for `train --batch`; a cell without one is "
                        "an error")
    p.add_argument("--keep", type=cell_filter, action="append", default=None, metavar="COLUMN=VALUE[,VALUE]",
                   help="keep only the cells whose COLUMN (h5ad obs, or NAME.cells.tsv) is one of the values, e.g. "
                        "demuxlet_cls=SNG for singlets; repeat for more columns (a cell must pass all)")
    p.add_argument("--round", dest="round_counts", action="store_true",
                   help="round non-integer values to the nearest integer (logged as a warning) instead of failing")
    p.add_argument("--min-counts-cell", type=non_negative_int, default=0, metavar="N",
                   help="drop cells with fewer than N counts in total (0 keeps all)")
    p.add_argument("--min-counts-gene", type=non_negative_int, default=0, metavar="N",
                   help="then drop genes with fewer than N counts in total over the kept cells (0 keeps all)")
    p.add_argument("--top-genes", type=positive_int, default=None, metavar="N",
                   help="then keep the N genes of highest binomial deviance (Townes et al. 2019), in their order; "
                        "recorded in uns['scvae_prepare'] and var['binomial_deviance'] (default: keep all)")
    p.add_argument("--stream", choices=STREAMING, default="auto",
                   help="10x HDF5: convert block by block of cells, in memory that does not grow with the number "
                        "of cells (two passes over the file); auto: when the matrix would take more than "
                        "--stream-above-gb in memory")
    p.add_argument("--stream-above-gb", type=float, default=STREAM_ABOVE_GB, metavar="G",
                   help="size above which --stream auto converts block by block")
    p.add_argument("--out", required=True, metavar="COUNTS.h5ad", help="canonical AnnData file to write")
    p.add_argument("--summary", default=None, metavar="SUMMARY.json",
                   help="also write cells, genes, non-zeros, sparsity %%, labels and cells per label as JSON")
    p.add_argument("--split", default=None, metavar="SPLIT.tsv",
                   help="also write a seeded train/validation/test split (columns cell, subset)")
    p.add_argument("--split-seed", type=int, default=0, metavar="S", help="seed of the split")
    p.add_argument("--split-fractions", type=split_fractions, default=_SPLIT_FRACTIONS, metavar="TRAIN,VAL,TEST",
                   help="fractions of cells in train, validation and test")
    p.add_argument("--stratify", action="store_true",
                   help="split each label separately, so every subset keeps the label proportions (needs --labels)")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from .data import make_split, prepare_input, write_prepared, write_split, write_summary

    if args.stratify and args.labels is None:
        raise UsageError("--stratify needs --labels")
    if args.stratify and args.split is None:
        raise UsageError("--stratify only applies with --split")
    with StderrLog("prepare"):
        counts = prepare_input(args.input, args.format, stream=args.stream, stream_above_gb=args.stream_above_gb,
                               genome=args.genome, layer=args.layer, use_raw=args.use_raw, labels=args.labels,
                               round_counts=args.round_counts, min_counts_cell=args.min_counts_cell,
                               min_counts_gene=args.min_counts_gene, top_genes=args.top_genes, batch=args.batch,
                               keep=dict(args.keep) if args.keep else None)
        split = (make_split(counts.cells, getattr(counts, "labels", None), args.split_fractions, seed=args.split_seed,
                            stratify=args.stratify) if args.split else None)
        if split is not None:
            _check_split(split, args.split_fractions, args.split, args.stratify)
        # every value is checked before the first write, so bad input leaves no output behind
        summary = write_prepared(counts, args.out)
        if args.summary:
            write_summary(summary, args.summary)
        if split is not None:
            write_split(split, args.split)
    labels = f", {summary['labels']} labels" if summary["labels"] else ""
    print(f"scvae-torch prepare: wrote {args.out}: {summary['cells']} cells x {summary['genes']} genes, "
          f"{summary['sparsity_percent']:.2f}% zeros{labels}", file=sys.stderr)


def _check_split(split, fractions: tuple[float, float, float], path: str, stratified: bool) -> None:
    """Refuse a stratified split whose asked-for subset came out empty (labels too small to give it a cell);
    warn, naming what it means later, about an empty validation or test subset."""
    import logging

    from .provenance import check_split_sizes

    sizes = {name: int((split.to_numpy() == name).sum()) for name in SUBSETS}
    if stratified:
        check_split_sizes(sizes, fractions, path)
    log = logging.getLogger("scvae_torch.prepare")
    if sizes["validation"] == 0:
        log.warning("%s: no validation cells: training will choose best.pt on the training ELBO", path)
    if sizes["test"] == 0:
        log.warning("%s: no test cells: `scvae-torch evaluate` will refuse this split", path)


# --- download -------------------------------------------------------------------------------------

def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch a registered data set or an http(s) URL, with checksum and retries",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Download to OUT.part, verify the checksum (given, registered, or recorded in "
                                   "OUT.sha256 by an earlier download), then rename to OUT. Without any known "
                                   "checksum the sha256 is recorded in OUT.sha256 for later runs.")
    p.add_argument("source", nargs="?", metavar="NAME|URL", help="a registered data set name (see --list) or a URL")
    p.add_argument("--out", metavar="FILE", help="where to write the file")
    p.add_argument("--sha256", default=None, help="expected sha256 (hex)")
    p.add_argument("--md5", default=None, help="expected md5 (hex)")
    p.add_argument("--retries", type=non_negative_int, default=3,
                   help="retries after a server error or dropped connection")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server on each read")
    p.add_argument("--list", action="store_true", help="list the registered data sets and exit")
    p.set_defaults(func=_cmd_download)


def _cmd_download(args: argparse.Namespace) -> None:
    from .data import DataError
    from .download import REGISTRY, DownloadError, fetch, fetch_dataset

    if args.list:
        for name, entry in sorted(REGISTRY.items()):
            print(f"{name}\t{entry.format}\t{entry.url}\t{entry.description}")
        return
    if not args.source or not args.out:
        raise UsageError("give NAME|URL and --out FILE (or --list)")
    options = dict(sha256=args.sha256, md5=args.md5, retries=args.retries, timeout=args.timeout)
    with StderrLog("download"):
        try:
            if "://" in args.source:
                digest = fetch(args.source, args.out, **options)
            else:
                digest = fetch_dataset(args.source, args.out, **options)
        except DownloadError as err:
            raise DataError(str(err)) from None
    print(f"scvae-torch download: {args.out} sha256 {digest}", file=sys.stderr)


# --- simulate -------------------------------------------------------------------------------------

# mirrors the defaults of scvae_torch.simulate (tests/test_simulate.py checks they agree), so --help stays fast
_SIM_DEFAULTS = {"poisson-check": {"cells": 2000, "genes": 10},
                 "gmvae-mixture": {"cells": 10000, "genes": 10, "types": 5},
                 "single-cell": {"cells": 5000, "genes": 2000, "types": 6, "sparsity": 0.9, "batches": 1,
                                 "hard": False}}


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write a synthetic data set as a canonical h5ad",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Write a seeded synthetic count matrix as the canonical AnnData file and its true "
                                   "parameters as OUT.truth.json. poisson-check: feature j ~ Poisson(j+1), no "
                                   "labels (the review's check data). gmvae-mixture: a Poisson mixture, labels from "
                                   "k-means (k = --types) as in the review. single-cell: negative binomial counts "
                                   "with cell types, marker genes, heavy-tailed gene means and library sizes; "
                                   "labels type0, type1, ...")
    d = _SIM_DEFAULTS
    p.add_argument("kind", metavar="KIND", choices=SIMULATIONS, help="one of " + ", ".join(SIMULATIONS))
    p.add_argument("--out", required=True, metavar="COUNTS.h5ad", default=argparse.SUPPRESS,
                   help="canonical AnnData file to write")
    p.add_argument("--cells", type=positive_int, metavar="N", default=argparse.SUPPRESS,
                   help="number of cells (default: " + ", ".join(f"{d[k]['cells']} {k}" for k in SIMULATIONS) + ")")
    p.add_argument("--genes", type=positive_int, metavar="G", default=argparse.SUPPRESS,
                   help="number of genes (features) (default: " +
                        ", ".join(f"{d[k]['genes']} {k}" for k in SIMULATIONS) + ")")
    p.add_argument("--types", type=positive_int, metavar="K", default=argparse.SUPPRESS,
                   help=f"gmvae-mixture: mixture components and k-means clusters (default: "
                        f"{d['gmvae-mixture']['types']}); single-cell: cell types (default: "
                        f"{d['single-cell']['types']}); not used by poisson-check")
    p.add_argument("--sparsity", type=open_fraction, metavar="S", default=argparse.SUPPRESS,
                   help=f"single-cell only: expected fraction of zero counts (default: {d['single-cell']['sparsity']})")
    p.add_argument("--batches", type=positive_int, metavar="B", default=argparse.SUPPRESS,
                   help="single-cell only: batches with a known per-gene batch effect, in obs['batch'] (batch0 is "
                        f"the batch-free reference; default: {d['single-cell']['batches']}, none)")
    p.add_argument("--hard", action="store_true", default=argparse.SUPPRESS,
                   help="single-cell only: unequal type sizes (Zipf), library sizes spread twice as wide and a "
                        "continuous cell state unrelated to type (the clustering study's set)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed; the same seed gives the same file")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> None:
    import json
    import os

    import numpy as np

    from . import simulate
    from .data import Counts, write_canonical
    from .io.atomic import write_text

    given = {k: getattr(args, k) for k in ("cells", "genes", "types", "sparsity", "batches", "hard")
             if hasattr(args, k)}
    unused = sorted(set(given) - set(_SIM_DEFAULTS[args.kind]))
    if unused:
        raise UsageError(f"{args.kind} does not use " + ", ".join(f"--{k}" for k in unused))
    options = {**_SIM_DEFAULTS[args.kind], **given}
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {args.out}: folder {folder} does not exist")
    try:
        if args.kind == "poisson-check":
            sim = simulate.poisson_check(options["cells"], options["genes"], seed=args.seed)
        elif args.kind == "gmvae-mixture":
            sim = simulate.gmvae_mixture(options["cells"], options["genes"], options["types"], seed=args.seed)
        else:
            sim = simulate.single_cell(options["cells"], options["genes"], options["types"], seed=args.seed,
                                       sparsity=options["sparsity"], batches=options["batches"],
                                       hard=options["hard"])
    except ValueError as err:  # the generators' checks on sizes that do not fit together
        raise UsageError(str(err)) from None
    n_cells, n_genes = sim.X.shape
    cells = np.array([f"cell{i}" for i in range(n_cells)])
    genes = np.array([f"gene{j}" for j in range(n_genes)])
    # truth first: a finished counts file always has its truth next to it
    truth_path = args.out + ".truth.json"
    try:
        write_text(truth_path, json.dumps({"kind": args.kind, "seed": args.seed, **options, "truth": sim.truth_json()}))
        write_canonical(Counts(sim.X, genes, cells, sim.labels, batch=sim.batch), args.out)
    except OSError as err:
        raise UsageError(f"cannot write {err.filename or args.out}: {err.strerror or err}") from None
    zeros = 100.0 * (1.0 - sim.X.nnz / (n_cells * n_genes))
    print(f"scvae-torch simulate: wrote {args.out}: {n_cells} cells x {n_genes} genes, {zeros:.2f}% zeros; "
          f"true parameters in {truth_path}", file=sys.stderr)


# --- train / evaluate -----------------------------------------------------------------------------

def _add_train(sub: argparse._SubParsersAction) -> None:
    from .config import ModelConfig, TrainConfig

    m, t = ModelConfig(n_features=1), TrainConfig()
    p = sub.add_parser("train", help="train a VAE / GMVAE, or resume the run in --out",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="canonical counts .h5ad (from `prepare` or `simulate`)")
    p.add_argument("--split", default=None,
                   help="split.tsv (cell, subset); default: a seeded 81/9/10 split saved in --out")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, best.pt, history.tsv, metrics.json")
    p.add_argument("--model", default=m.model, help=one_of(MODELS))
    p.add_argument("--likelihood", default=m.likelihood, help=one_of(LIKELIHOODS))
    p.add_argument("--encoder", type=int_list, default=m.encoder, help="encoder hidden layer sizes, e.g. 100,250")
    p.add_argument("--decoder", type=int_list, default=m.decoder, help="decoder hidden layer sizes, e.g. 250,100")
    p.add_argument("--latent", type=int, default=m.latent, help="latent dimension")
    p.add_argument("--components", type=int, default=m.components, help="mixture components K (GMVAE)")
    p.add_argument("--dispersion", default=m.dispersion,
                   help=f"NB dispersion: {one_of(DISPERSIONS)} (one per gene, a decoder output per cell, or one "
                        "per gene and batch, which needs --batch)")
    p.add_argument("--batch", action="store_true",
                   help="condition the model on the batch in the file's obs['batch'] (batch correction; "
                        "`prepare --batch COLUMN` writes it)")
    p.add_argument("--batch-encoder", action="store_true", default=m.batch_encoder,
                   help="with --batch: the encoders see the batch too (the decoder always does)")
    p.add_argument("--dropout", type=float, default=m.dropout, help="dropout rate on hidden layers")
    p.add_argument("--no-batch-norm", dest="batch_norm", action="store_false",
                   help="turn off batch norm on hidden layers")
    p.add_argument("--raw-input", dest="log1p_input", action="store_false", default=m.log1p_input,
                   help="feed the raw counts to the encoders instead of log(1+x)")
    p.add_argument("--log1p-input", dest="log1p_input", action="store_true",
                   help="feed log(1+x) to the encoders (the default)")
    p.add_argument("--normalise-input", action="store_true", default=m.normalise_input,
                   help="the encoders see the counts per 10,000 (library size removed); measured worse for the "
                        "GMVAE's clusters (docs/clustering.md)")
    p.add_argument("--library-size", dest="library_size", action="store_true", default=m.library_size,
                   help="decoder mean = the cell's observed library size x softmax over genes (scVI's scaling)")
    p.add_argument("--no-library-size", dest="library_size", action="store_false",
                   help="decoder mean free (the latent carries the library size; the paper's model)")
    p.add_argument("--y-regularisation", default=m.y_regularisation,
                   help=f"GMVAE y term: {one_of(Y_REGULARISATIONS)} (supervised needs labels)")
    p.add_argument("--prior-y", default=m.prior_y,
                   help=f"GMVAE mixture weights p(y): {one_of(PRIORS_Y)}")
    p.add_argument("--cluster-posterior", default=m.cluster_posterior,
                   help=f"GMVAE clusters: {one_of(CLUSTER_POSTERIORS)} (encoder: its q(y|x), scVAE's; elbo: the "
                        "q*(y|x) that maximises the ELBO given the trained model)")
    p.add_argument("--prior-z-variance", default=m.prior_z_variance,
                   help=f"GMVAE p(z|y): {one_of(PRIOR_Z_VARIANCES)} (component: each its own diagonal variance, "
                        "scVAE's; shared: one for every component)")
    p.add_argument("--free-nats", type=float, default=m.free_nats, help="free nats for the KL terms")
    p.add_argument("--epochs", type=int, default=t.epochs,
                   help="most epochs (a resumed run continues up to this); default: from the number of cells, "
                        "400 from 1,000 to 20,000 cells, fewer above, 400,000 / cells below (at most 2,000)")
    p.add_argument("--no-early-stopping", dest="early_stopping", action="store_false",
                   help="train all epochs instead of stopping when the validation ELBO stops improving")
    p.add_argument("--patience", type=int, default=t.patience,
                   help="early stopping: epochs without a better validation ELBO before training stops")
    p.add_argument("--batch-size", type=int, default=t.batch_size,
                   help="cells per minibatch; default: 100, or 16 below 1,000 cells")
    p.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay, help="Adam weight decay")
    p.add_argument("--kl-warmup", type=int, default=t.kl_warmup, help="epochs of linear KL warm-up (0: none)")
    p.add_argument("--pretrain-epochs", type=int, default=t.pretrain_epochs,
                   help="GMVAE: epochs as a plain VAE before p(z|y) is initialised by k-means; default: "
                        "min(20, epochs / 3)")
    p.add_argument("--init-restarts", type=int, default=t.init_restarts,
                   help="GMVAE: k-means initialisations of p(z|y) after pre-training; the best validation ELBO is kept")
    p.add_argument("--mixture-restarts", type=int, default=t.mixture_restarts,
                   help="GMVAE: at early stopping, restart the mixture from k-means of its latent where they disagree "
                        "(kept only by a better validation ELBO); 0: never")
    p.add_argument("--lr-drops", type=int, default=t.lr_drops,
                   help="at early stopping, cut the learning rate tenfold and train on from the best weights, "
                        "this many times; 0: stop at once")
    p.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every, help="epochs between checkpoints")
    p.add_argument("--seed", type=int, default=t.seed, help="random seed (split, initialisation, minibatches)")
    p.add_argument("--device", default=t.device, help=f"{one_of(DEVICES)} (auto: CUDA when available)")
    p.add_argument("--threads", type=int, default=t.threads, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--precision", default=t.precision,
                   help=f"{one_of(PRECISIONS)}: bfloat16 autocasts the MLPs (likelihood sums stay float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the likelihood's dense x = 0 part (eager where unavailable)")
    p.add_argument("--stream", default=t.stream,
                   help="on: read minibatches from the h5ad file (out-of-core); off: load it; auto: on above "
                        "--stream-above-gb")
    p.add_argument("--stream-above-gb", type=float, default=t.stream_above_gb,
                   help="in-memory size of the counts (GiB) above which --stream auto streams")
    p.set_defaults(func=_cmd_train)


def _model_train_configs(args: argparse.Namespace) -> tuple[dict, object]:
    """Split parsed train arguments into a model-config dict and a TrainConfig; bad values -> UsageError."""
    from .config import ModelConfig, TrainConfig

    model = {k: getattr(args, k) for k in ("model", "likelihood", "encoder", "decoder", "latent", "components",
                                           "dispersion", "dropout", "batch_norm", "log1p_input", "normalise_input",
                                           "library_size",
                                           "y_regularisation", "prior_y", "cluster_posterior", "prior_z_variance",
                                           "free_nats",
                                           "batch_encoder")}
    if args.batch_encoder and not args.batch:
        raise UsageError("--batch-encoder needs --batch")
    if args.dispersion == "gene-batch" and not args.batch:
        raise UsageError("--dispersion gene-batch needs --batch")
    try:
        train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            weight_decay=args.weight_decay, kl_warmup=args.kl_warmup, seed=args.seed,
                            device=args.device, checkpoint_every=args.checkpoint_every,
                            pretrain_epochs=args.pretrain_epochs, init_restarts=args.init_restarts,
                            mixture_restarts=args.mixture_restarts, lr_drops=args.lr_drops,
                            early_stopping=args.early_stopping,
                            patience=args.patience, threads=args.threads, precision=args.precision,
                            compile=args.compile, stream=args.stream, stream_above_gb=args.stream_above_gb)
        cfg = ModelConfig(n_features=1, **model, batches=["a"] if args.batch else [])  # checked before reading
    except ValueError as err:
        raise UsageError(str(err)) from None
    from .provenance import inapplicable_options

    ignored = inapplicable_options(cfg, train)  # given on the command line, so said and refused, not ignored
    if ignored:
        raise UsageError(f"not used by a {cfg.model}-{cfg.likelihood} model: {'; '.join(ignored)}; leave them out")
    return model, train


def _cmd_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .runs import train_dataset

    model, train = _model_train_configs(args)
    for path in (args.data, args.split):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{path}: no such file")
    # One line per epoch on stderr where no progress bar is drawn (sbatch, nohup, a redirect), else the bar;
    # warnings (no validation cells, a gene order put right) as one line each either way.
    with StderrLog("train", level=30 if sys.stderr.isatty() else 20):
        metrics = train_dataset(args.data, args.out, model, train, split_path=args.split, batch=args.batch)
    chosen = "training" if metrics.get("best_chosen_on") == "train" else "validation"
    print(f"trained {metrics['model']}-{metrics['likelihood']} for {metrics['epochs_trained']} epochs on "
          f"{metrics['device_name']}: best {chosen} ELBO {metrics['best_val_elbo']:.4f} "
          f"(epoch {metrics['best_epoch']}); results in {args.out}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model on the test split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="DIR", help="run folder written by `train`")
    p.add_argument("--data", required=True, help="canonical counts .h5ad the model was trained on")
    p.add_argument("--split", default=None, help="split.tsv; default: the one saved in DIR")
    p.add_argument("--out", required=True, help="folder for metrics.json, latent.h5ad, feature_means.tsv")
    p.add_argument("--iw-samples", type=int, default=IW_SAMPLES, help="importance samples for log p(x)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the Monte-Carlo estimates")
    p.add_argument("--device", default="auto", help=one_of(DEVICES))
    from .config import TrainConfig

    t = TrainConfig()
    p.add_argument("--stream", default=t.stream, choices=STREAMING,
                   help="read the counts from the file minibatch by minibatch (on), hold them in memory (off), or "
                        "stream above --stream-above-gb (auto), as `train` does")
    p.add_argument("--stream-above-gb", type=float, default=t.stream_above_gb,
                   help="in-memory size of the counts (GiB) above which --stream auto streams")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .runs import evaluate_dataset

    if args.iw_samples < 0:
        raise UsageError(f"--iw-samples must be >= 0, got {args.iw_samples}")
    for path in (args.data, args.split):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{path}: no such file")
    if not Path(args.run).is_dir():
        raise UsageError(f"{args.run}: no such run folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with StderrLog("evaluate", level=30):
        m = evaluate_dataset(args.run, args.data, str(out / "metrics.json"), str(out / "latent.h5ad"),
                             split_path=args.split, iw_samples=args.iw_samples, seed=args.seed,
                             feature_means_path=str(out / "feature_means.tsv"), device=args.device,
                             stream=args.stream, stream_above_gb=args.stream_above_gb)
    iw = f", importance-weighted log p(x) {m['iw_log_lik']:.4f}" if "iw_log_lik" in m else ""
    print(f"test ELBO {m['elbo']:.4f} per cell{iw} on {m['n_cells']} cells; results in {out}")


# --- entry point ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand."""
    parser = OneLineParser(prog="scvae-torch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in (_add_prepare, _add_download, _add_simulate, _add_train, _add_evaluate):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user mistakes give one line on stderr and a non-zero exit, never a traceback."""
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, DataError) as err:
        print(f"scvae-torch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # full disk, read-only or vanished folder: one line, outputs are written atomically
        where = f"{err.filename}: " if err.filename else ""
        print(f"scvae-torch {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except Exception as err:
        training = sys.modules.get("scvae_torch.training")  # imported (with torch) only by train/evaluate
        if training is not None and isinstance(err, training.TrainingInterrupted):
            print(f"scvae-torch {args.command}: {err}", file=sys.stderr)
            return 128 + err.signum
        if training is not None and isinstance(err, training.TrainingError):
            print(f"scvae-torch {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"scvae-torch {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
