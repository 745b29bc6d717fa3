"""A run knows what it was trained on: genes, split and settings are recorded and checked on resume and in
`evaluate`; degenerate plans and runs that cannot be evaluated are refused in one line. Each case is one command
an error-prone user would type; each ends in the correct result or one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from reliability_support import (
    GUARANTEE,
    REFUSAL,
    ROOT,
    assert_one_line_error,
    cases,
    run_main,
    stderr_lines,
    write_h5ad,
)

pytestmark = pytest.mark.reliability

GENES = 10


def train_args(data: Path, out: Path, epochs: int = 2, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "vae", "--likelihood", "poisson",
            "--encoder", "8", "--decoder", "8", "--latent", "2", "--epochs", str(epochs), "--batch-size", "32",
            "--lr", "1e-2", "--checkpoint-every", "1", "--device", "cpu", "--threads", "1", *extra]


def eval_args(run: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", str(run), "--data", str(data), "--out", str(out), "--device", "cpu", "--iw-samples", "3",
            *extra]


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (but the lock) and its bytes; {} when the folder does not exist."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file() and p.name != ".lock"} \
        if folder.exists() else {}


def refused(args: list[str], *needles: str, unchanged: Path | None = None, absent: Path | None = None) -> str:
    """The command exits 2 with one error line holding every needle; `unchanged` keeps its files; `absent` is
    not created."""
    before = files(unchanged) if unchanged is not None else None
    done = run_main(*args)
    line = assert_one_line_error(done, *needles, code=2)
    if unchanged is not None:
        assert files(unchanged) == before, "a refused command changed the run folder"
    if absent is not None:
        assert not absent.exists() or not any(absent.iterdir()), list(absent.iterdir())
    return line


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """300 cells x 10 genes, gene j ~ Poisson(j + 1): a model that fits them depends on each gene's column."""
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(np.arange(1, GENES + 1), size=(300, GENES)).astype(np.float32))
    return write_h5ad(tmp_path_factory.mktemp("data") / "counts.h5ad", X)


def variant(data: Path, where: Path, name: str, change) -> Path:
    """A copy of the data with change(adata) applied."""
    adata = ad.read_h5ad(data)
    adata = change(adata)
    path = where / name
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A finished 2-epoch run (default split saved in the folder)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    done = run_main(*train_args(data, out))
    assert done.returncode == 0, done.stderr
    return out


def copy_run(trained: Path, where: Path) -> Path:
    run = where / "run"
    shutil.copytree(trained, run)
    return run


def other_split(data: Path, path: Path, seed: int = 7) -> Path:
    from scvae_torch.data import make_split, write_split

    write_split(make_split(ad.read_h5ad(data).obs_names.to_numpy(), seed=seed), str(path))
    return path


# ---- what the run records -----------------------------------------------------------------------------

@GUARANTEE
def test_the_run_records_its_genes_and_split(trained, data):
    """run.json: the genes in column order, the split's fingerprint equal to one computed from split.tsv."""
    from scvae_torch.data import read_split
    from scvae_torch.provenance import split_fingerprint

    record = json.loads((trained / "run.json").read_text())
    assert record["genes"] == [f"g{i}" for i in range(GENES)]
    cells = ad.read_h5ad(data).obs_names.to_numpy()
    assert record["split"] == split_fingerprint(cells, read_split(str(trained / "split.tsv"), cells))
    # the fingerprint is independent of the order of the cells: a reference over the sorted (cell, subset) pairs
    import hashlib

    table = pd.read_csv(trained / "split.tsv", sep="\t", dtype=str).sort_values("cell")
    text = "".join(f"{c}\t{s}\n" for c, s in zip(table["cell"], table["subset"]))
    assert record["split"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert (record["split"]["train"], record["split"]["validation"], record["split"]["test"]) == (243, 27, 30)


@GUARANTEE
def test_a_given_split_is_kept_in_the_run_folder_for_evaluate(tmp_path, data):
    split = other_split(data, tmp_path / "mine.tsv")
    done = run_main(*train_args(data, tmp_path / "run", 1, "--split", str(split)))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "split.tsv").read_bytes() == split.read_bytes()
    done = run_main(*eval_args(tmp_path / "run", data, tmp_path / "eval"))  # the run's own split, by default
    assert done.returncode == 0, done.stderr


