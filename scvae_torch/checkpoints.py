"""Run folders on disk: the resumable checkpoint (with the one before it), loading a model, the folder lock,
stop signals and the RNG state a resumed run continues from."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from . import provenance
from .config import ModelConfig, TrainConfig
from .io.atomic import copy_file, torch_save
from .models import VAE, build_model

log = logging.getLogger("scvae_torch.training")


CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before, kept for when the last one is damaged
BEST = "best.pt"
LOCK = ".lock"
CHECKPOINT_FORMAT = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingError(Exception):
    """Training cannot go on (non-finite loss, busy or mismatched output folder); one-line message."""


class TrainingInterrupted(Exception):
    """A stop signal arrived; a checkpoint at the end of the current minibatch was written."""

    def __init__(self, signum: int, path: Path):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}; checkpoint written to {path}, "
                         "run again to resume")
        self.signum = signum


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint safely (weights_only: no code is unpickled); a damaged file is a TrainingError."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling errors, truncated zip archives, foreign pickles
        raise TrainingError(f"{path}: not a readable scvae-torch checkpoint ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'damaged'})") from None
    if not isinstance(state, dict) or not {"format", "model_config", "model_state"} <= set(state):
        raise TrainingError(f"{path}: not an scvae-torch checkpoint (a readable file without its fields)")
    return state


def load_model(path: str | Path, device: torch.device | str = "cpu", which: str = "best") -> VAE:
    """A trained model in eval mode from a run folder (best.pt or checkpoint.pt) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / (BEST if which == "best" and (path / BEST).exists() else CHECKPOINT)
    if not path.exists():
        raise TrainingError(f"{path}: no checkpoint found")
    state = load_checkpoint(path, device)
    model = build_model(state["model_config"]).to(device)
    model.load_state_dict(state["model_state"])
    model.eval()
    return model


@contextlib.contextmanager
def folder_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on out_dir so two trainings never write the same folder."""
    fh = open(out_dir / LOCK, "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(f"{out_dir}: another training is already writing this folder "
                                f"(lock {out_dir / LOCK} is held)") from None
        yield
    finally:
        fh.close()


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Record SIGTERM / SIGUSR1 (SLURM's time-limit and preemption warnings) instead of dying at once."""
    received: list[int] = []
    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread: signals cannot be caught here
        previous = {}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def restarted_at(restarts: list[dict], lr_drops: list[int] = ()) -> int:
    """The epoch training last started over from: the last mixture restart or learning-rate drop (0: none)."""
    return max([r["epoch"] for r in restarts if r["restarted"]] + list(lr_drops), default=0)


def restart_epochs(tc: TrainConfig) -> int:
    """Epochs kept for a restarted mixture to train: twice the early-stopping patience, at most half the epochs
    after pre-training. The last mixture check is this many epochs before the end."""
    return max(1, min(2 * tc.patience, (tc.epochs - (tc.pretrain_epochs or 0)) // 2))


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _resume_state(out: Path, cfg: ModelConfig, model: VAE, optimiser: torch.optim.Optimizer,
                  device: torch.device, tc: TrainConfig | None = None) -> dict:
    """Restore model, optimiser and RNG from out/checkpoint.pt (if damaged, checkpoint.prev.pt); else a fresh state."""
    fresh = {"epoch": 0, "batch": 0, "partial": {}, "history": [], "best_val_elbo": -math.inf, "best_epoch": 0,
             "restarts": [], "lr_drops": []}
    optional = {"restarts", "lr_drops"}  # fields a checkpoint older than them lacks
    for stale in out.glob(".*.tmp[0-9]*"):  # temporary files of a killed run (we hold the folder's lock)
        stale.unlink(missing_ok=True)
    path = out / CHECKPOINT
    if not path.exists():
        return fresh  # a checkpoint.prev.pt alone is stale: _save drops it
    problems = []
    for path in (out / CHECKPOINT, out / PREVIOUS):
        try:
            state = load_checkpoint(path, device)
            missing = sorted({*fresh, "optimizer_state", "rng"} - optional - set(state))
            if missing:
                raise TrainingError(f"{path}: not a resumable checkpoint (no {', '.join(missing)})")
            break
        except FileNotFoundError:
            problems.append(f"{path}: missing")
        except TrainingError as err:
            problems.append(str(err))
    else:
        raise TrainingError("; ".join(problems) + " - no usable checkpoint; delete the folder to start afresh")
    if problems:
        log.warning("%s; resuming from the previous checkpoint %s (epoch %d)", problems[0], path, state["epoch"])
        copy_file(path, out / CHECKPOINT)  # so the damaged file can never be rotated into checkpoint.prev.pt
    saved = state.get("model_config")
    try:  # a checkpoint from before a setting existed holds that setting's default
        saved = ModelConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        pass
    if saved != cfg.to_dict():
        raise TrainingError(f"{path} holds a different model ({state.get('model_config')}); "
                            "use a new output folder or delete it")
    if tc is not None:  # other settings (but epochs, device, ...) would be recorded without being applied
        provenance.check_resume_settings(state.get("train_config"), tc, path, state["epoch"])
    model.load_state_dict(state["model_state"])
    optimiser.load_state_dict(state["optimizer_state"])
    _set_rng_state(state["rng"], device)
    return {k: state.get(k, fresh[k]) for k in fresh}


def _save(out: Path, model: VAE, optimiser: torch.optim.Optimizer, cfg: ModelConfig, tc: TrainConfig,
          epoch: int, batch: int, partial: dict, history: list[dict], best_val: float, best_epoch: int,
          device: torch.device, restarts: list[dict] | None = None, lr_drops: list[int] | None = None) -> Path:
    """Write the resumable checkpoint atomically, keeping the one before as checkpoint.prev.pt; returns its path.

    At every moment checkpoint.pt is a complete file (the old or the new one); a failed write (full disk)
    leaves both files as they were and is a TrainingError.
    """
    path, previous = out / CHECKPOINT, out / PREVIOUS
    state = {
        "format": CHECKPOINT_FORMAT, "model_config": cfg.to_dict(), "train_config": asdict(tc),
        "model_state": model.state_dict(), "optimizer_state": optimiser.state_dict(),
        "epoch": epoch, "batch": batch, "partial": dict(partial), "history": list(history),
        "best_val_elbo": best_val, "best_epoch": best_epoch, "rng": _rng_state(device),
        "restarts": list(restarts or []), "lr_drops": list(lr_drops or []),
    }

    def rotate() -> None:
        if path.exists():
            copy_file(path, previous)  # a second name: checkpoint.pt is never missing while it is rotated
        else:
            previous.unlink(missing_ok=True)  # from an earlier run that was started afresh

    try:
        torch_save(state, path, before_replace=rotate)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise TrainingError(f"{path}: could not write the checkpoint ({reason}); the previous "
                            "checkpoint is unchanged, run again to resume from it") from None
    return path
