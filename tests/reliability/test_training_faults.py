"""Training faults: kill -9 at random and at chosen moments, stop signals, a full disk, damaged checkpoints, two
trainings on one folder, non-finite losses. Every case checks the outcome and that nothing already written was
damaged; a resumed run must end with weights bit-identical to an uninterrupted one."""

from __future__ import annotations

import errno
import logging
import math
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from reliability_support import (
    FAULT,
    REFUSAL,
    assert_one_line_error,
    cases,
    cli,
    counts_matrix,
    python_env,
    run_main,
    same_weights,
    split_rows,
    write_h5ad,
)

from scvae_torch import training
from scvae_torch.training import TrainConfig, TrainingError, TrainingInterrupted, fit, folder_lock, load_checkpoint

pytestmark = pytest.mark.reliability

HERE = Path(__file__).parent
MODEL = {"model": "vae", "likelihood": "nb", "encoder": [16], "decoder": [16], "latent": 2}
FIT = dict(batch_size=32, lr=1e-3, seed=4, checkpoint_every=1)
EPOCHS = 8  # CLI runs: about 1.5 s of training after a 2-3 s start


# ---- helpers -------------------------------------------------------------------------------------

def train_args(data: Path, out: Path, epochs: int = EPOCHS, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "vae", "--likelihood", "poisson",
            "--encoder", "32", "--decoder", "32", "--latent", "4", "--epochs", str(epochs), "--batch-size", "20",
            "--lr", "1e-3", "--checkpoint-every", "1", "--device", "cpu", "--threads", "1", *extra]


def start(args: list[str], fault: str | None = None, marker: Path | None = None,
          release: Path | None = None) -> subprocess.Popen:
    """Start `scvae-torch ARGS` in the background, optionally through faulty_cli.py with a planted fault."""
    command = [sys.executable, "-m", "scvae_torch.cli", *args] if fault is None else \
        [sys.executable, str(HERE / "faulty_cli.py"), fault, "--", *args]
    env = python_env()
    if marker is not None:
        env["RELIABILITY_MARKER"] = str(marker)
    if release is not None:
        env["RELIABILITY_RELEASE"] = str(release)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    """Poll until condition() holds; fail if the process ends first or the hang guard (minutes) runs out."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the training ended ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def epochs_done(out: Path) -> int:
    """Epochs recorded in history.tsv (written atomically, so always a whole table)."""
    try:
        return len(pd.read_csv(out / "history.tsv", sep="\t"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def kill_9(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=600)
    proc.stdout.close()
    proc.stderr.close()


def assert_intact(out: Path) -> int:
    """Every state file present is whole and readable; returns the checkpoint's epoch (0 when none)."""
    epoch = 0
    if (out / "checkpoint.pt").exists():
        state = load_checkpoint(out / "checkpoint.pt")
        epoch = state["epoch"]
        assert [h["epoch"] for h in state["history"]] == list(range(1, epoch + 1))
    if (out / "checkpoint.prev.pt").exists():
        assert load_checkpoint(out / "checkpoint.prev.pt")["epoch"] <= max(epoch, 1)
    if (out / "best.pt").exists():
        load_checkpoint(out / "best.pt")
    if (out / "history.tsv").exists():
        history = pd.read_csv(out / "history.tsv", sep="\t")
        assert list(history["epoch"]) == list(range(1, len(history) + 1))
    return epoch