# ---- settings on resume ---------------------------------------------------------------------------

@REFUSAL
@pytest.mark.parametrize("option,value,name", [("--lr", "1e-3", "lr"), ("--batch-size", "16", "batch_size"),
                                               ("--seed", "3", "seed"), ("--kl-warmup", "2", "kl_warmup")])
def test_resume_with_another_setting_is_refused_naming_it(tmp_path, trained, data, option, value, name):
    run = copy_run(trained, tmp_path)
    args = train_args(data, run, 3)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    refused(args, f"{run / 'checkpoint.pt'} was trained with other settings ({name} ", "new --out folder",
            unchanged=run)


@GUARANTEE
def test_resume_may_change_epochs_threads_and_checkpointing(tmp_path, trained, data):
    """The settings that do not change what an epoch computes continue the run (RESUMABLE_SETTINGS)."""
    run = copy_run(trained, tmp_path)
    args = train_args(data, run, 3)
    args[args.index("--checkpoint-every") + 1] = "2"
    done = run_main(*args, "--stream", "on")
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "metrics.json").read_text())["epochs_trained"] == 3


@REFUSAL
def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    refused(train_args(data, run, 1), "has already trained 2 epochs, more than the 1 asked for", unchanged=run)


@GUARANTEE
def test_library_settings_check_covers_every_field_but_the_resumable_ones():
    """A TrainConfig field added later is compared by default: every field outside RESUMABLE_SETTINGS, changed
    alone, is refused; every field inside is accepted."""
    from dataclasses import asdict, fields

    from scvae_torch.config import TrainConfig
    from scvae_torch.provenance import RESUMABLE_SETTINGS, check_resume_settings
    from scvae_torch.training import TrainingError

    base = TrainConfig(epochs=5, batch_size=100, pretrain_epochs=1)  # the data-dependent defaults (None) given a value
    n = 0
    for f in fields(TrainConfig):
        value = getattr(base, f.name)
        if isinstance(value, bool):
            new = not value
        elif isinstance(value, (int, float)):
            new = value + 1
        else:
            new = {"device": "cpu", "precision": "bfloat16", "stream": "on"}.get(f.name, value)
        if new == value:
            continue
        tc = TrainConfig(**{**asdict(base), f.name: new})
        if f.name in RESUMABLE_SETTINGS:
            check_resume_settings(asdict(base), tc, "c.pt", epoch=1)
        else:
            with pytest.raises(TrainingError, match=f"{f.name} "):
                check_resume_settings(asdict(base), tc, "c.pt", epoch=1)
        n += 1
    assert n == len(fields(TrainConfig))
    cases(n)


# ---- genes ----------------------------------------------------------------------------------------------

@GUARANTEE
def test_reversed_gene_order_evaluates_to_the_same_elbo(tmp_path, trained, data):
    """The same genes in reverse order are put back in the model's order by name: the same test ELBO, the same
    importance-weighted log-likelihood and the same feature table (names included), in memory and streamed."""
    rev = variant(data, tmp_path, "reversed.h5ad", lambda a: a[:, ::-1].copy())
    assert list(ad.read_h5ad(rev).var_names) == [f"g{i}" for i in reversed(range(GENES))]
    reference = run_main(*eval_args(trained, data, tmp_path / "a"))
    assert reference.returncode == 0, reference.stderr
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for mode in ("off", "on"):
        done = run_main(*eval_args(trained, rev, tmp_path / mode, "--stream", mode))
        assert done.returncode == 0, done.stderr
        assert "reordered by name" in done.stderr
        b = json.loads((tmp_path / mode / "metrics.json").read_text())
        assert b["elbo"] == pytest.approx(a["elbo"], rel=1e-6) and b["iw_log_lik"] == pytest.approx(a["iw_log_lik"],
                                                                                                    rel=1e-6)
        assert (tmp_path / mode / "feature_means.tsv").read_text() == (tmp_path / "a" / "feature_means.tsv").read_text()
    cases(2)


