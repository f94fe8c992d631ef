"""A run's whole session, for the tests that crash one (``smartbatch batch``, ``serve``, a driver script).

Ray gives each worker process (``ray::Dispatcher``, ``ray::BudgetController``, ...) a process group of its own,
in the session of the run that started its Ray (seen in ``ps -o pgid,sid``, stop 83), so ``os.killpg`` of the run
kills the driver, the raylet and the GCS while the actors live on until they see their raylet gone: seconds, and
more under load. A machine's crash kills them all at once; a test's crash must too, or a survivor settles, polls or
writes the killed run's work while the next run rescues it. Each such test starts its run with
``start_new_session=True`` and kills it with ``kill_session``.
"""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies left out: they can do nothing more)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):  # not a process, or gone meanwhile
            continue
        if d.name.isdigit() and fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(d.name))
    return out


def kill_session(sid: int, timeout_s: float = 60.0) -> None:
    """SIGKILL every live process of session ``sid`` and wait until none is alive: what a machine's crash does.
    A dispatcher that outlived the kill by a moment read the batch the emulator's clock had just ended and settled
    it in the killed run's ledger (``(0.0023, 0.0023, 0.0)`` in a scratch run, stop 83)."""
    assert sid != os.getsid(0), "the run shares the test's session: start it with start_new_session=True"
    deadline = time.monotonic() + timeout_s
    while left := session_pids(sid):
        fds = []
        for pid in left:
            try:
                fds.append(os.pidfd_open(pid))
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # gone meanwhile
                pass
        try:
            for fd in fds:  # each readable at its process's exit: an event, not a polled delay
                select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        finally:
            for fd in fds:
                os.close(fd)
        assert time.monotonic() < deadline, f"the killed run's processes {left} outlived its SIGKILL"