def assert_same_run(reference: Path, out: Path) -> None:
    """Bit-identical weights (last and best), the same history but for timings, no temporary files left."""
    same_weights(reference / "checkpoint.pt", out / "checkpoint.pt")
    same_weights(reference / "best.pt", out / "best.pt")
    pd.testing.assert_frame_equal(pd.read_csv(reference / "history.tsv", sep="\t").drop(columns="seconds"),
                                  pd.read_csv(out / "history.tsv", sep="\t").drop(columns="seconds"))
    assert not list(out.glob(".*.tmp*")), list(out.glob(".*"))


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory) -> Path:
    return write_h5ad(tmp_path_factory.mktemp("data") / "counts.h5ad", counts_matrix(1500, 30))


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory, cli_data) -> Path:
    """An uninterrupted CLI training: what every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = cli(*train_args(cli_data, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def small():
    """A small in-memory data set: X, training rows, validation rows."""
    X = counts_matrix()
    return (X, *split_rows(X.shape[0]))


@pytest.fixture(scope="module")
def fit_reference(tmp_path_factory, small) -> Path:
    """An uninterrupted 5-epoch in-process training."""
    out = tmp_path_factory.mktemp("fit_reference")
    fit(*small, MODEL, TrainConfig(epochs=5, **FIT), out)
    return out


# ---- kill -9 and stop signals ----------------------------------------------------------------------

@FAULT
def test_kill_9_and_sigterm_at_random_moments_then_rerun_gives_identical_weights(tmp_path, cli_data, cli_reference):
    """Stopped (kill -9, SIGTERM, kill -9) inside random minibatches of random epochs; each re-run resumes and the
    end is bit-identical. SIGTERM (SLURM's time limit) writes a checkpoint and exits 128+15 with one line."""
    rng = random.Random(20240607)  # fixed, so a failure can be replayed
    out = tmp_path / "run"
    stops = []
    for how in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        target = min(epochs_done(out) + rng.randint(1, 2), EPOCHS - 1)
        proc = start(train_args(cli_data, out))
        wait_until(lambda: epochs_done(out) >= target, proc, f"epoch {target}")
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere inside the next epoch's minibatches
        assert proc.poll() is None, "the training ended before it could be stopped"
        proc.send_signal(how)
        _, stderr = proc.communicate(timeout=600)
        if how == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM, stderr
            lines = [line for line in stderr.splitlines() if line.strip()]
            # one line says it, the last; before it only train's own progress lines (one per epoch off a terminal)
            assert "stopped by signal SIGTERM" in lines[-1] and "Traceback" not in stderr, stderr
            assert all(line.startswith("scvae-torch train: ") and "error" not in line for line in lines), stderr
            assert str(out / "checkpoint.pt") in lines[-1]
        else:
            assert proc.returncode == -signal.SIGKILL
        stops.append(assert_intact(out))
    assert 0 < stops[-1] < EPOCHS, stops
    done = cli(*train_args(cli_data, out))
    assert done.returncode == 0, done.stderr
    assert_same_run(cli_reference, out)
    cases(len(stops))


@FAULT
def test_kill_9_at_chosen_moments_of_writes_then_rerun_gives_identical_weights(tmp_path, cli_data, cli_reference):
    """Killed while checkpoint.pt's data is written, between rotating checkpoint.prev.pt and renaming the new
    checkpoint, and just before history.tsv is replaced (one after the other, each run resuming the last):
    the files are whole every time and the final re-run ends identical."""
    out, marker = tmp_path / "run", tmp_path / "reached"
    epochs = []
    for moment in ("checkpoint-write", "checkpoint-rotate", "history-write"):
        marker.unlink(missing_ok=True)
        proc = start(train_args(cli_data, out), fault=f"hold:{moment}:2", marker=marker)
        wait_until(marker.exists, proc, moment)
        kill_9(proc)
        epochs.append(assert_intact(out))
        if moment == "checkpoint-rotate":  # the previous checkpoint is now a second name of the current one
            assert (out / "checkpoint.prev.pt").read_bytes() == (out / "checkpoint.pt").read_bytes()
    assert epochs[0] >= 1 and epochs[-1] < EPOCHS and epochs == sorted(epochs), epochs
    done = cli(*train_args(cli_data, out))
    assert done.returncode == 0, done.stderr
    assert_same_run(cli_reference, out)
    cases(3)


@FAULT
def test_signal_mid_epoch_checkpoints_and_resumes_exactly(tmp_path):
    """SIGUSR1 (SLURM's warning) at an arbitrary moment: checkpoint at the minibatch end, exit, resume exactly."""
    X = counts_matrix(1000)
    tr, va = split_rows(1000)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-3, seed=1, checkpoint_every=10)
    fit(X, tr, va, MODEL, cfg, tmp_path / "a")
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    with pytest.raises(TrainingInterrupted, match="SIGUSR1"):
        fit(X, tr, va, MODEL, cfg, tmp_path / "b")
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["epoch"] < 3
    fit(X, tr, va, MODEL, cfg, tmp_path / "b")
    same_weights(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")


# ---- a full disk -----------------------------------------------------------------------------------

def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel reports it: no file name


@FAULT
@pytest.mark.parametrize("target", ["checkpoint.pt", "best.pt", "history.tsv", "metrics.json"])
def test_full_disk_while_writing_keeps_every_file_and_the_rerun_ends_identical(tmp_path, small, fit_reference,
                                                                              monkeypatch, target):
    """The disk fills while a state or result file is written: a clear error naming it, the file as it was
    before, no temporary file left; with space again, the re-run resumes and ends identical."""
    out = tmp_path / "run"
    before: dict[str, bytes] = {}
    failing_at = 3 if target != "metrics.json" else 1

    def fail_now(name: str) -> bool:
        seen[name] = seen.get(name, 0) + 1
        if seen[name] != failing_at:
            return False
        before.update({p.name: p.read_bytes() for p in out.iterdir() if p.is_file()})
        return True

    seen: dict[str, int] = {}
    real_fsync, real_write_text = os.fsync, pathlib.Path.write_text

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if f".{target}.tmp" in name and fail_now(target):
            raise _enospc()
        return real_fsync(fd)

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith(f".{target}.tmp") and fail_now(target):
            raise _enospc()
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    with pytest.raises((TrainingError, OSError)) as caught:
        fit(*small, MODEL, TrainConfig(epochs=5, **FIT), out)
    message = str(caught.value)
    assert "No space left on device" in message and str(out / target) in message and "\n" not in message
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "best.pt", "history.tsv", "metrics.json"):
        assert after.get(name) == before.get(name), f"{name} changed by the failed write"
    assert not list(out.glob(".*.tmp*"))
    monkeypatch.undo()
    fit(*small, MODEL, TrainConfig(epochs=5, **FIT), out)
    assert_same_run(fit_reference, out)


