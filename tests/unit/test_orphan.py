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
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.DEVNULL, stdout=sys.stdout)
print(child.pid, flush=True)
sys.stdin.read()
"""


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
