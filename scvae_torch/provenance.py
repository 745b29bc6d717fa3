"""What a run was trained on, and the checks that keep it from being silently mixed or mislabelled.

A run folder records, beside its checkpoint, the gene names in the model's column order and a fingerprint of
the train/validation/test split it trained on (`run.json`). Resuming a run, evaluating it, and loading it on
new data compare against that record:

- genes: the same names in another order are reordered by name (logged); missing or extra genes are a
  DataError naming a few of each;
- split: resuming needs exactly the recorded split; evaluating with another split is refused when any of its
  test cells were training or validation cells of the run;
- settings: a resumed run's TrainConfig must equal the checkpoint's in every field except RESUMABLE_SETTINGS
  (so a field added later is compared by default);
- degenerate plans (minibatches batch norm cannot use, no validation cells, pre-training not shorter than
  training, options that do not apply to the chosen model or likelihood) and runs that cannot be evaluated
  (locked, never checkpointed, never trained) are refused or warned about in one line.

Nothing here imports torch; errors are DataError (the data do not fit the run) or TrainingError (the run or its
settings), each one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from .config import ModelConfig, TrainConfig
from .data import SUBSETS, DataError
from .io.atomic import copy_file, write_text

log = logging.getLogger("scvae_torch.provenance")

RECORD = "run.json"
RECORD_FORMAT = 1
# TrainConfig fields that may differ between a checkpoint and the run that resumes it: how long and where it
# trains, how often it saves, and how the counts reach the model - none changes what an epoch computes.
# Every other field (including ones added later) must be equal, or resuming is refused naming it.
RESUMABLE_SETTINGS = frozenset({"epochs", "device", "checkpoint_every", "compile", "stream", "stream_above_gb",
                                "threads"})


def _training_error(message: str) -> Exception:
    from .training import TrainingError  # training imports this module: imported when first needed

    return TrainingError(message)


def _examples(values, n: int = 3) -> str:
    values = [str(v) for v in values]
    return ", ".join(repr(v) for v in values[:n]) + (", ..." if len(values) > n else "")


# ---- the record ------------------------------------------------------------------------------------

def split_fingerprint(cells: np.ndarray, subsets: dict[str, np.ndarray]) -> dict:
    """sha256 of the (cell id, subset) pairs sorted by cell id, and the size of each subset.

    Independent of the order of the cells in the data file or the split file.
    """
    cells = np.asarray(cells, dtype=str)
    names = np.empty(len(cells), dtype=object)
    for name in SUBSETS:
        names[subsets[name]] = name
    assigned = np.flatnonzero(names != None)  # noqa: E711 - elementwise
    order = assigned[np.argsort(cells[assigned], kind="stable")]
    digest = hashlib.sha256()
    for start in range(0, len(order), 65536):
        part = order[start:start + 65536]
        digest.update("".join(f"{c}\t{s}\n" for c, s in zip(cells[part], names[part])).encode())
    return {"sha256": digest.hexdigest(), **{name: int(len(subsets[name])) for name in SUBSETS}}


def read_record(run_dir: str | os.PathLike) -> dict | None:
    """The run's record (genes, split fingerprint), or None for a run written before runs kept one."""
    path = Path(run_dir) / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise _training_error(f"{path}: not a readable run record ({err}); it is written at the start of "
                              "training") from None
    if not isinstance(record, dict) or not {"genes", "split"} <= set(record):
        raise _training_error(f"{path}: not a run record (no genes or split)")
    return record


def write_record(run_dir: str | os.PathLike, genes: np.ndarray, cells: np.ndarray,
                 subsets: dict[str, np.ndarray], data_path: str | None = None) -> None:
    """Record the genes (in the model's column order) and the split fingerprint in run_dir/run.json, atomically."""
    record = {"format": RECORD_FORMAT, "genes": [str(g) for g in genes],
              "split": split_fingerprint(cells, subsets), "data": str(data_path) if data_path else None}
    write_text(Path(run_dir) / RECORD, json.dumps(record) + "\n")


# ---- genes -----------------------------------------------------------------------------------------

def run_description(run_dir: str | os.PathLike) -> str:
    """How messages name the model of a run folder: by its folder and the record of its genes."""
    return f"the run in {run_dir} ({Path(run_dir) / RECORD})"


