"""The state directory's secret for the keys of the log of SDK tries (``_endpoint_retry_log``).

A line of that log names its try's content by a hash. A plain SHA-256 of the tenant, route and body let anyone
who can read the state directory confirm a guessed short prompt (hash the guess, look for it); the log's keys are
an HMAC-SHA256 under this secret instead: 32 random bytes in ``retries.secret``, mode 0600, beside the log. It is
made once, atomically (written and fsynced under a temporary name, then linked into place: a crash leaves either
no secret or a whole one, and a second maker never replaces the first's; renamed into place on a filesystem
without hard links, where the state directory's lock keeps a second maker out), and read back at every start, so
that a restarted endpoint computes the same keys and a retry after a restart still takes its try's id. A secret file of
another size (cut by hand, another version) is set aside as ``retries.secret.bad`` and a new one made: the tries
kept under the old one are then not taken by their retries (logged). The secret is never logged. What a crash
left under a temporary name is swept with the directory's other temporary files, by the endpoint that holds its
lock (``EndpointState``): swept here, a second maker's file went from under its link, and that maker failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from engine.core._logkeys import get_logger

__all__ = ["SECRET_BYTES", "SECRET_FILE", "state_secret"]

log = get_logger("smartbatch.endpoint")

SECRET_FILE = "retries.secret"
SECRET_BYTES = 32
_TMP_PREFIX = ".tmp-retries-secret-"


def state_secret(root: Path) -> bytes:
    """The secret of the state directory ``root``, made on first use (see the module docstring); an ``OSError``
    when it can be neither read nor made."""
    root = Path(root)
    path = root / SECRET_FILE
    secret = _read(path)
    if secret is not None:
        return secret
    fd, tmp = tempfile.mkstemp(dir=root, prefix=_TMP_PREFIX)  # 0600, whatever the umask
    try:
        try:
            os.write(fd, os.urandom(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if one is there: never replaces a secret another start made meanwhile
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links (an SMB share, a FUSE mount): the log was off there
            if not path.exists():  # (no other maker: the state directory's lock is held)
                os.rename(tmp, path)  # whole or not at all, as the link
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed into place
            os.unlink(tmp)
    _sync_dir(root)  # its name too, before lines keyed with it are on disk
    secret = _read(path)
    if secret is None:
        raise OSError(f"{path}: the secret just made reads back as {SECRET_BYTES} bytes no more")
    return secret


def _read(path: Path) -> bytes | None:
    """The secret at ``path``; None when there is none (one of another size is set aside first)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o077:  # opened up by hand or a copy: anyone it lets read it could confirm guesses again
            log.warning("endpoint state: %s was readable beyond its owner; made 0600 again", path)
            os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
        secret = os.read(fd, SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(secret) == SECRET_BYTES:
        return secret
    bad = path.with_name(path.name + ".bad")
    log.error("endpoint state: %s holds %d bytes, not a secret of %d; set aside as %s and a new one made: the SDK "
              "tries kept before are not taken by their retries after this restart", path, len(secret),
              SECRET_BYTES, bad.name)
    os.replace(path, bad)
    return None


def _sync_dir(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # a mount that cannot fsync a directory (EINVAL: SMB on an older kernel) keeps its
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # names as it does; raised, the log was off there
            raise
    finally:
        os.close(fd)
