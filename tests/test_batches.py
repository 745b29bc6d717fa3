"""Minibatch sources and the sparse-aware ELBO: sparse == dense (values and gradients, float64), streamed ==
in memory, seeded block order, exact resume when streaming, bfloat16 and torch.compile options."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvae_torch import batches, data, training
from scvae_torch.batches import MemorySource, StreamSource, torch_csr
from scvae_torch.models import build_model, log_px, tile_rows
from scvae_torch.runs import train_dataset
from scvae_torch.training import TrainConfig, TrainingError, fit, load_checkpoint, streams

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")
FIXTURE = Path(__file__).parent / "data" / "10x" / "scanpy_v3_filtered_feature_bc_matrix.h5"


def _random_counts(n=60, g=40, density=0.15, seed=0) -> sp.csr_matrix:
    """Sparse heavy-tailed counts, with an all-zero cell and an explicitly stored zero."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=density, format="csr", random_state=seed, dtype=np.float64)
    X.data = np.ceil(np.exp(rng.normal(0.5, 1.5, X.nnz)))
    X = X.tolil()
    X[3, :] = 0
    X = X.tocsr().astype(np.float32)
    X.data[0] = 0.0  # stored zero: must count as a zero
    return X


@pytest.fixture(scope="module")
def real_counts() -> sp.csr_matrix:
    """The first 120 cells of scanpy's 10x v3 fixture (BSD-3), counts up to 36."""
    return data.read_10x_h5(str(FIXTURE)).X[:120].tocsr()


def _h5ad(X: sp.csr_matrix, path: Path, labels=None) -> Path:
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(X.shape[0])])
    if labels is not None:
        obs["label"] = pd.Categorical(labels)
    anndata.AnnData(X=X, obs=obs).write_h5ad(path)
    return path


def test_memory_source_batches_are_the_rows_asked_for():
    X = _random_counts()
    rows = np.array([5, 3, 3, 59, 0, 17])  # unsorted, repeated, the empty cell
    batch = MemorySource(X).batch(rows)
    expected = torch.from_numpy(X.toarray()[rows])
    assert torch.equal(batch.x, expected)
    assert batch.counts.layout == torch.sparse_csr
    assert torch.equal(batch.counts.to_dense(), expected)


def test_tile_rows_stacks_copies_of_the_minibatch():
    X = _random_counts(n=7, g=9)
    t = torch_csr(X.indptr, X.indices, X.data, X.shape)
    expected = np.tile(X.toarray(), (3, 1))
    assert np.array_equal(tile_rows(t, 3).to_dense().numpy(), expected)
    assert np.array_equal(tile_rows(torch.from_numpy(X.toarray()), 3).numpy(), expected)


def _elbo_and_grads(model, x, counts, seed=0, **kwargs):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x, counts=counts, **kwargs)
    out["loss"].backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("which", ["random", "10x"])
@pytest.mark.parametrize("model_name,likelihood,dispersion", [
    ("vae", "poisson", "gene"), ("vae", "nb", "gene"), ("vae", "zip", "gene"), ("vae", "zinb", "gene-cell"),
    ("gmvae", "nb", "gene-cell"), ("gmvae", "zinb", "gene")])
def test_sparse_likelihood_gives_the_dense_elbo_and_gradients(which, model_name, likelihood, dispersion,
                                                             real_counts):
    X = _random_counts() if which == "random" else real_counts
    torch.manual_seed(1)
    model = build_model(dict(n_features=X.shape[1], model=model_name, likelihood=likelihood, dispersion=dispersion,
                             encoder=[16], decoder=[16], latent=3, components=4, library_size=which == "10x"))
    model = model.double().train()
    batch = MemorySource(X).batch(np.arange(X.shape[0]))
    x = batch.x.double()
    dense, dense_grads = _elbo_and_grads(model, x, None)
    sparse, sparse_grads = _elbo_and_grads(model, x, batch.counts)
    for key in ("elbo", "log_lik", "kl_z", "kl_y", "loss"):
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-12, atol=1e-9)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("model_name", ["vae", "gmvae"])
def test_sparse_importance_weighted_log_likelihood_equals_dense(model_name):
    X = _random_counts(n=20)
    torch.manual_seed(2)
    model = build_model(dict(n_features=X.shape[1], model=model_name, likelihood="zinb", encoder=[8], decoder=[8],
                             latent=2, components=3)).double().eval()
    batch = MemorySource(X).batch(np.arange(X.shape[0]))
    torch.manual_seed(3)
    dense = model.iw_log_likelihood(batch.x.double(), 5)
    torch.manual_seed(3)
    sparse = model.iw_log_likelihood(batch.x.double(), 5, counts=batch.counts)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-9)


