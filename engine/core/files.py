"""Writing a file so that a crash leaves the old content or the new, never a part of either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


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
