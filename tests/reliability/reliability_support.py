"""Shared by the reliability suite: the case kinds and counters behind its summary line, tiny data, CLI runs."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[2]

# What each case proves; conftest.py counts passed cases by kind and prints the summary line.
KINDS = {
    "fault": "faults survived",
    "refusal": "bad inputs refused",
    "fuzz": "fuzz examples tried",
    "guarantee": "guarantees held",
}
FAULT = pytest.mark.reliability(kind="fault")
REFUSAL = pytest.mark.reliability(kind="refusal")
FUZZ = pytest.mark.reliability(kind="fuzz")
GUARANTEE = pytest.mark.reliability(kind="guarantee")

# nodeid -> counts, filled while a test runs (keyed by PYTEST_CURRENT_TEST, so hypothesis needs no fixture)
CASES: collections.Counter = collections.Counter()
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _running_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]


def cases(n: int) -> None:
    """Count n cases in the running test (one test that checks many faults or inputs)."""
    CASES[_running_test()] += n


def tried(outcome: str) -> None:
    """Count one fuzz example of the running test by outcome ('read back exactly' or 'refused in one line')."""
    OUTCOMES[_running_test()][outcome] += 1


# ---- tiny data and the command line --------------------------------------------------------------

def counts_matrix(n: int = 300, g: int = 20, seed: int = 0) -> sp.csr_matrix:
    """A small negative-binomial count matrix (cells x genes), float32 CSR."""
    rng = np.random.default_rng(seed)
    return sp.csr_matrix(rng.negative_binomial(2, 0.3, size=(n, g)).astype(np.float32))


def split_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded 80/20 train/validation row indices."""
    idx = np.random.default_rng(seed).permutation(n)
    return idx[: int(0.8 * n)], idx[int(0.8 * n):]


def write_h5ad(path: Path, X: sp.csr_matrix) -> Path:
    """X as a canonical counts.h5ad (the library's own writer: the format `train` reads)."""
    from scvae_torch.data import Counts, write_canonical

    write_canonical(Counts(X=sp.csr_matrix(X), genes=np.array([f"g{i}" for i in range(X.shape[1])]),
                           cells=np.array([f"c{i}" for i in range(X.shape[0])])), str(path))
    return path


def python_env() -> dict:
    """Environment for subprocesses: this checkout first on the path, one torch thread."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m scvae_torch.cli ARGS` and capture its text output."""
    return subprocess.run([sys.executable, "-m", "scvae_torch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=python_env())


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The non-empty lines a command wrote to stderr."""
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int | None = None) -> str:
    """The command failed with one error line, the last on stderr, holding every needle; no traceback.

    Lines before it may only be the command's own progress lines ('scvae-torch CMD: ...', e.g. prepare's
    'kept 3 of 4 features'); returns the error line."""
    assert proc.returncode != 0, proc.stderr
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = stderr_lines(proc)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and "error" in lines[-1], proc.stderr
    progress = f"{lines[-1].split(':', 1)[0]}: "  # 'scvae-torch train: '
    for line in lines[:-1]:
        assert line.startswith(progress) and "error" not in line.lower(), proc.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def same_weights(a: Path, b: Path) -> None:
    """The model weights of two checkpoint files are bit-identical."""
    import torch

    from scvae_torch.training import load_checkpoint

    wa, wb = load_checkpoint(a)["model_state"], load_checkpoint(b)["model_state"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`scvae-torch ARGS` in this process (no interpreter start-up): exit status and captured text output."""
    import contextlib
    import io

    from scvae_torch.cli import main

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None  # `--threads` must not change later tests' numbers
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        finally:
            if threads:
                torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["scvae-torch", *args], code, out.getvalue(), err.getvalue())