@FAULT
def test_full_disk_on_the_command_line_is_one_line_and_keeps_the_checkpoint(tmp_path, cli_data, monkeypatch):
    """The command reports a full disk in one line (exit 2) and checkpoint.pt of epoch 2 stays whole (the re-run
    is the case above)."""
    import faulty_cli

    out = tmp_path / "run"
    monkeypatch.setattr(os, "fsync", os.fsync)  # restored after the test: plant() patches os
    monkeypatch.setattr(os, "replace", os.replace)
    faulty_cli.plant("enospc", "checkpoint-write", 3)
    failed = run_main(*train_args(cli_data, out))
    assert_one_line_error(failed, "scvae-torch train: error:", str(out / "checkpoint.pt"), "No space left on device",
                          code=2)
    assert assert_intact(out) == 2


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(where)], check=True)
    return ok.returncode == 0


@FAULT
def test_a_real_full_disk_tmpfs_then_more_space_resumes_identically(tmp_path, cli_data, cli_reference):
    """A small tmpfs (when we may mount one): torch's own full-disk failure is reported in one line."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected full-disk cases cover this")
    page = 4096
    pages = lambda name: math.ceil((cli_reference / name).stat().st_size / page)  # noqa: E731
    checkpoint = pages("checkpoint.pt")
    size = page * (pages("split.tsv") + pages("best.pt") + pages("history.tsv") + checkpoint + checkpoint // 2 + 2)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "run"
        failed = cli(*train_args(cli_data, out))
        line = assert_one_line_error(failed, "scvae-torch train: error:", str(out), "No space left on device")
        epoch = assert_intact(out)
        assert epoch >= 1, line
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # the user frees space
        done = cli(*train_args(cli_data, out))
        assert done.returncode == 0, done.stderr
        assert_same_run(cli_reference, out)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@FAULT
def test_full_disk_while_prepare_writes_the_canonical_file_is_one_line(tmp_path, monkeypatch):
    """HDF5 on a full disk prints pages of errors and can crash: `prepare` refuses up front, in one line, and an
    existing output stays as it was. A real tmpfs when we may mount one, else a disk that reports no space."""
    source = write_h5ad(tmp_path / "source.h5ad", counts_matrix(400, 50))
    disk = tmp_path / "disk"
    real = _can_mount_tmpfs(disk)
    if real:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    else:
        disk.mkdir()
        free = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: free(p)._replace(free=16384))
    try:
        out = disk / "counts.h5ad"
        out.write_bytes(b"the previous output")
        done = run_main("prepare", str(source), "--out", str(out))
        assert_one_line_error(done, f"scvae-torch prepare: error: {out}: not enough space to write it", code=1)
        assert out.read_bytes() == b"the previous output" and sorted(p.name for p in disk.iterdir()) == [out.name]
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=True)


# ---- damaged checkpoints ---------------------------------------------------------------------------

def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "foreign":  # a readable torch file that is not a checkpoint
        torch.save({"weights": torch.zeros(3)}, path)
    elif how == "best-not-resumable":  # a readable model file without the optimiser state
        path.write_bytes((path.parent / "best.pt").read_bytes())


@FAULT
@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "foreign", "best-not-resumable"])
def test_damaged_checkpoint_warns_naming_it_and_resumes_from_the_previous(tmp_path, small, fit_reference, caplog,
                                                                          how):
    out = tmp_path / "run"
    fit(*small, MODEL, TrainConfig(epochs=3, **FIT), out)
    assert load_checkpoint(out / "checkpoint.prev.pt")["epoch"] == 2
    _damage(out / "checkpoint.pt", how)
    with caplog.at_level(logging.WARNING, logger="scvae_torch.training"):
        fit(*small, MODEL, TrainConfig(epochs=5, **FIT), out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(out / "checkpoint.pt") in warnings[0] and str(out / "checkpoint.prev.pt") in warnings[0]
    assert "(epoch 2)" in warnings[0]
    assert_same_run(fit_reference, out)
    assert load_checkpoint(out / "checkpoint.prev.pt")["epoch"] == 4  # the damaged file was not kept as 'previous'


@REFUSAL
def test_checkpoint_and_previous_both_damaged_is_one_line_naming_both(tmp_path, small, cli_data, cli_reference):
    out = tmp_path / "run"
    fit(*small, MODEL, TrainConfig(epochs=2, **FIT), out)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        _damage(out / name, "truncated")
    with pytest.raises(TrainingError) as caught:
        fit(*small, MODEL, TrainConfig(epochs=3, **FIT), out)
    message = str(caught.value)
    assert "\n" not in message
    assert str(out / "checkpoint.pt") in message and str(out / "checkpoint.prev.pt") in message
    # the same through the command line: exit 2, one line, nothing else written
    run = tmp_path / "cli"
    run.mkdir()
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "best.pt", "history.tsv", "split.tsv"):
        (run / name).write_bytes((cli_reference / name).read_bytes())
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        _damage(run / name, "garbage")
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    failed = run_main(*train_args(cli_data, run, EPOCHS + 1))
    assert_one_line_error(failed, str(run / "checkpoint.pt"), str(run / "checkpoint.prev.pt"), code=2)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"} == files
    cases(2)


@REFUSAL
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, small):
    """A damaged checkpoint.pt with no previous one to fall back on."""
    X, tr, va = small
    fit(X, tr, va, MODEL, TrainConfig(epochs=1), tmp_path)
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainingError, match="checkpoint.pt: not a readable"):
        fit(X, tr, va, MODEL, TrainConfig(epochs=2), tmp_path)


@REFUSAL
def test_evaluate_with_a_damaged_model_file_is_one_line(tmp_path, cli_data, cli_reference):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "checkpoint.pt", "split.tsv"):
        (run / name).write_bytes((cli_reference / name).read_bytes())
    _damage(run / "best.pt", "truncated")
    failed = run_main("evaluate", str(run), "--data", str(cli_data), "--out", str(tmp_path / "eval"), "--device", "cpu")
    assert_one_line_error(failed, str(run / "best.pt"), code=2)
    assert not list((tmp_path / "eval").glob("*"))


# ---- two trainings on one folder -------------------------------------------------------------------

@REFUSAL
def test_second_training_on_same_folder_is_refused(tmp_path, small):
    X, tr, va = small
    with folder_lock(tmp_path):
        with pytest.raises(TrainingError, match="another training"):
            fit(X, tr, va, MODEL, TrainConfig(epochs=1), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


@FAULT
def test_two_trainings_at_once_on_the_command_line_the_second_refuses_and_nothing_is_mixed(tmp_path, cli_data,
                                                                                           cli_reference):
    """B (other settings) starts while A trains: B exits 2 with one line, writes nothing; A ends identical."""
    out, marker, release = tmp_path / "run", tmp_path / "reached", tmp_path / "release"
    first = start(train_args(cli_data, out), fault="hold:checkpoint-write:3", marker=marker, release=release)
    wait_until(marker.exists, first, "the first training's third checkpoint")
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    second = cli(*train_args(cli_data, out, EPOCHS, "--seed", "9"))
    assert_one_line_error(second, "another training is already writing", str(out), code=2)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    release.touch()
    _, stderr = first.communicate(timeout=900)
    assert first.returncode == 0, stderr
    assert_same_run(cli_reference, out)


# ---- non-finite losses -----------------------------------------------------------------------------

def _poison(monkeypatch, call: int, term: str) -> None:
    """Make the VAE's `call`-th forward pass (counting from now) return NaN for `term`."""
    from scvae_torch.models import VAE

    original = VAE.forward
    calls = {"n": 0}

    def poisoned(self, x, **kw):
        out = original(self, x, **kw)
        calls["n"] += 1
        if self.training and calls["n"] == call:
            out[term] = out[term] * float("nan")
        return out

    monkeypatch.setattr(VAE, "forward", poisoned)


