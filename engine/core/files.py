"""Writing a file so that a crash leaves the old content or the new, never a part of either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["locked", "write_atomic"]


def write_atomic(path: Path, data: bytes, *, durable: bool = False, mode: int | None = None) -> None:
    """``data`` at ``path``: written to a temporary file beside it, then renamed over it. ``durable``: flushed to
    the disk first (fsync), so a power loss, not only a crash, leaves one whole version. ``mode``: the file's
    permissions (else the temporary file's 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def locked(path: Path, *, exclusive_only: bool = False) -> bool | None:
    """Whether a running process holds a lock (``flock``) on ``path``, an exclusive one with ``exclusive_only``;
    None when it cannot be opened (gone meanwhile). The probe's own lock goes with its descriptor."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if exclusive_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
