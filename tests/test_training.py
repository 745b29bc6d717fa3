"""Training: exact resume after a stop, a kill -9 or a signal; non-finite guard; folder lock; files written."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvae_torch import training
from scvae_torch.training import TrainConfig, TrainingError, TrainingInterrupted, fit, folder_lock, load_checkpoint

MODEL = {"model": "vae", "likelihood": "nb", "encoder": [16], "decoder": [16], "latent": 2}
GMVAE = {"model": "gmvae", "likelihood": "zinb", "encoder": [16], "decoder": [16], "latent": 2, "components": 3}


def _data(n=300, g=20, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(rng.negative_binomial(2, 0.3, size=(n, g)).astype(np.float32))
    idx = rng.permutation(n)
    return X, idx[: int(0.8 * n)], idx[int(0.8 * n):]


def _weights(folder):
    return load_checkpoint(folder / "checkpoint.pt")["model_state"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("model", [MODEL, GMVAE], ids=["vae", "gmvae"])
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, model):
    X, tr, va = _data()
    cfg = dict(batch_size=32, lr=1e-3, seed=4, checkpoint_every=1, kl_warmup=3,
               pretrain_epochs=2 if model is GMVAE else 0)
    fit(X, tr, va, model, TrainConfig(epochs=5, **cfg), tmp_path / "a")
    fit(X, tr, va, model, TrainConfig(epochs=3, **cfg), tmp_path / "b")
    fit(X, tr, va, model, TrainConfig(epochs=5, **cfg), tmp_path / "b")
    _assert_same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    ha = pd.read_csv(tmp_path / "a" / "history.tsv", sep="\t")
    hb = pd.read_csv(tmp_path / "b" / "history.tsv", sep="\t")
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hb.drop(columns="seconds"))


def test_signal_mid_epoch_checkpoints_and_resumes_exactly(tmp_path):
    """SIGUSR1 (SLURM's warning) at an arbitrary moment: checkpoint at the minibatch end, exit, resume exactly."""
    X, tr, va = _data(n=2000)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e-3, seed=1, checkpoint_every=10)
    fit(X, tr, va, MODEL, cfg, tmp_path / "a")
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    with pytest.raises(TrainingInterrupted, match="SIGUSR1"):
        fit(X, tr, va, MODEL, cfg, tmp_path / "b")
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["epoch"] < 4
    fit(X, tr, va, MODEL, cfg, tmp_path / "b")
    _assert_same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def _cli_train(data, out, epochs):
    return [sys.executable, "-m", "scvae_torch.cli", "train", "--data", str(data), "--out", str(out),
            "--model", "vae", "--likelihood", "poisson", "--encoder", "32", "--decoder", "32", "--latent", "4",
            "--epochs", str(epochs), "--batch-size", "20", "--lr", "1e-3", "--checkpoint-every", "1",
            "--device", "cpu"]


def test_kill_9_then_rerun_resumes_to_identical_weights(tmp_path):
    from scvae_torch.data import Counts, write_canonical

    X, _, _ = _data(n=1500, g=30)
    data = tmp_path / "counts.h5ad"
    write_canonical(Counts(X=X, genes=np.array([f"g{i}" for i in range(30)]),
                           cells=np.array([f"c{i}" for i in range(1500)])), str(data))
    subprocess.run(_cli_train(data, tmp_path / "a", 6), check=True, capture_output=True)
    proc = subprocess.Popen(_cli_train(data, tmp_path / "b", 6), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.15)
    proc.kill()
    proc.wait()
    done = subprocess.run(_cli_train(data, tmp_path / "b", 6), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _assert_same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_non_finite_loss_stops_naming_epoch_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    X, tr, va = _data()
    cfg = TrainConfig(epochs=5, batch_size=32, lr=1e-3, seed=0, checkpoint_every=1)
    fit(X, tr, va, MODEL, TrainConfig(epochs=1, batch_size=32, lr=1e-3, seed=0, checkpoint_every=1), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    from scvae_torch.models import VAE

    original = VAE.forward
    calls = {"n": 0}

    def poisoned(self, x, **kw):
        out = original(self, x, **kw)
        calls["n"] += 1
        if self.training and calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(VAE, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2, minibatch 3"):
        fit(X, tr, va, MODEL, cfg, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_diverging_learning_rate_is_caught_or_stays_finite(tmp_path):
    """At an absurd learning rate the run either stays finite or stops with the epoch named; never NaN silently."""
    X, tr, va = _data()
    try:
        fit(X, tr, va, MODEL, TrainConfig(epochs=3, batch_size=32, lr=1e3, seed=0), tmp_path)
    except TrainingError as err:
        assert "epoch" in str(err)
    else:
        h = pd.read_csv(tmp_path / "history.tsv", sep="\t")
        assert np.isfinite(h.drop(columns="seconds").to_numpy()).all()


def test_second_training_on_same_folder_is_refused(tmp_path):
    X, tr, va = _data()
    with folder_lock(tmp_path):
        with pytest.raises(TrainingError, match="another training"):
            fit(X, tr, va, MODEL, TrainConfig(epochs=1), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_different_model_in_existing_folder_is_refused(tmp_path):
    X, tr, va = _data()
    fit(X, tr, va, MODEL, TrainConfig(epochs=1), tmp_path)
    with pytest.raises(TrainingError, match="different model"):
        fit(X, tr, va, {**MODEL, "latent": 5}, TrainConfig(epochs=2), tmp_path)


def test_outputs_history_metrics_and_kl_warmup(tmp_path):
    X, tr, va = _data()
    metrics = fit(X, tr, va, MODEL, TrainConfig(epochs=4, kl_warmup=4, batch_size=50, lr=1e-3), tmp_path)
    h = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert list(h["epoch"]) == [1, 2, 3, 4]
    assert list(h["kl_weight"]) == [0.25, 0.5, 0.75, 1.0]
    for col in ("train_elbo", "train_log_lik", "train_kl_z", "val_elbo", "val_log_lik", "val_kl_z",
                "val_zero_rate_sum", "val_max_rate"):
        assert np.isfinite(h[col]).all(), col
    np.testing.assert_allclose(h["val_elbo"], h["val_log_lik"] - h["val_kl_z"] - h["val_kl_y"], rtol=1e-6)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["epochs_trained"] == 4 and on_disk["device"] == "cpu"
    assert on_disk["best_val_elbo"] == pytest.approx(h["val_elbo"].max())
    assert (tmp_path / "best.pt").exists() and metrics["best_epoch"] == int(h["val_elbo"].idxmax()) + 1


def test_zero_rate_sum_is_the_sum_of_rates_on_zero_entries(tmp_path):
    """val_zero_rate_sum = mean over cells of the decoded rates summed over the zero-count entries (the review's B)."""
    X, tr, va = _data()
    fit(X, tr, va, MODEL, TrainConfig(epochs=1, batch_size=50), tmp_path)
    model = training.load_model(tmp_path, which="last")
    with torch.no_grad():
        x = torch.from_numpy(X[va].toarray())
        rate = model.decode(model.latent(x), x)["log_mean"].exp().double().numpy()
    expected = (rate * (X[va].toarray() == 0)).sum(1).mean()
    h = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert h["val_zero_rate_sum"].iloc[-1] == pytest.approx(expected, rel=1e-5)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    X, tr, va = _data()
    fit(X, tr, va, MODEL, TrainConfig(epochs=1), tmp_path)
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainingError, match="checkpoint.pt: not a readable"):
        fit(X, tr, va, MODEL, TrainConfig(epochs=2), tmp_path)