@REFUSAL
@pytest.mark.parametrize("how", ["renamed", "fewer", "extra"])
def test_other_genes_are_one_line_in_evaluate_and_resume(tmp_path, trained, data, how):
    def change(a):
        if how == "renamed":
            a.var_names = [f"x{i}" for i in range(GENES)]
            return a
        if how == "fewer":
            return a[:, :GENES - 2].copy()
        return ad.concat([a, ad.AnnData(X=sp.csr_matrix(a.X[:, :1]), obs=a.obs[[]],
                                        var=pd.DataFrame(index=["extra"]))], axis=1)

    other = variant(data, tmp_path, f"{how}.h5ad", change)
    needle = {"renamed": "10 of the model's 10 genes are missing", "fewer": "2 of the model's 10 genes are missing",
              "extra": "1 genes are not in the model"}[how]
    refused(eval_args(trained, other, tmp_path / "eval"), str(other), needle, absent=tmp_path / "eval")
    run = copy_run(trained, tmp_path)
    refused(train_args(other, run, 3), needle, "was trained on other genes", unchanged=run)
    cases(2)


# ---- the split ------------------------------------------------------------------------------------------

@REFUSAL
def test_resume_with_another_split_is_refused(tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    split = other_split(data, tmp_path / "other.tsv")
    refused(train_args(data, run, 3, "--split", str(split)), "not the split the run", unchanged=run)


@REFUSAL
def test_evaluate_with_a_split_whose_test_cells_were_trained_on_is_refused(tmp_path, trained, data):
    split = other_split(data, tmp_path / "other.tsv")
    line = refused(eval_args(trained, data, tmp_path / "eval", "--split", str(split)),
                   "test cells were training or validation cells of the run", absent=tmp_path / "eval")
    # the count in the message against an independent count from the two files
    ours = pd.read_csv(trained / "split.tsv", sep="\t").set_index("cell")["subset"]
    theirs = pd.read_csv(split, sep="\t").set_index("cell")["subset"]
    seen = int((ours[theirs.index[theirs == "test"]] != "test").sum())
    assert f"{seen} of its 30 test cells" in line


@GUARANTEE
def test_evaluate_with_a_split_of_only_unseen_test_cells_is_allowed(tmp_path, trained, data):
    """Another split is fine when none of its test cells were seen in training (here: the run's test cells)."""
    ours = pd.read_csv(trained / "split.tsv", sep="\t")
    ours["subset"] = np.where(ours["subset"] == "test", "test", "validation")
    ours.to_csv(tmp_path / "mine.tsv", sep="\t", index=False)
    done = run_main(*eval_args(trained, data, tmp_path / "eval", "--split", str(tmp_path / "mine.tsv")))
    assert done.returncode == 0, done.stderr


@REFUSAL
def test_evaluate_on_a_split_without_test_cells_is_refused(tmp_path, trained, data):
    table = pd.read_csv(trained / "split.tsv", sep="\t")
    table["subset"] = np.where(table["subset"] == "test", "train", table["subset"])
    table.to_csv(tmp_path / "no_test.tsv", sep="\t", index=False)
    refused(eval_args(trained, data, tmp_path / "eval", "--split", str(tmp_path / "no_test.tsv")), "no test cells",
            absent=tmp_path / "eval")


@GUARANTEE
def test_prepare_warns_about_a_split_without_test_or_validation_cells(tmp_path, data):
    for fractions, word in (("0.5,0.5,0", "no test cells"), ("0.9,0,0.1", "no validation cells")):
        done = run_main("prepare", str(data), "--out", str(tmp_path / "c.h5ad"), "--split", str(tmp_path / "s.tsv"),
                        "--split-fractions", fractions)
        assert done.returncode == 0, done.stderr
        assert any(word in line for line in stderr_lines(done)), done.stderr
    cases(2)


@REFUSAL
def test_stratified_split_with_an_empty_subset_is_refused(tmp_path):
    """80 labels of 5 cells: each gives 4 train and 1 test cell, none to validation."""
    rng = np.random.default_rng(1)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(2, size=(400, 5)).astype(np.float32)),
                       obs=pd.DataFrame({"type": [f"t{i // 5}" for i in range(400)]},
                                        index=[f"c{i}" for i in range(400)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(5)]))
    adata.write_h5ad(tmp_path / "small_labels.h5ad")
    out = tmp_path / "out"
    out.mkdir()
    refused(["prepare", str(tmp_path / "small_labels.h5ad"), "--labels", "type", "--out", str(out / "c.h5ad"),
             "--split", str(out / "s.tsv"), "--stratify"], "validation subset is empty", "320/0/80",
            unchanged=out)


