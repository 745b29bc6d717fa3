"""The fit loop: minibatches from CSR, Adam, KL warm-up, checkpoint/resume, history, non-finite guard."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from . import provenance
from .batches import (  # noqa: F401
    Source,
    SourceError,
    StreamSource,
    batch_tensor,
    closed_on_error,
    csr_nbytes,
    epoch_permutation,
    load_counts,
    open_source,
    read_annotations,
    read_batches,
)
from .checkpoints import (  # noqa: F401
    BEST,
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    LOCK,
    PREVIOUS,
    STOP_SIGNALS,
    TrainingError,
    TrainingInterrupted,
    _resume_state,
    _save,
    folder_lock,
    load_checkpoint,
    load_model,
    restart_epochs,
    restarted_at,
    stop_signals,
)
from .config import LR_DROP_FACTOR, ModelConfig, TrainConfig
from .distributions import wide_dtype
from .io.atomic import torch_save, write_text
from .mixture_init import RESTART_AGREEMENT, init_mixture_prior, restart_mixture  # noqa: F401
from .models import GMVAE, VAE, build_model

log = logging.getLogger("scvae_torch.training")

HISTORY = "history.tsv"
METRICS = "metrics.json"


def reuse_freed_memory() -> None:
    """On glibc, keep freed memory in the process for reuse instead of handing it back to the system.

    Each minibatch allocates and frees dozens of cells x genes tensors (14 MB each for 128 cells of the
    MB-20k shape). glibc serves blocks that large with fresh mmap() pages and unmaps them on free, so every
    new tensor page-faults all its pages in again (benchmarks/bench_step.py: 6,800 faults per NB minibatch,
    a slower step; `python benchmarks/bench_step.py` measures it).
    No effect where the C library is not glibc. Process-wide; peak memory is unchanged (measured).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free memory at the heap's top
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap too, where freed ones are reused
    except (OSError, AttributeError):
        pass


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """Human-readable name of the device (GPU model or 'cpu')."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def check_batch_codes(batch_codes: np.ndarray | None, cfg: ModelConfig, n_cells: int) -> np.ndarray | None:
    """batch_codes as an int64 array checked against the model's batch covariate; a TrainingError if they do not
    fit (codes for a model without a covariate are dropped: that model does not use them)."""
    if not cfg.n_batches:
        return None
    if batch_codes is None:
        raise TrainingError(f"the model has a batch covariate ({cfg.n_batches} batches) but no batch codes were "
                            "given (obs['batch'])")
    codes = np.asarray(batch_codes)
    if codes.shape != (n_cells,) or codes.dtype.kind not in "iu":
        raise TrainingError(f"batch codes: expected {n_cells} integer codes, got shape {codes.shape} {codes.dtype}")
    if n_cells and (codes.min() < 0 or codes.max() >= cfg.n_batches):
        raise TrainingError(f"batch codes outside 0..{cfg.n_batches - 1} (min {codes.min()}, max {codes.max()})")
    return codes.astype(np.int64, copy=False)


def kl_weight(epoch: int, warmup: int) -> float:
    """Linear KL warm-up: weight (epoch+1)/warmup for the first `warmup` epochs, then 1."""
    return 1.0 if warmup <= 0 else min(1.0, (epoch + 1) / warmup)


TERMS = ("elbo", "log_lik", "kl_z", "kl_y")


@torch.no_grad()
def evaluate_terms(model: VAE, X: sp.csr_matrix | Source, rows: np.ndarray, device: torch.device,
                   batch_size: int = 512, iw_samples: int = 0,
                   batch_codes: np.ndarray | None = None) -> dict[str, float]:
    """Mean ELBO terms per cell over `rows`, plus the Poisson-stability statistics of the decoded rates.

    batch_codes: each cell's batch code (a row of X each), for a model with a batch covariate."""
    model.eval()
    source = open_source(X, device)
    wide = wide_dtype(device)
    # Sums of TERMS, the zero-count rate, the IW log-likelihood; and the largest rate: kept on the device
    # (read once at the end, not once per minibatch, which would make the host wait for a GPU each time).
    sums = torch.zeros(len(TERMS) + 2, dtype=wide, device=device)
    max_rate = torch.zeros((), dtype=wide, device=device)
    for start in range(0, len(rows), batch_size):
        batch = source.batch(rows[start:start + batch_size])
        x = batch.x
        b = batch_tensor(batch_codes, rows[start:start + batch_size], device)
        out = model(x, counts=batch.counts, batch=b)
        rate = model.decode(model.latent(x, b), x, b)["log_mean"].exp()
        iw = model.iw_log_likelihood(x, iw_samples, counts=batch.counts, batch=b).sum(dtype=wide) if iw_samples \
            else sums.new_zeros(())
        sums += torch.stack([*(out[k].sum(dtype=wide) for k in TERMS), (rate * (x == 0)).sum(dtype=wide), iw])
        max_rate = torch.maximum(max_rate, rate.max().to(wide))
    n = max(len(rows), 1)
    *terms, zero_rate_sum, iw_sum = sums.tolist()
    result = {k: v / n for k, v in zip(TERMS, terms)}
    result.update(zero_rate_sum=zero_rate_sum / n, max_rate=max_rate.item())
    if iw_samples:
        result["iw_log_lik"] = iw_sum / n
    return result


