"""An engine actor's process ends the moment the raylet that started it dies.

Ray gives each worker process a process group of its own and ends one whose raylet is gone only when its own
check sees it: after a SIGKILL or an OOM kill of a driver whose Ray it had started (the GCS and the raylet die with
the driver), the engine's actors lived on 1.5-2.3 s (measured, stop 83, load 2-8), talking to one another, the
providers, Redis and the journal. A ``smartbatch batch`` run's surviving dispatcher made 394 of its 400 sync calls
after the kill, their answers sent to a hub whose driver was gone and their journal records deleted as answered,
so the resume paid for every line again (800 billed). With the kernel's parent-death signal the actor dies with its
raylet, as on a machine's crash: what was under way stays in the journal for the resume.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """SIGKILL this process when its parent, the raylet that started it (Ray's ``RAY_RAYLET_PID``), dies. Linux
    only: elsewhere Ray's own check ends it, seconds later. The raylet starts its workers from its main thread
    (seen with strace, Ray 2.60), whose end the signal follows: the raylet's own."""
    raylet = int(os.environ.get("RAY_RAYLET_PID") or 0)
    if not sys.platform.startswith("linux") or not raylet:  # (not a Ray worker: a driver's parent is nobody's raylet)
        return
    parent = os.getppid()
    if parent != raylet:  # the raylet died before this (its children went to another), or a wrapper started it
        if not _alive(raylet):
            os._exit(1)
        return  # (tied to a wrapper, e.g. the podman of an image_uri, it would die with it: Ray keeps that
        # in the host's pid namespace, so the raylet is seen there)
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # (not allowed here: Ray's check stays the only one)
    if os.getppid() != parent:  # it died before the signal was set: nothing would send it now
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")  # (a zombie is dead)
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # (unreadable: left to Ray's check rather than killed)
        return True
