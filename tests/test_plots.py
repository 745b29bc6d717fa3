"""scvae_torch.plots: the float32 underflow levels of Figure 3, and figures drawn from result files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scvae_torch import plots


def test_underflow_levels_match_float32_exp():
    """Checked against float32 arithmetic itself: exp(-B) leaves the normal range, then becomes 0."""
    levels = plots.float32_underflow_levels()
    tiny = np.finfo(np.float32).tiny
    with np.errstate(under="ignore"):
        assert np.exp(np.float32(-(levels["normal"] - 0.01))) >= tiny
        assert 0 < np.exp(np.float32(-(levels["normal"] + 0.01))) < tiny
        assert np.exp(np.float32(-(levels["subnormal"] - 0.01))) > 0
        assert np.exp(np.float32(-(levels["subnormal"] + 1.0))) == 0
    assert levels["normal"] == pytest.approx(87.34, abs=0.01)
    assert levels["subnormal"] == pytest.approx(103.28, abs=0.01)


def _history(path, epochs=5):
    e = np.arange(1, epochs + 1)
    frame = pd.DataFrame({"epoch": e, "kl_weight": 1.0, "train_elbo": -50 + e, "train_log_lik": -45 + e,
                          "train_kl_z": 5.0, "train_kl_y": 0.0, "val_elbo": -49 + e, "val_log_lik": -44 + e,
                          "val_kl_z": 5.0, "val_kl_y": 0.0, "val_zero_rate_sum": 200.0 / e, "val_max_rate": 10.0 * e,
                          "seconds": 0.1})
    frame.to_csv(path, sep="\t", index=False)


def _is_png(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.format == "PNG" and round(image.info["dpi"][0]) >= plots.DPI


def test_figures_2_and_3_and_learning_curves(tmp_path):
    run = tmp_path / "vae-poisson"
    run.mkdir()
    _history(run / "history.tsv")
    (run / "metrics.json").write_text("{}")
    pd.DataFrame({"feature": [f"g{i}" for i in range(10)], "observed_mean": np.arange(1, 11.0),
                  "decoded_mean": np.arange(1, 11.0) * 1.01}).to_csv(tmp_path / "means.tsv", sep="\t", index=False)
    (tmp_path / "truth.json").write_text(json.dumps({"kind": "poisson-check", "truth": {"rates": list(range(1, 11))}}))
    plots.figure2(str(run / "metrics.json"), str(tmp_path / "means.tsv"), str(tmp_path / "truth.json"),
                  str(tmp_path / "f2.png"), str(tmp_path / "f2.pdf"))
    plots.figure3(str(run), str(tmp_path / "f3.png"), str(tmp_path / "f3.pdf"))
    plots.learning_curves({"vae-poisson": str(run / "history.tsv")}, str(tmp_path / "lc.png"))
    for name in ("f2.png", "f3.png", "lc.png"):
        assert _is_png(tmp_path / name)
    assert (tmp_path / "f3.pdf").read_bytes()[:5] == b"%PDF-"


def test_same_results_give_byte_identical_figures(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _history(run / "history.tsv")
    for i in (1, 2):
        plots.figure3(str(run), str(tmp_path / f"a{i}.png"), str(tmp_path / f"a{i}.pdf"))
    assert (tmp_path / "a1.png").read_bytes() == (tmp_path / "a2.png").read_bytes()
    assert (tmp_path / "a1.pdf").read_bytes() == (tmp_path / "a2.pdf").read_bytes()