def adam(model: VAE, tc: TrainConfig, lr_drops: int = 0) -> torch.optim.Adam:
    """Adam over the model's parameters at tc's learning rate cut `lr_drops` times (lr_drop_due); the fused
    (one-kernel) implementation where the device has it."""
    kwargs = dict(lr=tc.lr * LR_DROP_FACTOR ** lr_drops, weight_decay=tc.weight_decay)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(model.parameters(), **kwargs)


def compile_model(model: VAE, device: torch.device) -> bool:
    """torch.compile the likelihood's dense x = 0 part (distributions.dense_zero_part: a dozen element-wise passes
    over cells x genes fused into one loop) for this model; False, logged, where it cannot.

    Only that part: compiling the MLPs and the decoder as well made a CPU step slower, and this part alone
    gains nothing beyond the machine's run-to-run noise on a CPU (benchmarks/bench_step.py --compile, part 1;
    figures in docs/performance.md). On a GPU, where element-wise passes are memory-bound, the
    fusion should pay more (`benchmarks/bench_step.py --compile` measures it there).
    """
    from .distributions import dense_zero_part

    try:  # a tiny function first: a missing compiler tool chain fails here, not in the middle of training
        torch.compile(lambda t: torch.nn.functional.softplus(t) * 2)(torch.ones(8, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
        log.warning("torch.compile is unavailable here (%s: %s); training without it",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    model.zero_part = torch.compile(dense_zero_part, dynamic=True)  # minibatch sizes vary: one kernel for all
    return True


def _history_frame(history: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(history)


def fit(X: sp.csr_matrix | Source, train_idx: np.ndarray, val_idx: np.ndarray, model_config: dict | ModelConfig,
        train_config: TrainConfig, out_dir: str | Path, labels: np.ndarray | None = None,
        inputs: provenance.RunInputs | None = None, batch_codes: np.ndarray | None = None) -> dict:
    """Train (or resume) a model in out_dir; writes checkpoint.pt, best.pt, history.tsv, metrics.json.

    X: a CSR count matrix in memory or a batch Source (e.g. a StreamSource reading the h5ad file).
    labels (integer codes per row of X) are used only by the supervised y-regularisation ablation.
    batch_codes (integer codes per row of X, positions in model_config's `batches`): the batch covariate.
    inputs: the genes, cells and split, recorded in out_dir (split.tsv, run.json) when the run starts.
    """
    out = Path(out_dir)
    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(
        {**model_config, "n_features": X.shape[1]} if "n_features" not in model_config else model_config)
    if cfg.n_features != X.shape[1]:
        raise TrainingError(f"model expects {cfg.n_features} features but the data have {X.shape[1]}")
    if cfg.y_regularisation == "supervised" and labels is None:
        raise TrainingError("y_regularisation 'supervised' needs labels in the data (obs['label'])")
    if len(train_idx) == 0:
        raise TrainingError("the training split is empty")
    tc = train_config.resolved(X.shape[0], cfg.model)
    provenance.check_training_plan(cfg, tc, len(train_idx), len(val_idx))
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(tc.device)
    source = open_source(X, device)
    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    label_t = torch.as_tensor(labels, dtype=torch.long) if labels is not None else None
    codes = check_batch_codes(batch_codes, cfg, X.shape[0])
    batch_t = torch.as_tensor(codes) if codes is not None else None

    if tc.threads:
        torch.set_num_threads(tc.threads)  # small models run fastest with few threads; never oversubscribe
    reuse_freed_memory()
    with folder_lock(out), stop_signals() as received:
        torch.manual_seed(tc.seed)
        model = build_model(cfg).to(device)
        optimiser = adam(model, tc)
        state = _resume_state(out, cfg, model, optimiser, device, tc)
        if inputs is not None:
            provenance.settle_run(out, inputs, resuming=(out / CHECKPOINT).exists())
        compiled = tc.compile and compile_model(model, device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bfloat16")
        epoch, batch0 = state["epoch"], state["batch"]
        history, best_val, best_epoch = state["history"], state["best_val_elbo"], state["best_epoch"]
        restarts = state["restarts"]  # the trained mixture's restart checks (restart_mixture), in order
        drops = state["lr_drops"]  # epochs at which the learning rate was cut (lr_drop_due), in order
        partial, sums = state["partial"], None  # sums: this run's part of the epoch's TERMS sums, on the device
        if epoch or batch0:
            log.info("resuming %s from epoch %d, minibatch %d", out, epoch, batch0)
        n_batches = math.ceil(len(train_idx) / tc.batch_size)
        log.info("training %s-%s on %s (%s): %d training cells, %d validation cells, %d epochs; data %s; "
                 "%s%s", cfg.model, cfg.likelihood, device, device_name(device), len(train_idx), len(val_idx),
                 tc.epochs, source.description, tc.precision, ", compiled" if compiled else "")
        bar = tqdm(total=tc.epochs, initial=epoch, desc=f"{cfg.model}-{cfg.likelihood}",
                   unit="epoch", disable=None)
        started = time.perf_counter()
        epochs_run = 0
        while epoch < tc.epochs:
            stopped = stops_early(tc, epoch, best_epoch, len(val_idx), restarted_at(restarts, drops))
            if restart_due(model, tc, epoch, best_epoch, restarts, stopped):
                restarts.append(_restart(model, out, source, train_idx, device, tc, codes, epoch))
                if restarts[-1]["restarted"]:  # Adam's moments belong to the mixture left behind
                    optimiser = adam(model, tc, len(drops))
                    stopped = False
                _save(out, model, optimiser, cfg, tc, epoch, 0, {}, history, best_val, best_epoch, device, restarts,
                      drops)
            if lr_drop_due(tc, stopped, drops):
                drops.append(epoch)
                model.load_state_dict(load_checkpoint(out / BEST, device)["model_state"])
                optimiser = adam(model, tc, len(drops))  # fresh moments: the old ones belong to the last weights
                stopped = False
                log.info("epoch %d: validation ELBO on a plateau since epoch %d: learning rate cut to %.3g, training "
                         "on from best.pt (cut %d of %d)", epoch, best_epoch, optimiser.param_groups[0]["lr"],
                         len(drops), tc.lr_drops)
                _save(out, model, optimiser, cfg, tc, epoch, 0, {}, history, best_val, best_epoch, device, restarts,
                      drops)
            if stopped:
                break
            t0 = time.perf_counter()
            pretraining = model.pretraining(epoch, tc.pretrain_epochs)
            if model.initialise_after_pretraining(epoch, tc.pretrain_epochs) and batch0 == 0:
                score_rows = val_idx if len(val_idx) else train_idx
                kept = init_mixture_prior(
                    model, source, train_idx, device, tc.seed, codes, tc.init_restarts,
                    lambda rows=score_rows: evaluate_terms(model, source, rows, device, batch_size=tc.batch_size,
                                                           batch_codes=codes)["elbo"])
                log.info("initialised p(z|y) by k-means on the pre-trained latent (restart %d of %d kept)",
                         kept + 1, tc.init_restarts)
            weight = kl_weight(epoch, tc.kl_warmup)
            perm = source.epoch_order(train_idx, tc.seed, epoch)
            model.train()
            for b in range(batch0, n_batches):
                rows = perm[b * tc.batch_size:(b + 1) * tc.batch_size]
                if len(rows) < 2 and cfg.batch_norm:
                    continue  # batch norm cannot train on one cell (a last minibatch of one; smaller ones are refused)
                batch = source.batch(rows)
                y = label_t[rows].to(device) if label_t is not None else None
                b_kw = {} if batch_t is None else {"batch": batch_t[rows].to(device, non_blocking=True)}
                optimiser.zero_grad(set_to_none=True)  # before the forward pass: last step's gradients freed
                with autocast:  # the likelihood inside always runs in float32 (models.log_px)
                    result = model(batch.counts, kl_weight=weight, labels=y, pretrain=pretraining, **b_kw)
                loss = result["loss"]
                if device.type == "cpu" and not torch.isfinite(loss):  # on a GPU checked once per epoch, below:
                    raise TrainingError(f"non-finite loss at epoch {epoch + 1}, minibatch {b + 1}: stopped; "
                                        f"{provenance.checkpoint_note(out)}")  # reading it waits
                loss.backward()
                optimiser.step()
                # The ELBO terms' sums stay on the device (no wait for it per minibatch); NaN there = a bad loss.
                step_sums = torch.stack([result[k].detach().sum(dtype=wide_dtype(device)) for k in TERMS])
                sums = step_sums if sums is None else sums.add_(step_sums)
                del result, loss  # the decoded parameters are not kept through the next forward pass
                partial["n"] = partial.get("n", 0) + len(rows)
                if received:
                    partial, sums = _add_sums(partial, sums, epoch, out), None
                    path = _save(out, model, optimiser, cfg, tc, epoch, b + 1, partial, history, best_val,
                                 best_epoch, device, restarts, drops)
                    raise TrainingInterrupted(received[0], path)
            batch0 = 0
            partial, sums = _add_sums(partial, sums, epoch, out), None
            train_terms = {k: partial.get(k, 0.0) / max(partial.get("n", 1), 1) for k in TERMS}
            partial = {}
            val = evaluate_terms(model, source, val_idx, device, batch_size=tc.batch_size,  # memory as training
                                 iw_samples=tc.iw_samples, batch_codes=codes) if len(val_idx) else {}
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch + 1, "kl_weight": weight, **{f"train_{k}": v for k, v in train_terms.items()},
                   **{f"val_{k}": v for k, v in val.items()}, "seconds": seconds}
            history.append(row)
            epoch += 1
            epochs_run += 1
            val_elbo = val.get("elbo", train_terms["elbo"])
            if not math.isfinite(val_elbo):
                raise TrainingError(f"non-finite validation ELBO at epoch {epoch}: stopped; "
                                    f"{provenance.checkpoint_note(out)}")
            # a GMVAE still pre-training is not a candidate for best.pt (its p(z|y) is not set), unless it never ends
            if val_elbo > best_val and not (model.pretraining(epoch - 1, tc.pretrain_epochs) and epoch < tc.epochs):
                best_val, best_epoch = val_elbo, epoch
                torch_save({"format": CHECKPOINT_FORMAT, "model_config": cfg.to_dict(),
                                   "model_state": model.state_dict(), "epoch": epoch, "val_elbo": val_elbo},
                                  out / BEST)
            write_text(out / HISTORY, _history_frame(history).to_csv(sep="\t", index=False))
            log.info("epoch %d/%d  train ELBO %.4g  val ELBO %.4g  KL weight %.3g  %.2f s", epoch, tc.epochs,
                     train_terms["elbo"], val_elbo, weight, seconds)
            bar.update(1)
            bar.set_postfix(val_elbo=f"{val_elbo:.4g}")
            stopping = stops_early(tc, epoch, best_epoch, len(val_idx), restarted_at(restarts, drops))
            if stopping and not lr_drop_due(tc, stopping, drops):
                log.info("early stopping after epoch %d: no better validation ELBO for %d epochs; best epoch %d "
                         "(best.pt)", epoch, tc.patience, best_epoch)
            if epoch % tc.checkpoint_every == 0 or epoch == tc.epochs or stopping:
                _save(out, model, optimiser, cfg, tc, epoch, 0, {}, history, best_val, best_epoch, device, restarts,
                      drops)
            if received:
                path = _save(out, model, optimiser, cfg, tc, epoch, 0, {}, history, best_val, best_epoch, device,
                             restarts, drops)
                raise TrainingInterrupted(received[0], path)
        bar.close()
        if not (out / CHECKPOINT).exists():
            _save(out, model, optimiser, cfg, tc, epoch, 0, {}, history, best_val, best_epoch, device, restarts, drops)
        elapsed = time.perf_counter() - started
        last = history[-1] if history else {}
        metrics = {
            **cfg.to_dict(), **{f"train_{k}": v for k, v in asdict(tc).items()},
            "epochs_trained": epoch, "best_epoch": best_epoch, "best_val_elbo": best_val,
            "stopped_early": stops_early(tc, epoch, best_epoch, len(val_idx), restarted_at(restarts, drops)),
            "mixture_restarts": restarts, "lr_drops": drops,
            "best_chosen_on": "validation" if len(val_idx) else "train",
            "final": {k: v for k, v in last.items()},
            "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])) if history else None,
            "seconds_this_run": elapsed, "epochs_this_run": epochs_run,
            "n_train": int(len(train_idx)), "n_validation": int(len(val_idx)), "data_source": source.description,
            "compiled": bool(compiled),
        }
        write_text(out / METRICS, json.dumps(metrics, indent=2, default=float) + "\n")
        return metrics


def stops_early(tc: TrainConfig, epoch: int, best_epoch: int, n_validation: int, since: int = 0) -> bool:
    """Whether early stopping ends training after `epoch` epochs: the validation ELBO's best is `patience` epochs old.

    A function of the saved state only, so a resumed run stops exactly where an uninterrupted one did. Needs
    validation cells; counts from the first candidate for best.pt (a GMVAE's pre-training is never one), and
    from `since` (the epoch of a mixture restart or learning-rate cut) when that is later.
    """
    return (tc.early_stopping and n_validation > 0 and best_epoch > 0
            and epoch - max(best_epoch, since) >= tc.patience)


def lr_drop_due(tc: TrainConfig, stopped: bool, drops: list[int]) -> bool:
    """Whether the learning rate is cut (by LR_DROP_FACTOR, from best.pt's weights) instead of stopping early: at
    most tc.lr_drops times, each when the validation ELBO has plateaued (stops_early) since the last cut."""
    return stopped and len(drops) < tc.lr_drops


def restart_due(model: VAE, tc: TrainConfig, epoch: int, best_epoch: int, restarts: list[dict],
                stopped: bool) -> bool:
    """Whether a GMVAE's mixture is checked against k-means of its latent (and restarted where they disagree) now:
    at early stopping, or restart_epochs(tc) before the last epoch, whichever comes first; at most
    tc.mixture_restarts checks, never during pre-training, never twice at one epoch."""
    return (isinstance(model, GMVAE) and len(restarts) < tc.mixture_restarts and best_epoch > 0
            and not model.pretraining(epoch - 1, tc.pretrain_epochs) and epoch < tc.epochs
            and (not restarts or restarts[-1]["epoch"] < epoch)
            and (stopped or epoch == tc.epochs - restart_epochs(tc)))


def _restart(model: VAE, out: Path, source: Source, train_idx: np.ndarray, device: torch.device, tc: TrainConfig,
             codes: np.ndarray | None, epoch: int) -> dict:
    """A mixture check (restart_due): restart best.pt's mixture from k-means of its latent where the two disagree
    (mixture_init.restart_mixture); training goes on and best.pt changes only if the validation ELBO improves.
    Where they agree, the model keeps its last epoch's weights."""
    last = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(load_checkpoint(out / BEST, device)["model_state"])
    agreement = restart_mixture(model, source, train_idx, device, tc.seed, codes, agreement=RESTART_AGREEMENT)
    restarted = agreement < RESTART_AGREEMENT
    if restarted:
        log.info("epoch %d: the mixture's clusters and k-means of its latent disagree (ARI %.3f): mixture restarted "
                 "from k-means; training on, best.pt is replaced only by a better validation ELBO", epoch, agreement)
    else:
        model.load_state_dict(last)  # checkpoint.pt keeps the last epoch's weights
        log.info("epoch %d: the mixture's clusters agree with k-means of its latent (ARI %.3f): no restart",
                 epoch, agreement)
    return {"epoch": epoch, "agreement": agreement, "restarted": restarted}


def _add_sums(partial: dict, sums: torch.Tensor | None, epoch: int, out: Path) -> dict:
    """partial (the epoch's TERMS sums so far, floats) plus the device sums; stops on a non-finite loss."""
    if sums is None:
        return partial
    values = sums.tolist()
    if not all(map(math.isfinite, values)):
        raise TrainingError(f"non-finite loss (ELBO terms) in epoch {epoch + 1}: stopped; "
                            f"{provenance.checkpoint_note(out)}")
    return {**partial, **{k: partial.get(k, 0.0) + v for k, v in zip(TERMS, values)}}


def open_counts(data_path: str, stream: str, stream_above_gb: float, device: str | torch.device
                ) -> tuple[sp.csr_matrix | StreamSource, np.ndarray, np.ndarray | None, np.ndarray]:
    """The counts of a canonical h5ad, held compactly in memory or streamed from the file (`streams`), with its
    cell ids (checked unique), obs['label'] (or None) and gene names; problems are one-line errors naming it."""
    provenance.check_canonical_file(data_path)
    if streams(data_path, TrainConfig(stream=stream, stream_above_gb=stream_above_gb)):
        try:  # X stays in the file; only the cell ids and labels are read
            cells, labels, genes = read_annotations(data_path)
            X = StreamSource(data_path, resolve_device(device) if isinstance(device, str) else device)
        except SourceError as err:
            raise TrainingError(str(err)) from None
    else:
        X, cells, labels, genes = load_counts(data_path)  # whole counts never held as float32 (peak memory)
    with closed_on_error(X):
        provenance.check_cell_ids(data_path, cells)
    return X, cells, labels, genes


def run_split(out: Path, cells: np.ndarray, split_path: str | None, seed: int,
              fractions: tuple[float, float, float]) -> tuple[dict[str, np.ndarray], pd.Series | None, str]:
    """The split of a run in `out`: from split_path, else the one saved in out (a resumed run), else a new seeded
    one of `fractions` (returned too, to be saved when the run starts); with the file the run records."""
    from . import data

    saved = out / "split.tsv"
    if split_path is None and not saved.exists():
        split = data.make_split(cells, fractions=fractions, seed=seed)
        return {name: np.flatnonzero(split.to_numpy() == name) for name in data.SUBSETS}, split, str(saved)
    return data.read_split(str(split_path or saved), cells), None, str(split_path or saved)


def run_gene_order(out: Path, genes: np.ndarray, data_name: str) -> np.ndarray | None:
    """For a run resumed in `out`: the data's columns in the genes' order it started with (None: already so, or a
    fresh run); other genes are a DataError (provenance.check_genes)."""
    record = provenance.read_record(out) if (out / CHECKPOINT).exists() else None
    if record is None:
        return None
    return provenance.check_genes(record["genes"], genes, data_name, provenance.run_description(out))


def select_genes(X: sp.csr_matrix | Source, order: np.ndarray) -> sp.csr_matrix | Source:
    """The counts with their gene columns taken in `order` (in memory: a new CSR matrix; streamed: per block)."""
    if isinstance(X, StreamSource):
        X.select_columns(order)
        return X
    X = X[:, order]
    X.sort_indices()
    return X


def streams(data_path: str, tc: TrainConfig) -> bool:
    """Whether training reads minibatches from the file: stream 'on', or 'auto' and X above stream_above_gb."""
    if tc.stream != "auto":
        return tc.stream == "on"
    try:
        return csr_nbytes(data_path) > tc.stream_above_gb * 2 ** 30
    except SourceError:  # not a CSR h5ad (dense X, damaged file): the in-memory reader says what is wrong
        return False
