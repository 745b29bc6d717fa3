"""Training: exact resume after a stop; a different model refused; files written.

Kill -9, signals, the lock, damaged checkpoints and the non-finite guard: tests/reliability/test_training_faults.py."""

import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvae_torch import training
from scvae_torch.training import TrainConfig, TrainingError, fit, load_checkpoint

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
    # a GMVAE's mixture restart check at the end of a 3-epoch plan is part of that plan (not of a 5-epoch one):
    # here without restarts; a restart across a resume: tests/test_gmvae_options.py
    cfg = dict(batch_size=32, lr=1e-3, seed=4, checkpoint_every=1, kl_warmup=3,
               pretrain_epochs=2 if model is GMVAE else 0, mixture_restarts=0)
    fit(X, tr, va, model, TrainConfig(epochs=5, **cfg), tmp_path / "a")
    fit(X, tr, va, model, TrainConfig(epochs=3, **cfg), tmp_path / "b")
    fit(X, tr, va, model, TrainConfig(epochs=5, **cfg), tmp_path / "b")
    _assert_same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    ha = pd.read_csv(tmp_path / "a" / "history.tsv", sep="\t")
    hb = pd.read_csv(tmp_path / "b" / "history.tsv", sep="\t")
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hb.drop(columns="seconds"))


LR_DROPS = dict(batch_size=120, lr=1e-2, seed=1, patience=2, checkpoint_every=1)


def _parameters(state):
    """A model state's learned parameters (batch-norm running statistics move even at learning rate 0)."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def test_learning_rate_drops_come_at_plateaus_and_end_in_early_stopping(tmp_path):
    """Each cut comes when the validation ELBO (history.tsv) has not beaten its best for `patience` epochs since the
    last cut; the optimiser ends at lr x 0.1^drops; training stops `patience` epochs after the last cut's best."""
    X, tr, va = _data()
    metrics = fit(X, tr, va, MODEL, TrainConfig(epochs=300, lr_drops=2, **LR_DROPS), tmp_path)
    h = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    drops = metrics["lr_drops"]
    assert len(drops) == 2 and metrics["stopped_early"] and metrics["epochs_trained"] < 300
    since = 0
    for d in drops:  # epochs 1..d trained; the best of them is at least `patience` epochs old and after `since`
        best = int(h["val_elbo"][:d].idxmax()) + 1
        assert d - max(best, since) == 2, (d, best, since)
        since = d
    best = int(h["val_elbo"].idxmax()) + 1
    assert metrics["best_epoch"] == best and metrics["epochs_trained"] - max(best, drops[-1]) == 2
    lr = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer_state"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-4)
    none = fit(X, tr, va, MODEL, TrainConfig(epochs=300, lr_drops=0, **LR_DROPS), tmp_path / "none")
    assert none["lr_drops"] == [] and none["epochs_trained"] == drops[0]


def test_a_learning_rate_drop_trains_on_from_best_and_resumes_exactly(tmp_path, monkeypatch):
    """A cut restarts from best.pt's weights (with the rate cut to 0 the parameters stay best.pt's), and a run
    stopped by a signal just after the cut resumes to the uninterrupted run's weights, history and cuts."""
    X, tr, va = _data()
    tc = TrainConfig(epochs=300, lr_drops=1, **LR_DROPS)
    full = fit(X, tr, va, MODEL, tc, tmp_path / "a")
    (drop,) = full["lr_drops"]

    real = training.adam

    def adam_then_signal(model, tc, lr_drops=0):  # SLURM's warning arrives just after the cut
        if lr_drops:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(model, tc, lr_drops)

    monkeypatch.setattr(training, "adam", adam_then_signal)
    with pytest.raises(training.TrainingInterrupted):
        fit(X, tr, va, MODEL, tc, tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == drop
    monkeypatch.setattr(training, "adam", real)
    fit(X, tr, va, MODEL, tc, tmp_path / "b")
    a, b = (load_checkpoint(tmp_path / r / "checkpoint.pt") for r in "ab")
    _assert_same_weights(a["model_state"], b["model_state"])
    assert a["lr_drops"] == b["lr_drops"] == [drop]
    pd.testing.assert_frame_equal(*(pd.read_csv(tmp_path / r / "history.tsv", sep="\t").drop(columns="seconds")
                                    for r in "ab"))

    monkeypatch.setattr(training, "LR_DROP_FACTOR", 0.0)
    frozen = fit(X, tr, va, MODEL, tc, tmp_path / "c")
    assert frozen["lr_drops"] == [drop]  # the same run up to the cut
    # run a's best.pt is still the one from before its cut (checked), so it is the weights run c was cut from
    assert full["best_epoch"] < drop, "the uninterrupted run improved after its cut: pick data where it does not"
    best_then = _parameters(load_checkpoint(tmp_path / "a" / "best.pt")["model_state"])
    _assert_same_weights(best_then, _parameters(_weights(tmp_path / "c")))


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