def test_streamed_batches_equal_the_matrix_and_memory_stays_bounded(tmp_path):
    X = _random_counts(n=1000, g=30, density=0.2)
    source = StreamSource(_h5ad(X, tmp_path / "x.h5ad"), block_cells=16, blocks_per_chunk=4)
    assert source.shape == X.shape
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = rng.choice(1000, size=37, replace=False)
        batch = source.batch(rows)
        expected = torch.from_numpy(X.toarray()[rows])
        assert torch.equal(batch.x, expected)
        assert torch.equal(batch.counts.to_dense(), expected)
        assert len(source._cache) <= 37 + 4  # a minibatch's blocks and a chunk more, whatever the number of cells


def test_stream_epoch_order_is_seeded_block_shuffle_read_once(tmp_path):
    X = _random_counts(n=1000, g=10, density=0.3)
    source = StreamSource(_h5ad(X, tmp_path / "x.h5ad"), block_cells=16, blocks_per_chunk=4)
    rows = np.sort(np.random.default_rng(1).choice(1000, size=700, replace=False))
    order = source.epoch_order(rows, seed=3, epoch=2)
    assert np.array_equal(np.sort(order), rows)
    assert np.array_equal(order, source.epoch_order(rows, seed=3, epoch=2))
    assert not np.array_equal(order, source.epoch_order(rows, seed=3, epoch=3))
    assert not np.array_equal(order, source.epoch_order(rows, seed=4, epoch=2))
    # chunks: all cells of the first 4 blocks visited come before any cell of another block
    blocks = order // 16
    first = blocks[np.sort(np.unique(blocks, return_index=True)[1])][:4]
    k = np.isin(blocks, first).sum()
    assert set(blocks[:k]) == set(first)
    for start in range(0, len(order), 50):  # one epoch of minibatches reads each block once
        source.batch(order[start:start + 50])
    assert source.blocks_read == len(np.unique(rows // 16))


def test_streamed_training_resumes_exactly_and_auto_streams_above_threshold(tmp_path, caplog):
    X = _random_counts(n=400, g=25, density=0.3)
    path = _h5ad(X, tmp_path / "x.h5ad")
    model = {"model": "vae", "likelihood": "nb", "encoder": [8], "decoder": [8], "latent": 2}
    cfg = dict(batch_size=32, lr=1e-3, seed=5, checkpoint_every=1, stream="on")
    train_dataset(str(path), str(tmp_path / "a"), model, TrainConfig(epochs=4, **cfg))
    train_dataset(str(path), str(tmp_path / "b"), model, TrainConfig(epochs=2, **cfg))
    metrics = train_dataset(str(path), str(tmp_path / "b"), model, TrainConfig(epochs=4, **cfg))
    assert metrics["data_source"].startswith("streamed")
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt")["model_state"] for d in "ab")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not streams(str(path), TrainConfig())
    assert streams(str(path), TrainConfig(stream_above_gb=1e-6))
    dense_file = tmp_path / "dense.h5ad"
    anndata.AnnData(X=X.toarray()).write_h5ad(dense_file)
    assert not streams(str(dense_file), TrainConfig(stream_above_gb=1e-6))  # loaded, not streamed
    with pytest.raises(TrainingError, match="dense.h5ad: streaming needs X stored as a CSR matrix"):
        train_dataset(str(dense_file), str(tmp_path / "c"), model, TrainConfig(epochs=1, stream="on"))


def test_bfloat16_keeps_the_likelihood_in_float32():
    torch.manual_seed(0)
    X = _random_counts(n=16, g=12)
    batch = MemorySource(X).batch(np.arange(16))
    params = {"log_mean": torch.randn(16, 12).bfloat16(), "log_theta": torch.randn(12),
              "logit_pi": torch.randn(16, 12).bfloat16()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = log_px("zinb", batch.counts, params)
    assert value.dtype == torch.float32
    expected = log_px("zinb", batch.counts, {k: v.float() for k, v in params.items()})
    torch.testing.assert_close(value, expected)


def test_bfloat16_training_runs_and_records_it(tmp_path):
    X = _random_counts(n=200, g=20, density=0.3)
    model = {"model": "gmvae", "likelihood": "nb", "encoder": [8], "decoder": [8], "latent": 2, "components": 2}
    metrics = fit(X, np.arange(160), np.arange(160, 200), model,
                  TrainConfig(epochs=2, batch_size=32, lr=1e-3, precision="bfloat16"), tmp_path)
    assert np.isfinite(metrics["best_val_elbo"])
    assert metrics["train_precision"] == "bfloat16"


def test_compile_falls_back_to_eager_where_unavailable(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    X = _random_counts(n=100, g=15, density=0.3)
    model = {"model": "vae", "likelihood": "poisson", "encoder": [8], "decoder": [8], "latent": 2}
    with caplog.at_level(logging.WARNING, logger="scvae_torch.training"):
        metrics = fit(X, np.arange(80), np.arange(80, 100), model,
                      TrainConfig(epochs=1, batch_size=20, compile=True), tmp_path)
    assert metrics["compiled"] is False
    assert "torch.compile is unavailable here (RuntimeError: no C++ compiler found)" in caplog.text


def test_compile_option_trains_like_eager(tmp_path, monkeypatch):
    """With a working compiler the compile option routes the likelihood through the compiled x = 0 part and
    trains to the eager run's validation ELBO (float32 rounding apart)."""
    try:
        torch.compile(lambda t: t * 2)(torch.ones(2))
    except Exception:  # noqa: BLE001
        pytest.skip("torch.compile does not work on this machine")
    real, calls = torch.compile, []

    def counted(f, **kwargs):  # count the calls of what compile_model compiles
        compiled = real(f, **kwargs)
        return lambda *a: calls.append(1) or compiled(*a)

    monkeypatch.setattr(torch, "compile", counted)
    X = _random_counts(n=100, g=15, density=0.3)
    model = {"model": "vae", "likelihood": "nb", "encoder": [8], "decoder": [8], "latent": 2}
    eager = fit(X, np.arange(80), np.arange(80, 100), model, TrainConfig(epochs=2, batch_size=20), tmp_path / "e")
    assert not calls
    compiled = fit(X, np.arange(80), np.arange(80, 100), model, TrainConfig(epochs=2, batch_size=20, compile=True),
                   tmp_path / "c")
    assert compiled["compiled"] is True and eager["compiled"] is False
    assert len(calls) >= 2 * 4 + 2  # every training minibatch and validation pass (plus the probe)
    assert compiled["best_val_elbo"] == pytest.approx(eager["best_val_elbo"], rel=1e-4)


def test_checkpoint_loads_onto_the_cpu_whatever_device_wrote_it(tmp_path):
    """Tensors are mapped to the device asked for (map_location); a GPU-written file is checked on a GPU run."""
    X = _random_counts(n=80, g=10, density=0.4)
    model = {"model": "vae", "likelihood": "nb", "encoder": [4], "decoder": [4], "latent": 2}
    fit(X, np.arange(60), np.arange(60, 80), model, TrainConfig(epochs=1, batch_size=20), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt", "meta")  # any other device: here the shape-only one
    assert all(t.device.type == "meta" for t in state["model_state"].values())
    loaded = training.load_model(tmp_path, "cpu")
    assert next(loaded.parameters()).device.type == "cpu"


GPU_CHECKPOINT = Path(__file__).parent / "data" / "gpu_checkpoint"


def test_checkpoint_written_on_a_gpu_loads_and_resumes_on_the_cpu(tmp_path):
    model = training.load_model(GPU_CHECKPOINT / "checkpoint.pt", "cpu")
    cells = torch.from_numpy(sp.load_npz(GPU_CHECKPOINT / "cells.npz").toarray())
    expected = torch.from_numpy(np.load(GPU_CHECKPOINT / "expected_latent.npy"))
    torch.testing.assert_close(model.latent(cells).detach(), expected, rtol=1e-4, atol=1e-5)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes((GPU_CHECKPOINT / "checkpoint.pt").read_bytes())
    state = load_checkpoint(GPU_CHECKPOINT / "checkpoint.pt")
    X = _random_counts(n=100, g=200, density=0.1)
    metrics = fit(X, np.arange(80), np.arange(80, 100), state["model_config"],
                  TrainConfig(**{**state["train_config"], "device": "cpu", "epochs": state["epoch"] + 1}),
                  tmp_path / "run")
    assert metrics["epochs_trained"] == state["epoch"] + 1 and metrics["epochs_this_run"] == 1
    assert np.isfinite(metrics["best_val_elbo"])


@pytest.mark.parametrize("low,high", [(-30.0, 20.0), (-0.5, 0.5)])
def test_bounded_has_the_values_and_gradients_of_clamp(low, high):
    from scvae_torch.models import bounded

    t = (torch.randn(50, 7, dtype=torch.float64) * 2).requires_grad_()
    weights = torch.randn(50, 7, dtype=torch.float64)
    (bounded(t, low, high) * weights).sum().backward()
    ours = t.grad.clone()
    t.grad = None
    (t.clamp(low, high) * weights).sum().backward()
    assert torch.equal(bounded(t, low, high), t.clamp(low, high))
    assert torch.equal(ours, t.grad)


def _canonical(tmp_path: Path, X: sp.csr_matrix, name: str = "counts.h5ad") -> str:
    """X written as a canonical counts.h5ad (the format `prepare` writes)."""
    path = str(tmp_path / name)
    n, g = X.shape
    data.write_canonical(data.Counts(X=X.tocsr().astype(np.float32), genes=np.array([f"g{i}" for i in range(g)]),
                                     cells=np.array([f"c{i}" for i in range(n)])), path)
    return path


def test_whole_counts_load_compactly_and_train_the_same(tmp_path, real_counts):
    # uint8 (counts up to 36), then uint16 (a count of 1000); values, minibatches and a short training are
    # those of the float32 matrix.
    for top in (None, 1000.0):
        X = real_counts.copy().astype(np.float32)
        if top:
            X.data[5] = top
        path = _canonical(tmp_path, X, f"c{top}.h5ad")
        compact = batches.load_compact(path)
        assert compact.dtype == (np.uint16 if top else np.uint8)
        assert (compact != data.load_canonical(path).X).nnz == 0
        rows = np.array([7, 0, 5, 119])
        torch.testing.assert_close(MemorySource(compact).batch(rows).x, MemorySource(X).batch(rows).x)
    model = dict(model="vae", likelihood="nb", encoder=[16], decoder=[16], latent=3)
    tc = TrainConfig(epochs=2, batch_size=32, seed=1)
    a = fit(compact, np.arange(100), np.arange(100, 120), model, tc, tmp_path / "a")
    b = fit(X, np.arange(100), np.arange(100, 120), model, tc, tmp_path / "b")
    assert a["best_val_elbo"] == b["best_val_elbo"]


@pytest.mark.parametrize("value", [2.5, 70000.0, -1.0, np.nan])
def test_counts_that_are_not_small_whole_numbers_are_not_loaded_compactly(tmp_path, real_counts, value):
    X = real_counts.copy().astype(np.float64)
    X.data[3] = value
    path = str(tmp_path / "odd.h5ad")
    anndata.AnnData(X=X.tocsr()).write_h5ad(path)  # written directly: prepare would refuse most of these
    assert batches.load_compact(path) is None
    assert batches.compact_counts(X).dtype == np.float32  # kept as float32 (and checked by the reader)


@pytest.mark.parametrize(("value", "problem"), [(-3.0, "negative values"), (2.5, "non-integer values"),
                                                (np.nan, "NaN or infinite values")])
def test_streaming_refuses_values_that_are_not_counts_in_one_line(tmp_path, value, problem):
    # Loading checks the whole matrix up front; streaming checks each block as it reads it (cells 256-383
    # here), stops in one line naming the file, the cells and the problem, and leaves no checkpoint behind.
    X = _random_counts(n=400, g=25, density=0.3).astype(np.float64)
    X = X.tolil()
    X[300, 4] = value
    path = _h5ad(X.tocsr(), tmp_path / "bad.h5ad")
    model = {"model": "vae", "likelihood": "nb", "encoder": [8], "decoder": [8], "latent": 2}
    with pytest.raises(TrainingError) as caught:
        train_dataset(str(path), str(tmp_path / "run"), model, TrainConfig(epochs=2, batch_size=32, stream="on"))
    message = str(caught.value)
    assert "bad.h5ad: cells 256-383 have " + problem in message and "\n" not in message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
