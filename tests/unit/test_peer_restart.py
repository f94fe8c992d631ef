"""An engine's start pings every actor's peers once (``Warm.warm``). A peer whose Ray worker died while it was
being created (seen in a CI rehearsal: a segfault in Ray's own metrics thread) is restarted by Ray, and a ping
that reached the dying worker fails with ``ActorUnavailableError``: the start waits the restart out, bounded,
instead of failing, and any other error still fails it at once."""

import asyncio

import pytest
from ray.exceptions import ActorUnavailableError

from actors import _peer
from actors._peer import Warm, as_peer


class Flaky:
    """A peer whose first ``restarts`` pings fail as a restarting Ray actor's do."""

    def __init__(self, restarts: int, error: type[Exception] = ActorUnavailableError):
        self.left, self.error, self.pings = restarts, error, 0

    async def ping(self) -> str:
        self.pings += 1
        if self.left:
            self.left -= 1
            raise (self.error("The actor is restarting.", None) if self.error is ActorUnavailableError
                   else self.error("boom"))
        return "token"


class Holder(Warm):
    def __init__(self, *targets):
        self.peers = [as_peer(t) for t in targets]


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(_peer, "RESTART_POLL_S", 0.0)


def test_warm_waits_out_a_peer_that_ray_restarts(quick):
    steady, flaky = Flaky(0), Flaky(2)
    assert asyncio.run(Holder(steady, flaky).warm()) == 2
    assert (steady.pings, flaky.pings) == (1, 3)


def test_warm_gives_up_on_a_peer_still_restarting_after_the_wait(quick, monkeypatch):
    monkeypatch.setattr(_peer, "RESTART_WAIT_S", 0.0)
    with pytest.raises(ActorUnavailableError):
        asyncio.run(Holder(Flaky(5)).warm())


def test_any_other_failure_of_a_ping_fails_the_warm_at_once(quick):
    broken = Flaky(1, RuntimeError)
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(Holder(broken).warm())
    assert broken.pings == 1