@FAULT
def test_non_finite_loss_stops_naming_epoch_and_keeps_last_checkpoint(tmp_path, small, monkeypatch):
    X, tr, va = small
    cfg = TrainConfig(epochs=5, batch_size=32, lr=1e-3, seed=0, checkpoint_every=1)
    fit(X, tr, va, MODEL, TrainConfig(epochs=1, batch_size=32, lr=1e-3, seed=0, checkpoint_every=1), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    _poison(monkeypatch, 3, "loss")
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2, minibatch 3"):
        fit(X, tr, va, MODEL, cfg, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@FAULT
def test_non_finite_terms_stop_at_the_epoch_end_as_on_a_gpu(tmp_path, small, monkeypatch):
    """The check a GPU run relies on (it reads no loss per minibatch): the epoch's summed ELBO terms."""
    X, tr, va = small
    fit(X, tr, va, MODEL, TrainConfig(epochs=1, batch_size=32, lr=1e-3, seed=0, checkpoint_every=1), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    _poison(monkeypatch, 2, "elbo")  # the loss stays finite: only the end-of-epoch check can see this
    with pytest.raises(TrainingError, match=r"non-finite loss \(ELBO terms\) in epoch 2"):
        fit(X, tr, va, MODEL, TrainConfig(epochs=3, batch_size=32, lr=1e-3, seed=0, checkpoint_every=1), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


@FAULT
def test_non_finite_validation_elbo_stops_naming_the_epoch(tmp_path, small, monkeypatch):
    X, tr, va = small
    fit(X, tr, va, MODEL, TrainConfig(epochs=2, **FIT), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    real = training.evaluate_terms
    monkeypatch.setattr(training, "evaluate_terms",
                        lambda *a, **k: {**real(*a, **k), "elbo": float("nan")})
    with pytest.raises(TrainingError, match=r"non-finite validation ELBO at epoch 3"):
        fit(X, tr, va, MODEL, TrainConfig(epochs=4, **FIT), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


@FAULT
def test_diverging_learning_rate_is_caught_or_stays_finite(tmp_path, small):
    """At an absurd learning rate the run either stays finite or stops with the epoch named; never NaN silently."""
    X, tr, va = small
    try:
        fit(X, tr, va, MODEL, TrainConfig(epochs=3, batch_size=32, lr=1e3, seed=0), tmp_path)
    except TrainingError as err:
        assert "epoch" in str(err)
    else:
        h = pd.read_csv(tmp_path / "history.tsv", sep="\t")
        assert np.isfinite(h.drop(columns="seconds").to_numpy()).all()


@FAULT
@pytest.mark.parametrize("likelihood", ["poisson", "nb", "zip", "zinb"])
def test_learning_rate_that_diverges_is_stopped_by_the_guard_with_the_epoch_named(tmp_path, small, likelihood):
    """lr = 1e20 overflows within two minibatches for every likelihood: the guard stops it, nothing is saved."""
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1, minibatch \d+: stopped"):
        fit(*small, {**MODEL, "likelihood": likelihood}, TrainConfig(epochs=3, batch_size=32, lr=1e20, seed=0),
            tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "history.tsv").exists()


@FAULT
def test_diverging_training_on_the_command_line_is_one_line(tmp_path, cli_data):
    failed = run_main(*[a if a != "1e-3" else "1e20" for a in train_args(cli_data, tmp_path / "run")])
    assert_one_line_error(failed, "scvae-torch train: error: non-finite loss at epoch 1", code=2)