def check_genes(recorded: list[str], genes: np.ndarray, data_name: str, model: str) -> np.ndarray | None:
    """The columns of the data in the model's gene order, or None when the data already have that order.

    Raises DataError (one line) when genes are missing or extra, or the data's names are not unique.
    model: how the message names the model (e.g. run_description(run_dir), or "this SCVAE model").
    """
    genes = np.asarray(genes, dtype=str)
    recorded = np.asarray(recorded, dtype=str)
    if len(genes) == len(recorded) and np.array_equal(genes, recorded):
        return None
    import pandas as pd

    index = pd.Index(genes)
    if not index.is_unique:
        raise DataError(f"{data_name}: {int(index.duplicated().sum())} duplicate gene names (e.g. "
                        f"{_examples(genes[index.duplicated()])}); the run's genes cannot be matched by name")
    position = index.get_indexer(recorded)
    missing = recorded[position < 0]
    extra = genes[~np.isin(genes, recorded)]
    if len(missing) or len(extra):
        parts = []
        if len(missing):
            parts.append(f"{len(missing)} of the model's {len(recorded)} genes are missing (e.g. {_examples(missing)})")
        if len(extra):
            parts.append(f"{len(extra)} genes are not in the model (e.g. {_examples(extra)})")
        raise DataError(f"{data_name}: {' and '.join(parts)}; {model} was trained on other genes: use the data it "
                        "was trained on, or train a new model")
    log.warning("%s: the same %d genes as the run's in another order; reordered by name", data_name, len(genes))
    return position.astype(np.int64)


def align_genes(run_dir: str | os.PathLike, genes: np.ndarray, data_name: str) -> np.ndarray | None:
    """check_genes against run_dir's record (None, with a log line, for a run without one)."""
    record = read_record(run_dir)
    if record is None:
        log.warning("%s has no %s (a run from an older version): the genes cannot be checked", run_dir, RECORD)
        return None
    return check_genes(record["genes"], genes, data_name, run_description(run_dir))


# ---- the split -------------------------------------------------------------------------------------

def check_resume_split(record: dict, cells: np.ndarray, subsets: dict[str, np.ndarray], split_name: str,
                       run_dir: str | os.PathLike) -> None:
    """A resumed run must train on exactly the split it started with (DataError otherwise)."""
    now = split_fingerprint(cells, subsets)
    then = record["split"]
    if now["sha256"] != then["sha256"]:
        sizes = lambda s: "/".join(str(s[n]) for n in SUBSETS)  # noqa: E731
        raise DataError(f"{split_name}: not the split the run in {run_dir} started with (train/validation/test "
                        f"{sizes(now)} cells now, {sizes(then)} then, or other cells in them); resume with the run's "
                        f"own split (leave out --split) or train in a new --out folder")


def check_evaluation_split(run_dir: str | os.PathLike, cells: np.ndarray, subsets: dict[str, np.ndarray],
                           split_name: str) -> None:
    """Refuse an evaluation split with no test cells, or whose test cells the run trained or validated on.

    The run's own split (run_dir/split.tsv) must still be the one its record names.
    """

    if len(subsets["test"]) == 0:
        raise DataError(f"{split_name}: no test cells (train/validation/test "
                        f"{'/'.join(str(len(subsets[n])) for n in SUBSETS)}); there is nothing to evaluate on")
    record = read_record(run_dir)
    if record is None:
        log.warning("%s has no %s (a run from an older version): the split cannot be checked", run_dir, RECORD)
        return
    now = split_fingerprint(cells, subsets)
    if now["sha256"] == record["split"]["sha256"]:
        return
    own = Path(run_dir) / "split.tsv"
    if not own.is_file():
        raise DataError(f"{split_name}: not the split the run trained on, and {own} is missing, so its test cells "
                        "cannot be checked")
    if Path(split_name).resolve() == own.resolve():
        raise DataError(f"{own}: changed since the run trained on it (its fingerprint differs from {RECORD})")
    import pandas as pd

    table = pd.read_csv(own, sep="\t", dtype=str, keep_default_na=False)
    seen = set(table.loc[table["subset"] != "test", "cell"]) if {"cell", "subset"} <= set(table.columns) else set()
    test_cells = np.asarray(cells, dtype=str)[subsets["test"]]
    trained = [c for c in test_cells if c in seen]
    if trained:
        raise DataError(f"{split_name}: {len(trained)} of its {len(test_cells)} test cells were training or "
                        f"validation cells of the run in {run_dir} (e.g. {_examples(trained)}); evaluate with the "
                        "run's own split (leave out --split)")


def check_split_sizes(subsets: dict[str, np.ndarray] | dict[str, int], fractions, what: str) -> None:
    """Refuse a split in which a subset asked for (fraction > 0) came out empty, e.g. after stratification."""
    sizes = {n: (v if isinstance(v, (int, np.integer)) else len(v)) for n, v in subsets.items()}
    empty = [n for n, f in zip(SUBSETS, fractions) if f > 0 and sizes[n] == 0]
    if empty:
        raise DataError(f"{what}: the {' and '.join(empty)} subset{'s are' if len(empty) > 1 else ' is'} empty "
                        f"(train/validation/test {'/'.join(str(sizes[n]) for n in SUBSETS)} cells): every label "
                        "has too few cells to give it one; split without --stratify or with other fractions")


