"""The claim one running ``smartbatch serve`` holds on its engine name on this machine (a ``flock`` the kernel drops
when the process ends), what a second ``serve`` is told of it, and the wait of ``smartbatch stop`` for it to go."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from engine.core.errors import ConfigError
from engine.core.files import locked

__all__ = ["NameClaim", "port_holder", "served_address", "served_elsewhere", "wait_released"]


def _claims_dir() -> Path:
    """Where each running ``smartbatch serve`` holds the claim of its engine's name (one directory per user)."""
    return Path(tempfile.gettempdir()) / f"smartbatch-{os.getuid()}" / "serve"


class NameClaim:
    """One running ``smartbatch serve``'s claim of its engine name on this machine: an exclusive ``flock`` of a
    file named after it. A second ``serve`` of the name would start a second engine on a Ray of its own (and a
    second endpoint on the same port: Ray Serve's proxy binds with SO_REUSEPORT); the claim refuses it at once,
    naming the first. The kernel drops the lock when the process ends, however it ends, so a crash or SIGKILL
    leaves no stale claim. The file holds what the refusal quotes: pid, Ray address, endpoint."""

    def __init__(self, name: str):
        import fcntl

        self.name = name
        d = _claims_dir()
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{quote(name, safe='')}.json"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(_claimed(name, _read(self.path))) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # locked a file its holder removed as it released it: claim the path's file anew
        self._fd: int | None = fd
        self.publish()

    def publish(self, **info: Any) -> None:
        """Record what a second ``serve`` of this name is told about this one (besides name and pid)."""
        raw = json.dumps({"name": self.name, "pid": os.getpid(), **info}).encode()
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, raw, 0)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while locked: a serve that opened it meanwhile sees it gone, above
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __repr__(self) -> str:
        return f"NameClaim({self.name!r}, {self.path}, held={self._fd is not None})"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):  # being rewritten this very moment: the refusal names less
        return {}
    return info if isinstance(info, dict) else {}


def _claimed(name: str, info: dict) -> str:
    addr, url = info.get("address"), info.get("endpoint")
    facts = [f"pid {info['pid']}" if "pid" in info else None, f"Ray address {addr}" if addr else "still starting",
             f"endpoint {url}" if url else None]
    how = f"smartbatch stop --name {name}" + (f" --address {addr}" if addr else "")
    return (f"engine {name!r} is already served on this machine ({', '.join(f for f in facts if f)}); stop it "
            f"first ({how}, or Ctrl-C where it runs), or serve this one under another --name"
            + (" (and another --http-port)" if url else ""))


def served_address(name: str) -> str | None:
    """The Ray address that a ``smartbatch serve --name NAME`` running on this machine published (None if none
    runs, or it has not published one yet)."""
    path = _claims_dir() / f"{quote(name, safe='')}.json"
    if not path.exists() or _free_claim(path):
        return None
    addr = _read(path).get("address")
    return addr if isinstance(addr, str) and addr else None


def served_elsewhere(name: str, address: str, flag: str) -> str:
    """What to add to "no engine named NAME runs on this Ray cluster" when ``address`` was ``auto``: the engines
    served on this machine and each one's address. Where no serve of NAME runs here, ``auto`` is Ray's guess,
    another job's Ray as likely as not, and its list of engines named none of this machine's serves."""
    d = _claims_dir()
    if address != "auto" or not d.is_dir():
        return ""
    infos = [_read(path) for path in sorted(d.glob("*.json")) if not _free_claim(path)]
    # NAME's own serve is left out once it has an address (``_where`` joined that); while it starts it has none,
    # ``auto`` joined Ray's guess, and the one fact that matters is that NAME is starting here.
    served = [f"{info['name']!r} ({flag} {info['address']})" if info.get("address") else f"{info['name']!r} (starting)"
              for info in infos if isinstance(info.get("name"), str) and (info["name"] != name or not info.get("address"))]
    return f"; served on this machine: {', '.join(served)}" if served else ""


def port_holder(port: int) -> dict:
    """What the running ``serve`` whose endpoint is on ``port`` published ({} if none is)."""
    d = _claims_dir()
    for path in sorted(d.glob("*.json")) if d.is_dir() else ():
        info = _read(path)
        if f":{port}/" in str(info.get("endpoint", "")) and not _free_claim(path):
            return info
    return {}


def _free_claim(path: Path) -> bool:
    """Whether no running process holds the claim at ``path`` (a file a stopped ``serve`` left, or none)."""
    return not locked(path, exclusive_only=True)


# How long ``smartbatch stop`` waits for the serve it stopped to exit (it stops its endpoint, then its Ray: 7 s measured).
SERVE_EXIT_S = 120.0


def wait_released(name: str, address: str, limit_s: float = SERVE_EXIT_S) -> int | None:
    """Wait until the ``serve`` of ``name`` on this machine that published ``address`` has exited (its claim free),
    at most ``limit_s``. ``smartbatch stop`` returned as the engine went, seconds before its serve let go of the
    name, so ``stop`` then ``serve`` again (a restart on the same --state-dir) was refused as "already served" (a
    helper's tour). Returns the pid still holding the claim after ``limit_s``, else None."""
    path = _claims_dir() / f"{quote(name, safe='')}.json"
    info = _read(path)
    if info.get("address") != address:  # no serve here, or one of another engine of that name
        return None
    end = time.monotonic() + limit_s
    while not _free_claim(path):
        if time.monotonic() >= end:
            return info.get("pid")
        time.sleep(0.1)
    return None
