"""Run `scvae-torch` with one fault planted at an exact moment of a training (for the reliability suite).

    python faulty_cli.py FAULT -- train ...

FAULT is MOMENT:N; the N-th time (1-based) the training reaches MOMENT it
  hold:    creates $RELIABILITY_MARKER and waits (to be killed, or until $RELIABILITY_RELEASE exists);
  enospc:  fails as a full disk does (OSError ENOSPC, no file name).
MOMENTs: checkpoint-write (checkpoint.pt data written, not yet renamed), checkpoint-rotate (checkpoint.prev.pt
replaced, the new checkpoint.pt not yet renamed), history-write (before history.tsv is replaced).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

ACTIONS = ("hold", "enospc")
MOMENTS = ("checkpoint-write", "checkpoint-rotate", "history-write")


def plant(action: str, moment: str, nth: int) -> None:
    """Patch os.fsync / os.replace so that `action` happens at the nth `moment`."""
    seen = {"n": 0}
    real_fsync, real_replace = os.fsync, os.replace

    def due() -> bool:
        seen["n"] += 1
        return seen["n"] == nth

    def act() -> None:
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        Path(os.environ["RELIABILITY_MARKER"]).touch()
        release = Path(os.environ.get("RELIABILITY_RELEASE", "/nonexistent/never"))
        while not release.exists():
            time.sleep(0.02)

    def fsync(fd):
        if moment == "checkpoint-write" and ".checkpoint.pt.tmp" in os.readlink(f"/proc/self/fd/{fd}") and due():
            act()
        return real_fsync(fd)

    def replace(src, dst, **kw):
        name = os.fspath(dst)
        if moment == "history-write" and name.endswith("history.tsv") and due():
            act()
        result = real_replace(src, dst, **kw)
        if moment == "checkpoint-rotate" and name.endswith("checkpoint.prev.pt") and due():
            act()
        return result

    os.fsync, os.replace = fsync, replace


if __name__ == "__main__":
    fault, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: faulty_cli.py ACTION:MOMENT:N -- ARGS"
    action, moment, nth = fault.split(":")
    assert action in ACTIONS and moment in MOMENTS, fault
    plant(action, moment, int(nth))
    from scvae_torch.cli import main

    sys.exit(main(argv))
