"""What a stop cut unsent, through Ray itself (``actors/_stop_cut.py``): the stop finds the groupers by its engine's
layout and their Ray names, asks each what it held never sent, and publishes that in Ray's store, where a driver
that sees the engine gone reads it (``read_cut``); the next start of the name drops it. The unit tests
(``tests/unit/test_stop_cut.py``) drive the grouper and stub Ray's store and names; this checks those, on the
session's Ray with two stand-in actors and no engine start."""

from __future__ import annotations

import secrets

from actors._engine_stop import _cut_unsent
from actors._peer import publish_layout, unpublish_clock
from actors._stop_cut import read_cut, stop_began
from actors.remote import NAMESPACE, actor_name


class _Held:
    """A grouper's answer to the stop: the ids it held, never sent."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    async def cut_at_stop(self) -> list[str]:
        return self.ids

    def ready(self) -> bool:
        return True


def test_a_stop_publishes_what_its_groupers_held_unsent_and_the_next_start_drops_it(ray_session):
    """(With a dispatcher's since stop 82: fails on the code before, "7:default/d" not published.)"""
    ray, engine = ray_session, f"cut-{secrets.token_hex(3)}"
    held = ray.remote(_Held)
    gs = [held.options(name=actor_name(engine, f"grouper-{k}"), namespace=NAMESPACE, num_cpus=0).remote(ids)
          for k, ids in enumerate([["7:default/a", "7:default/b"], ["7:default/c"]])]
    # Since stop 82 a dispatcher's gate too (``actors._stop_cut_dispatch``), found by its kind in the layout.
    gs.append(held.options(name=actor_name(engine, "dispatcher-openai"), namespace=NAMESPACE, num_cpus=0).remote(
        ["7:default/d"]))
    try:
        ray.get([g.ready.remote() for g in gs], timeout=120)  # up, as an engine's groupers are when it stops
        kinds = ["ingest", "grouper-0", "grouper-1", "grouper-2", "dispatcher-openai", "dispatcher-google"]
        _cut_unsent(engine, {"kinds": kinds})  # (grouper-2 and the google dispatcher: gone already)
        named = {"7:default/a", "7:default/b", "7:default/c", "7:default/d"}
        # (and the stop's mark, in Ray's own store: a dispatcher Ray restarts now only looks its cut creates up)
        assert read_cut(engine) == named and stop_began(engine)
        _cut_unsent(engine, {"kinds": []})  # a second stop's word (``kill_engine`` after a driver's): kept whole
        assert read_cut(engine) == named
        publish_layout(engine, {"kinds": []})  # a new engine of the name: the old list names ids it may reuse
        assert read_cut(engine) == frozenset() and not stop_began(engine)
    finally:
        for g in gs:
            ray.kill(g)
        unpublish_clock(engine)
