"""An engine actor's process dies with the raylet that started it (``actors._orphan``): Ray's own check let a
killed driver's actors live 1.5-2.3 s on, and a surviving dispatcher made 394 of a run's 400 sync calls after the
kill, all paid again by the resume (stop 83, a helper's probe)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import pytest

# The raylet's part: it starts the actor's process, says its pid, and waits. The actor's: set up as the engine sets
# up each actor (``actors.remote._in_actor``), then it says so and waits for ever (for a signal: nothing the
# raylet holds, such as a pipe, ends it).
_ACTOR = """
import signal
import actors.remote
class Plain:
    pass
actors.remote._in_actor(Plain)()
print("up", flush=True)
signal.pause()
"""
_RAYLET = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.DEVNULL, stdout=sys.stdout,
                         env={**os.environ, "RAY_RAYLET_PID": str(os.getpid())})  # (as Ray's raylet says it)
print(child.pid, flush=True)
sys.stdin.read()
"""



def _reap(raylet: subprocess.Popen, actor: int | None) -> None:
    """What a test left alive, ended: the fake raylet and its actor (whatever the test's outcome)."""
    if raylet.poll() is None:
        raylet.kill()
        raylet.wait(30)
    if actor is not None:
        try:
            os.kill(actor, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raylet.stdin.close()
    raylet.stdout.close()

@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"),
                    reason="the parent-death signal and pidfds are Linux's")
def test_an_actors_process_dies_with_the_raylet_that_started_it():
    raylet = subprocess.Popen([sys.executable, "-c", _RAYLET, _ACTOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    actor = None
    try:
        actor = int(raylet.stdout.readline())
        fd = os.pidfd_open(actor)
        assert raylet.stdout.readline() == "up\n"  # set up as an actor
        raylet.kill()  # SIGKILL: the driver's, and with it its Ray's, as an OOM kill does
        raylet.wait(30)
        gone = select.select([fd], [], [], 30)[0]  # at its exit (a bound: the kernel signals it at once)
        os.close(fd)
        assert gone, f"the actor's process {actor} outlived its raylet"
    finally:
        _reap(raylet, actor)


# An actor whose raylet dies before its setup: told of that death (by the same signal, harmless and only to wait
# for it; the kernel sends it once the raylet's children went to another parent), it then sets up as an actor.
_LATE_ACTOR = """
import ctypes, os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
ctypes.CDLL(None).prctl(1, signal.SIGUSR1, 0, 0, 0)
print(os.getpid(), flush=True)
signal.sigwait({signal.SIGUSR1})
import actors.remote
class Plain:
    pass
actors.remote._in_actor(Plain)()
print("up", flush=True)
signal.pause()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"),
                    reason="the parent-death signal and pidfds are Linux's")
def test_an_actor_whose_raylet_died_before_its_setup_dies_at_its_setup():
    """Its parent already another when it looked (a driver killed as its engine's actors start): it checked only
    that the parent did not change around the signal's setting, and lived on, set up (a review of stop 83)."""
    raylet = subprocess.Popen([sys.executable, "-c", _RAYLET, _LATE_ACTOR], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    actor = None
    try:
        actor = int(raylet.stdout.readline())
        assert int(raylet.stdout.readline()) == actor  # (it waits for its raylet's end)
        raylet.kill()
        raylet.wait(30)
        assert raylet.stdout.readline() == "", "the actor set itself up with its raylet gone, and lived on"
    finally:
        _reap(raylet, actor)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("raylet", ["", "self"], ids=["not_a_ray_worker", "a_live_raylet_not_its_parent"])
def test_a_process_not_the_raylets_child_is_left_to_its_parent(monkeypatch, raylet):
    """A driver (or pytest) that ran an actor's setup, or a worker a wrapper started: tied to its parent, it would
    die with a shell or a launcher's thread, not with a raylet (a review of stop 83)."""
    import ctypes

    from actors._orphan import die_with_parent

    monkeypatch.setenv("RAY_RAYLET_PID", str(os.getpid()) if raylet else "")
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    got = ctypes.c_int(-1)
    try:
        die_with_parent()
        assert prctl(2, ctypes.byref(got), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
        assert got.value == 0
    finally:
        prctl(1, 0, 0, 0, 0)  # (this process's left as it was)