@GUARANTEE
def test_no_validation_cells_says_best_is_chosen_on_the_training_elbo(tmp_path, data):
    cells = ad.read_h5ad(data).obs_names
    pd.DataFrame({"cell": cells, "subset": ["train"] * 270 + ["test"] * 30}).to_csv(tmp_path / "s.tsv", sep="\t",
                                                                                    index=False)
    done = run_main(*train_args(data, tmp_path / "run", 2, "--split", str(tmp_path / "s.tsv")))
    assert done.returncode == 0, done.stderr
    assert "no validation cells: best.pt is the epoch with the best training ELBO" in done.stderr
    assert "best training ELBO" in done.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    history = pd.read_csv(tmp_path / "run" / "history.tsv", sep="\t")
    assert metrics["best_chosen_on"] == "train"
    assert metrics["best_val_elbo"] == pytest.approx(history["train_elbo"].max())


# ---- degenerate plans -----------------------------------------------------------------------------------

@REFUSAL
def test_batch_size_one_with_batch_norm_is_refused(tmp_path, data):
    args = train_args(data, tmp_path / "run")
    args[args.index("--batch-size") + 1] = "1"
    refused(args, "batch norm cannot train on minibatches of 1 cell", "--no-batch-norm", absent=tmp_path / "run")


@REFUSAL
def test_one_cell_with_batch_norm_is_refused(tmp_path):
    one = write_h5ad(tmp_path / "one.h5ad", sp.csr_matrix(np.ones((1, 4), np.float32)))
    pd.DataFrame({"cell": ["c0"], "subset": ["train"]}).to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    refused(train_args(one, tmp_path / "run", 1, "--split", str(tmp_path / "s.tsv")),
            "batch norm cannot train on 1 training cell", absent=tmp_path / "run")


@REFUSAL
def test_pretraining_not_shorter_than_training_is_refused(tmp_path, data):
    args = train_args(data, tmp_path / "run", 3, "--pretrain-epochs", "3")
    args[args.index("--model") + 1] = "gmvae"
    refused(args, "pretrain_epochs 3 is not shorter than epochs 3", absent=tmp_path / "run")


@REFUSAL
@pytest.mark.parametrize("extra,needle", [(("--dispersion", "gene-cell"), "dispersion 'gene-cell'"),
                                          (("--pretrain-epochs", "1"), "pretrain_epochs 1"),
                                          (("--y-regularisation", "none"), "y_regularisation 'none'")])
def test_options_that_do_not_apply_are_refused(tmp_path, data, extra, needle):
    refused(train_args(data, tmp_path / "run", 2, *extra), "not used by a vae-poisson model", needle,
            absent=tmp_path / "run")


@GUARANTEE
def test_the_library_warns_about_options_that_do_not_apply(tmp_path, data, caplog):
    """The pipeline passes one training config to every model: the library trains and logs one line."""
    from scvae_torch.config import TrainConfig
    from scvae_torch.runs import train_dataset

    with caplog.at_level(logging.WARNING, logger="scvae_torch"):
        train_dataset(str(data), str(tmp_path / "run"), {"model": "vae", "likelihood": "poisson", "encoder": [8],
                                                         "decoder": [8], "latent": 2, "dispersion": "gene-cell"},
                      TrainConfig(epochs=1, batch_size=32, pretrain_epochs=2, device="cpu"))
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1 and "dispersion 'gene-cell'" in lines[0] and "pretrain_epochs 2" in lines[0]


