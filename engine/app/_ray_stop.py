"""Stopping an engine whose local Ray may have gone down under it: a SIGTERM sent to the whole process group
(``timeout``, systemd, ``kill -- -PGID``) stops Ray's processes with the command's own, and every Ray call then
waits a minute for the GCS before Ray ends the process itself, with nothing written. ``serve``, ``batch`` and
``run`` stop their engine through ``stop_or_lose_ray`` and, when Ray is gone, leave with ``exit_now``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

__all__ = ["Terminated", "exit_now", "own_ray_processes", "stop_or_lose_ray", "terminate_as_interrupt"]

GRACE_S = 10.0  # how long steps that shut Ray down themselves may take after its processes are gone
FAILED_SETTLE_S = 3.0  # how long a failed stop waits for Ray's processes to show they are going down


def own_ray_processes() -> list[subprocess.Popen]:
    """The processes of the local Ray this process started (GCS, raylet, monitors); none when it attached to a
    running cluster, whose processes are not its children."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return [i.process for infos in (getattr(node, "all_processes", None) or {}).values() for i in infos]


def exit_now(code: int) -> NoReturn:
    """Stop what is left of the local Ray this process started and exit with ``code`` now, skipping Ray's exit
    hooks (each would wait for the GCS)."""
    procs = own_ray_processes()
    for p in procs:
        if p.poll() is None:
            p.kill()  # the GCS, for one, outlives SIGTERM
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:  # stuck in the kernel: it goes when it can, nothing to wait for
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stop_or_lose_ray(steps: Callable[[], None], ray_procs: list[subprocess.Popen], *,
                     timeout_s: float = 30.0, poll_s: float = 0.05, grace_s: float | None = None) -> str:
    """Run ``steps`` (the Ray calls that stop the endpoint and the engine) in a thread, and watch the local Ray's
    processes meanwhile: "done" when the steps finish, "ray-gone" when one of those processes exited and the
    steps have not finished ``grace_s`` (``GRACE_S``) later, "timeout" after ``timeout_s``. None of them exits
    while Ray runs; after a SIGTERM to the whole process group the log monitor is gone within milliseconds while
    the raylet takes seconds to wind down, its actors first: the steps would then block on them, and then for a
    minute on the GCS. The grace is for steps that end by shutting Ray down themselves (an engine that started its Ray):
    without it, every ``batch`` run ended as if interrupted (exit 130). An error of the steps is raised here,
    unless one of those processes exits within ``FAILED_SETTLE_S`` of it (then "ray-gone")."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            steps()
        except BaseException as exc:  # raised in the caller's thread below
            failed.append(exc)

    worker = threading.Thread(target=run, name="smartbatch-engine-stop", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    grace_s = GRACE_S if grace_s is None else grace_s
    gone_at = None
    while worker.is_alive():
        if gone_at is None and any(p.poll() is not None for p in ray_procs):
            gone_at = time.monotonic()
        if gone_at is not None and time.monotonic() - gone_at >= grace_s:
            return "ray-gone"
        if time.monotonic() >= deadline:
            return "timeout"
        worker.join(poll_s)
    if failed:
        # Ray's processes take the same SIGTERM as this one and may go a moment after a step they broke has
        # failed (the GCS gone under a Ray call): that is Ray going down, not an error of the stop.
        settle = time.monotonic() + FAILED_SETTLE_S if ray_procs else 0.0
        while True:
            if any(p.poll() is not None for p in ray_procs):
                return "ray-gone"
            if time.monotonic() >= settle:
                raise failed[0]
            time.sleep(poll_s)
    return "done"


class Terminated(KeyboardInterrupt):
    """A SIGTERM taken as Ctrl-C (``terminate_as_interrupt``): a service manager sends it, and kills soon after."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a `timeout`, a service manager) as Ctrl-C while the answers come: Ray's driver turns it into an
    exit that no handler here saw, and nothing was written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def interrupt(*_):
        raise Terminated
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
