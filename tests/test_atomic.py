"""The one atomic-write helper (scvae_torch.io.atomic): complete files or the old ones, and no temporary left."""

from __future__ import annotations

import errno
import os

import pytest

from scvae_torch.io import atomic


def test_write_text_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "sub" / "a.tsv"  # the folder is made
    atomic.write_text(path, "one\n")
    atomic.write_text(path, "two\n")
    assert path.read_text() == "two\n" and os.listdir(path.parent) == ["a.tsv"]


def test_a_failed_write_keeps_the_old_file_and_names_the_target(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        atomic.write_text(path, "new")
    assert caught.value.filename == str(path) and "No space left on device" in str(caught.value)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_an_exception_inside_atomic_path_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.h5ad"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(path, suffix=".h5ad") as tmp:
        assert tmp.endswith(".h5ad") and os.path.basename(tmp).startswith(".a.h5ad.tmp")
        open(tmp, "w").write("half")
        raise RuntimeError("writer failed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.h5ad"]


def test_copy_onto_a_hard_link_of_the_same_file_leaves_no_temporary(tmp_path):
    """rename() of one link onto another of the same file does nothing: the temporary name must still go."""
    src, dest = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    src.write_bytes(b"weights")
    atomic.copy_file(src, dest)
    atomic.copy_file(src, dest)  # dest is now a hard link of src (where the file system allows)
    assert dest.read_bytes() == b"weights" and sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]