# ---- settings --------------------------------------------------------------------------------------

def check_resume_settings(saved: dict | None, tc: TrainConfig, path: str | os.PathLike, epoch: int) -> None:
    """Refuse to resume with a setting that differs from the checkpoint's (except RESUMABLE_SETTINGS), or with
    fewer epochs than the checkpoint has already trained. A field the checkpoint lacks (a checkpoint older than
    the field) is taken to have been its default."""
    if epoch > tc.epochs:
        raise _training_error(f"{path} has already trained {epoch} epochs, more than the {tc.epochs} asked for; ask "
                              f"for at least {epoch} epochs, or train in a new --out folder")
    if saved is None:
        return
    default = asdict(TrainConfig())
    now = asdict(tc)
    changed = [f.name for f in fields(TrainConfig)
               if f.name not in RESUMABLE_SETTINGS and saved.get(f.name, default[f.name]) != now[f.name]]
    if changed:
        said = ", ".join(f"{name} {saved.get(name, default[name])!r} -> {now[name]!r}" for name in changed)
        raise _training_error(f"{path} was trained with other settings ({said}); resume with the checkpoint's "
                              f"settings or train in a new --out folder (only {', '.join(sorted(RESUMABLE_SETTINGS))} "
                              "may change on resume)")


def inapplicable_options(cfg: ModelConfig, tc: TrainConfig) -> list[str]:
    """Options set to a non-default value that the chosen model or likelihood does not use."""
    defaults = ModelConfig(n_features=1)
    notes = []
    if cfg.dispersion != defaults.dispersion and cfg.likelihood not in ("nb", "zinb"):
        notes.append(f"dispersion {cfg.dispersion!r} (only nb and zinb have a dispersion)")
    if cfg.model != "gmvae":
        if tc.pretrain_epochs:
            notes.append(f"pretrain_epochs {tc.pretrain_epochs} (only a GMVAE is pre-trained)")
        if cfg.y_regularisation != defaults.y_regularisation:
            notes.append(f"y_regularisation {cfg.y_regularisation!r} (only a GMVAE has y)")
        if cfg.components != defaults.components:
            notes.append(f"components {cfg.components} (only a GMVAE has components)")
        if cfg.prior_y != defaults.prior_y:
            notes.append(f"prior_y {cfg.prior_y!r} (only a GMVAE has p(y))")
        if tc.init_restarts != TrainConfig().init_restarts:
            notes.append(f"init_restarts {tc.init_restarts} (only a GMVAE's p(z|y) is initialised)")
        if tc.mixture_restarts != TrainConfig().mixture_restarts:
            notes.append(f"mixture_restarts {tc.mixture_restarts} (only a GMVAE has a mixture)")
    return notes


def check_training_plan(cfg: ModelConfig, tc: TrainConfig, n_train: int, n_validation: int) -> None:
    """Refuse a plan that would train nothing or silently skip a step; log one line for what it chooses instead.

    - batch norm with minibatches of one cell (it cannot normalise one cell: each would be skipped);
    - a GMVAE whose pre-training is not shorter than its training (p(z|y) would never be initialised);
    - no validation cells: best.pt is then chosen on the training ELBO (logged).
    """
    if cfg.batch_norm and (tc.batch_size < 2 or n_train < 2):
        what = (f"minibatches of {tc.batch_size} cell" if tc.batch_size < 2 else f"{n_train} training cell")
        raise _training_error(f"batch norm cannot train on {what}s (it needs at least 2 cells per minibatch); use "
                              "--batch-size 2 or more, more training cells, or --no-batch-norm")
    if cfg.model == "gmvae" and tc.pretrain_epochs and tc.pretrain_epochs >= tc.epochs:
        raise _training_error(f"pretrain_epochs {tc.pretrain_epochs} is not shorter than epochs {tc.epochs}: the "
                              "mixture prior p(z|y) would never be initialised; pre-train for fewer epochs than "
                              "you train")
    notes = inapplicable_options(cfg, tc)
    if notes:
        log.warning("not used by a %s-%s model, ignored: %s", cfg.model, cfg.likelihood, "; ".join(notes))
    if n_validation == 0:
        log.warning("no validation cells: best.pt is the epoch with the best training ELBO")


# ---- the run's state -------------------------------------------------------------------------------

