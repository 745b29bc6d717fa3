"""The `scvae-torch` command: prepare, simulate, train, evaluate. Thin: parse, call the library, report."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump); --help still shows everything."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(Exception):
    """A bad argument; reported as one line, exit status 2."""


def _int_list(text: str) -> list[int]:
    """Parse '100,250' into [100, 250]; '' gives []."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


# --- prepare (owned by the data task) -------------------------------------------------------------

def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="read a count matrix (10x HDF5, h5ad, Matrix Market) into the canonical h5ad",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> None:
    raise UsageError("prepare: not implemented yet")


# --- simulate (owned by the simulate task) --------------------------------------------------------

def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write a synthetic data set as a canonical h5ad",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> None:
    raise UsageError("simulate: not implemented yet")


# --- train / evaluate (owned by the core task) ----------------------------------------------------

def _add_train(sub: argparse._SubParsersAction) -> None:
    from .models import ModelConfig
    from .training import TrainConfig

    m, t = ModelConfig(n_features=1), TrainConfig()
    p = sub.add_parser("train", help="train a VAE / GMVAE, or resume the run in --out",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="canonical counts .h5ad (from `prepare` or `simulate`)")
    p.add_argument("--split", default=None, help="split.tsv (cell, subset); default: a seeded 81/9/10 split saved in --out")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, best.pt, history.tsv, metrics.json")
    p.add_argument("--model", default=m.model, help="vae or gmvae")
    p.add_argument("--likelihood", default=m.likelihood, help="poisson, nb, zip or zinb")
    p.add_argument("--encoder", type=_int_list, default=m.encoder, help="encoder hidden layer sizes, e.g. 100,250")
    p.add_argument("--decoder", type=_int_list, default=m.decoder, help="decoder hidden layer sizes, e.g. 250,100")
    p.add_argument("--latent", type=int, default=m.latent, help="latent dimension")
    p.add_argument("--components", type=int, default=m.components, help="mixture components K (GMVAE)")
    p.add_argument("--dispersion", default=m.dispersion, help="NB dispersion: gene (one per gene) or gene-cell (decoder output)")
    p.add_argument("--dropout", type=float, default=m.dropout, help="dropout rate on hidden layers")
    p.add_argument("--no-batch-norm", dest="batch_norm", action="store_false", help="turn off batch norm on hidden layers")
    p.add_argument("--log1p-input", action="store_true", help="feed log(1+x) to the encoders instead of raw counts")
    p.add_argument("--library-size", action="store_true", help="decoder mean = library size x softmax over genes")
    p.add_argument("--y-regularisation", default=m.y_regularisation, help="GMVAE y term: kl, none, or supervised (needs labels)")
    p.add_argument("--free-nats", type=float, default=m.free_nats, help="free nats for the KL terms")
    p.add_argument("--epochs", type=int, default=t.epochs, help="total epochs (a resumed run continues up to this)")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="cells per minibatch")
    p.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay, help="Adam weight decay")
    p.add_argument("--kl-warmup", type=int, default=t.kl_warmup, help="epochs of linear KL warm-up (0: none)")
    p.add_argument("--pretrain-epochs", type=int, default=t.pretrain_epochs,
                   help="GMVAE: epochs as a plain VAE before p(z|y) is initialised by k-means")
    p.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every, help="epochs between checkpoints")
    p.add_argument("--seed", type=int, default=t.seed, help="random seed (split, initialisation, minibatches)")
    p.add_argument("--device", default=t.device, help="auto (CUDA when available), cpu or cuda")
    p.set_defaults(func=_cmd_train)


def _model_train_configs(args: argparse.Namespace) -> tuple[dict, "object"]:
    """Split parsed train arguments into a model-config dict and a TrainConfig; bad values -> UsageError."""
    from .training import TrainConfig

    model = {k: getattr(args, k) for k in ("model", "likelihood", "encoder", "decoder", "latent", "components",
                                           "dispersion", "dropout", "batch_norm", "log1p_input", "library_size",
                                           "y_regularisation", "free_nats")}
    try:
        train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            weight_decay=args.weight_decay, kl_warmup=args.kl_warmup, seed=args.seed,
                            device=args.device, checkpoint_every=args.checkpoint_every,
                            pretrain_epochs=args.pretrain_epochs)
        from .models import ModelConfig

        ModelConfig(n_features=1, **model)  # validate before any data is read
    except ValueError as err:
        raise UsageError(str(err)) from None
    return model, train


def _cmd_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .training import train_dataset

    model, train = _model_train_configs(args)
    for path in (args.data, args.split):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{path}: no such file")
    metrics = train_dataset(args.data, args.out, model, train, split_path=args.split)
    print(f"trained {metrics['model']}-{metrics['likelihood']} for {metrics['epochs_trained']} epochs on "
          f"{metrics['device_name']}: best validation ELBO {metrics['best_val_elbo']:.4f} "
          f"(epoch {metrics['best_epoch']}); results in {args.out}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model on the test split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="DIR", help="run folder written by `train`")
    p.add_argument("--data", required=True, help="canonical counts .h5ad the model was trained on")
    p.add_argument("--split", default=None, help="split.tsv; default: the one saved in DIR")
    p.add_argument("--out", required=True, help="folder for metrics.json, latent.h5ad, feature_means.tsv")
    p.add_argument("--iw-samples", type=int, default=100, help="importance samples for log p(x)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the Monte-Carlo estimates")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .evaluation import evaluate_dataset

    if args.iw_samples < 0:
        raise UsageError(f"--iw-samples must be >= 0, got {args.iw_samples}")
    for path in (args.data, args.split):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{path}: no such file")
    if not Path(args.run).is_dir():
        raise UsageError(f"{args.run}: no such run folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = evaluate_dataset(args.run, args.data, str(out / "metrics.json"), str(out / "latent.h5ad"),
                         split_path=args.split, iw_samples=args.iw_samples, seed=args.seed,
                         feature_means_path=str(out / "feature_means.tsv"), device=args.device)
    iw = f", importance-weighted log p(x) {m['iw_log_lik']:.4f}" if "iw_log_lik" in m else ""
    print(f"test ELBO {m['elbo']:.4f} per cell{iw} on {m['n_cells']} cells; results in {out}")


# --- entry point ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand."""
    parser = OneLineParser(prog="scvae-torch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in (_add_prepare, _add_simulate, _add_train, _add_evaluate):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user mistakes give one line on stderr and a non-zero exit, never a traceback."""
    from .data import DataError
    from .training import TrainingError, TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, DataError, TrainingError) as err:
        print(f"scvae-torch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"scvae-torch {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"scvae-torch {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
