"""Atomic output: every file is written to a temporary name next to it and renamed into place, so a reader (or
a run that was killed) never sees it half-written. The one helper for all of the package's outputs.

Temporary files are named `.NAME.tmpPID.RANDOM[SUFFIX]` in the target's folder (the same file system, so the
rename is atomic); a run folder's leftovers of a killed process match the glob `.*.tmp[0-9]*`.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
from collections.abc import Callable, Iterator


def _create_temporary(path: str, suffix: str) -> str:
    """Create an empty, uniquely named file next to `path` (with the umask's permissions) and return its name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}.{secrets.token_hex(4)}{suffix}")
        try:  # created with the umask's permissions (mkstemp would force 0600)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path next to `path`, renamed onto it on success and removed on failure.

    Parameters
    ----------
    path : str or PathLike
        The file to write; its folder is created when missing.
    suffix : str
        Ending of the temporary name, for writers that look at it (e.g. ".h5ad").

    Yields
    ------
    str
        The temporary path (an existing empty file) to write to.
    """
    path = os.fspath(path)
    tmp = _create_temporary(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:  # rename() leaves both names when they are links to one file (a copy_file onto its own hard link)
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _naming(path: str | os.PathLike, err: OSError) -> OSError:
    """err (e.g. a full disk) as an OSError that names the file the user knows, not the temporary one."""
    return OSError(err.errno, f"could not write ({err.strerror or err})", os.fspath(path))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (flushed to disk before the rename).

    Raises
    ------
    OSError
        The write failed (a full disk...); it names `path`, and `path` is unchanged.
    """
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as err:
        raise _naming(path, err) from None


class _ErrorKeepingWriter:
    """A binary file for torch.save that keeps the OSError of a failed write, which torch replaces."""

    def __init__(self, fh: io.BufferedWriter):
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def torch_save(obj: object, path: str | os.PathLike, before_replace: Callable[[], None] | None = None) -> None:
    """torch.save `obj` atomically (flushed to disk before the rename).

    Parameters
    ----------
    obj : object
        What to save (a checkpoint dict).
    path : str or PathLike
        The file to write.
    before_replace : callable, optional
        Runs once the new file is safely on disk, just before the rename (checkpoint rotation).

    Raises
    ------
    OSError
        The write failed (a full disk...); it names `path`, and `path` is unchanged.
    """
    import torch

    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                # Straight to the file (no in-memory copy: a checkpoint is as large as the model and Adam's state).
                writer = _ErrorKeepingWriter(fh)
                try:
                    torch.save(obj, writer)
                except RuntimeError:  # torch wraps a failed write (e.g. a full disk) in an opaque RuntimeError
                    if writer.error is not None:
                        raise writer.error from None
                    raise
                fh.flush()
                os.fsync(fh.fileno())
            if before_replace is not None:
                before_replace()
    except OSError as err:
        raise _naming(path, err) from None


def write_h5ad(adata, path: str | os.PathLike) -> None:
    """Write an AnnData object as an .h5ad file atomically."""
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Make dest the same content as src (a hard link where the file system allows), replacing it atomically."""
    with atomic_path(dest) as tmp:
        os.remove(tmp)  # os.link needs a free name
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here
            shutil.copyfile(src, tmp)