def check_evaluable(run_dir: str | os.PathLike) -> None:
    """Refuse to evaluate a run that a training is still writing, that never wrote a checkpoint, or that never
    trained an epoch; log one line when it is unfinished (its model is the best so far)."""
    from .training import BEST, CHECKPOINT, LOCK, METRICS, load_checkpoint

    run = Path(run_dir)
    lock = run / LOCK
    if lock.exists():
        with open(lock) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _training_error(f"{run}: a training is still writing this folder (lock {lock} is held); "
                                      "evaluate it when the training has ended") from None
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)
    checkpoint = run / CHECKPOINT
    if not checkpoint.exists():
        partial = " (best.pt alone is from a training stopped before it)" if (run / BEST).exists() else ""
        raise _training_error(f"{run}: no {CHECKPOINT}: the training never wrote one{partial}; run the same "
                              "train command again to resume or finish it")
    state = load_checkpoint(checkpoint)
    epoch = int(state.get("epoch", 0))
    if epoch == 0:
        raise _training_error(f"{checkpoint}: the model was never trained (0 epochs); train it for at least one "
                              "epoch before evaluating")
    try:
        finished = json.loads((run / METRICS).read_text()).get("epochs_trained") == epoch
    except (OSError, ValueError):
        finished = False
    if not finished:
        planned = (state.get("train_config") or {}).get("epochs")
        log.warning("%s: the training is unfinished (stopped at epoch %d%s); evaluating its best model so far",
                    run, epoch, f" of {planned}" if planned else "")


def checkpoint_note(out: str | os.PathLike) -> str:
    """How a stopped training leaves its folder, for the end of an error line."""
    from .training import CHECKPOINT

    path = Path(out) / CHECKPOINT
    return f"the last good checkpoint in {out} is intact" if path.exists() else \
        f"no checkpoint was written in {out} yet"


def check_cell_ids(data_name: str, cells: np.ndarray) -> None:
    """Refuse data whose cell ids repeat: a split could not name its cells (DataError naming the data file)."""
    import pandas as pd

    dup = pd.Index(np.asarray(cells, dtype=str)).duplicated()
    if dup.any():
        raise DataError(f"{data_name}: {int(dup.sum())} duplicate cell ids (e.g. {_examples(np.asarray(cells)[dup])}); "
                        "cell ids must be unique: make them unique (e.g. AnnData.obs_names_make_unique) and run "
                        "`scvae-torch prepare` on it")


def check_canonical_file(data_name: str) -> None:
    """Refuse a file that is not an h5ad (a 10x HDF5 file, Matrix Market), pointing to `scvae-torch prepare`."""
    from .data import detect_format

    fmt = detect_format(data_name)
    if fmt != "h5ad":
        raise DataError(f"{data_name}: a {fmt} file, not a canonical counts .h5ad; convert it first with "
                        f"`scvae-torch prepare {data_name} --out counts.h5ad` and train on counts.h5ad")


# ---- a training's inputs, settled under the folder's lock ------------------------------------------

class RunInputs:
    """What SCVAE.train hands to fit so that the run records it: the data's genes (in the model's column
    order) and cell ids, the split as row indices, and the split file to keep as run_dir/split.tsv at a fresh
    start (None: write `split` there, a split made in memory)."""

    def __init__(self, genes: np.ndarray, cells: np.ndarray, subsets: dict[str, np.ndarray], data_path: str,
                 split_file: str | None = None, split=None):
        self.genes, self.cells, self.subsets = genes, cells, subsets
        self.data_path, self.split_file, self.split = data_path, split_file, split


def settle_run(out: Path, inputs: RunInputs, resuming: bool) -> None:
    """Under the folder's lock, once the checkpoint (if any) was accepted: a fresh run saves its split as
    out/split.tsv and records genes and split; a resumed run without a record (an older version) gets one."""
    from . import data

    if resuming and (out / RECORD).exists():  # the genes and split must be those the run started with
        record = read_record(out)
        if check_genes(record["genes"], inputs.genes, inputs.data_path, run_description(out)) is not None:
            raise DataError(f"{inputs.data_path}: the run's genes in another order; put them in its order first")
        check_resume_split(record, inputs.cells, inputs.subsets, inputs.split_file or "the split", out)
        return
    if resuming:
        log.warning("%s has no %s (a run from an older version): recording the genes and split it resumes with",
                    out, RECORD)
    saved = out / "split.tsv"
    if not resuming:
        if inputs.split is not None:
            data.write_split(inputs.split, str(saved))
        elif inputs.split_file is not None and Path(inputs.split_file).resolve() != saved.resolve():
            copy_file(Path(inputs.split_file), saved)
    write_record(out, inputs.genes, inputs.cells, inputs.subsets, inputs.data_path)
