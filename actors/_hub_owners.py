"""The engine's record of whose each provider response id is (``engine.core.response_owners``), kept by each result
hub shard (a mixin of ``ResultHub``), so that every driver of a shared engine knows what any of them learnt.

A driver's own record held only the answers it got: with two drivers on one engine (``Engine.connect``: two
scripts, or the endpoint and a script), driver B took tenant Y's request naming an id an answer of driver A gave
tenant X, as one it had never seen (a driver lets those go), and sent X's conversation on for Y. Each shard learns
the ids of the called answers it pushes, in ``push`` (the batch it gets, no call of its own), before it hands them
to any driver: no driver can hold an id its shard does not know yet. A driver asks every shard at once about the
ids it does not know (``owners_of``: one call per shard for a whole submission, and only for ids it has not seen),
and keeps the answers. A shard Ray restarted knows nothing: each driver gives it its record back at the rewire
(``teach_owners``), as the ingest shards give back their fingerprints. Until every driver has, an id it does not
know may be one another driver learnt before the restart: its answers say so (not ``whole``), and a driver does not
keep them as final (it kept "nobody's", was never told otherwise, and let another tenant continue that id).
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.core.response_owners import ResponseOwners
from engine.core.result import Result

__all__ = ["OwnerRecord"]


class OwnerRecord:
    """Mixed into ``ResultHub``; its ``responses`` is made in the hub's constructor."""

    responses: ResponseOwners
    _partial = False  # Ray restarted this shard (``ResultHub.reconstructed``): it knows what drivers gave back

    def _learn_owners(self, results: Iterable[Result]) -> None:
        """The ids of each called answer of ``results`` are its tenant's (a copy from the cache has no ``raw``,
        and is ``reused``: its ids are its source's)."""
        for r in results:
            if r.status == "ok" and r.raw is not None:
                self.responses.learn(r.tenant, r.raw)

    async def owners_of(self, refs: list[tuple[str, str]]) -> tuple[list[tuple[str, str, str]], bool]:
        """(kind, id, tenant) of each (kind, id) of ``refs`` this shard knows the owner of; and whether an id it
        does not know is nobody's for good (``whole``): not once Ray restarted it, as no shard can tell when every
        driver has given its record back."""
        return self.responses.known(tuple(ref) for ref in refs), not self._partial

    async def teach_owners(self, rows: list[tuple[str, str, str]]) -> int:
        """Take (kind, id, tenant) rows a driver knows (this shard restarted, or an endpoint read its log back);
        an id known here keeps its owner. Returns how many ids this shard knows."""
        self.responses.load(rows)
        return len(self.responses)