# ---- runs that cannot be evaluated ------------------------------------------------------------------------

@REFUSAL
def test_evaluate_an_untrained_run_is_refused(tmp_path, data):
    done = run_main(*train_args(data, tmp_path / "run", 0))
    assert done.returncode == 0, done.stderr
    refused(eval_args(tmp_path / "run", data, tmp_path / "eval"), "never trained (0 epochs)", absent=tmp_path / "eval")


@REFUSAL
def test_evaluate_a_run_still_training_is_refused(tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    with open(run / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running training holds it
        refused(eval_args(run, data, tmp_path / "eval"), "a training is still writing this folder",
                absent=tmp_path / "eval")
    assert run_main(*eval_args(run, data, tmp_path / "eval")).returncode == 0  # released: evaluated


@REFUSAL
def test_evaluate_a_run_killed_before_its_first_checkpoint_is_refused(tmp_path, trained, data):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "split.tsv", "run.json"):
        shutil.copy(trained / name, run / name)
    refused(eval_args(run, data, tmp_path / "eval"), "no checkpoint.pt", "best.pt alone", absent=tmp_path / "eval")


@GUARANTEE
def test_evaluate_an_unfinished_run_says_so(tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    (run / "metrics.json").unlink()  # as a run killed after a checkpoint, before its end
    done = run_main(*eval_args(run, data, tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    assert "the training is unfinished (stopped at epoch 2 of 2)" in done.stderr


# ---- messages that point to the fix -------------------------------------------------------------------

@REFUSAL
def test_duplicate_cell_ids_are_the_datas_problem_and_nothing_is_written(tmp_path, data):
    def dup(a):
        a.obs_names = [f"c{i % 100}" for i in range(a.n_obs)]
        return a

    bad = variant(data, tmp_path, "dup.h5ad", dup)
    refused(train_args(bad, tmp_path / "run"), str(bad), "200 duplicate cell ids", absent=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@REFUSAL
def test_log_normalised_x_with_counts_in_a_layer_suggests_the_layer(tmp_path, data):
    def lognorm(a):
        a.layers["counts"] = a.X.copy()
        a.X = a.X.log1p()
        return a

    bad = variant(data, tmp_path, "lognorm.h5ad", lognorm)
    refused(train_args(bad, tmp_path / "run"), "non-integer values", "layer 'counts'",
            f"scvae-torch prepare {bad} --layer counts", absent=tmp_path / "run")
    line = refused(["prepare", str(bad), "--out", str(tmp_path / "c.h5ad")], "layer 'counts'", "--layer counts")
    assert "--round" not in line and not (tmp_path / "c.h5ad").exists()
    cases(2)


@REFUSAL
def test_a_10x_file_given_to_train_points_to_prepare(tmp_path):
    tenx = ROOT / "tests" / "data" / "10x" / "scanpy_v3_filtered_feature_bc_matrix.h5"
    refused(train_args(tenx, tmp_path / "run"), "not a canonical counts .h5ad", "scvae-torch prepare",
            absent=tmp_path / "run")


@REFUSAL
def test_evaluate_stream_on_a_dense_file_is_one_line_like_train(tmp_path, trained, data):
    dense = variant(data, tmp_path, "dense.h5ad", lambda a: ad.AnnData(X=a.X.toarray(), obs=a.obs, var=a.var))
    line = refused(eval_args(trained, dense, tmp_path / "eval", "--stream", "on"),
                   "streaming needs X stored as a CSR matrix", absent=tmp_path / "eval")
    train_line = refused(train_args(dense, tmp_path / "run", 2, "--stream", "on"))
    assert line.split("error: ", 1)[1] == train_line.split("error: ", 1)[1]
    cases(2)


@REFUSAL
def test_a_failure_before_the_first_checkpoint_does_not_claim_one(tmp_path, data):
    args = [a if a != "1e-2" else "1e20" for a in train_args(data, tmp_path / "run")]
    line = refused(args, "non-finite loss at epoch 1")
    assert "no checkpoint was written" in line and "intact" not in line
