"""The ledger's hash slot moved between nodes of a real local Redis Cluster while it runs, as ``redis-cli --cluster
reshard`` (or ``rebalance``, or a node added) moves it: CLUSTER SETSLOT IMPORTING and MIGRATING, MIGRATE key by key,
then SETSLOT NODE. Each test stops the move midway, runs the engine's code against it, then ends it (docs/budgets.md,
Redis Cluster). The session's ``redis_cluster`` fixture: each test moves only the slot of a prefix of its own, and
ends the move whatever happens. No Ray."""

import asyncio
import contextlib
import itertools

import pytest
from redis.crc import key_slot

from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim

_prefix = itertools.count()


def _controller(url: str, prefix: str):
    from actors.budget import BudgetController

    return BudgetController(BudgetSettings(specs=(BudgetSpec(max_budget=10.0),), redis_url=url,
                                           redis_prefix=prefix, redis_cluster=True, redis_timeout_s=1.0,
                                           redis_retry_s=0.2))


@contextlib.contextmanager
def _user(cluster, refused: str | None):
    """The URL the engines use: the default user's, or one of a user refused ``refused`` (a command, as an ACL or a
    managed service may refuse ``CLUSTER NODES``), removed after."""
    import redis

    if refused is None:
        yield cluster.url
        return
    user = f"refused{next(_prefix)}"
    for port in cluster.ports:
        with redis.Redis(port=port, socket_timeout=2.0) as c:
            c.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", f"-{refused}")
    try:
        yield cluster.url.replace("redis://", f"redis://{user}:pw@")
    finally:
        for port in cluster.ports:
            with redis.Redis(port=port, socket_timeout=2.0) as c:
                c.execute_command("ACL", "DELUSER", user)


@pytest.mark.parametrize("refused", [None, "cluster|nodes"])
def test_a_ledger_whose_slot_moves_midway_counts_each_dollar_once_and_grants_nothing_past_its_limit(redis_cluster,
                                                                                                     refused):
    """Caught on the node the slot leaves, a settlement's script met a key moved already (or never there: its
    marker) after it had counted the spend and released the reservation, failed, and was sent again from the
    outbox: a $1.50 settlement counted $3.00, its $2 reservation released twice. Sent on by ASK to the node the slot
    goes to once the keys it names had moved, a claim read the window not moved yet as empty: $4 granted under a
    $10 limit with $7 spent or held (and the move's MIGRATE of that window then met the one written there). Now
    each script refuses while the slot moves (TRYAGAIN): an outage for the move's length, whose settlement and charge
    count once when it ends. The same for a user refused ``CLUSTER NODES`` (an ACL, a managed service): the check is
    Redis's own on two keys of the slot; before (a review), it read ``CLUSTER NODES`` in each script and, refused,
    ran the scripts unguarded: the same $4 granted and $1.50 counted twice."""
    prefix = f"sbtest-reshard-{next(_prefix)}"
    slot = key_slot(("{" + prefix + "}").encode())
    to = next(p for p in redis_cluster.ports if p != redis_cluster.node_of_slot(slot))

    async def go(url):
        ctl, other = _controller(url, prefix), _controller(url, prefix)  # two engines
        frm = None
        try:
            await ctl.check_ledger()
            await other.check_ledger()
            claims = [Claim(f"r{i}", "acme", "openai", "gpt-5", "urgent", 2.0) for i in range(4)]
            assert all(v.ok for v in await ctl.reserve_many(claims))
            await ctl.settle_many([("r3", 1.0)])  # the spend hash exists: the settlement below writes before failing
            assert all(v.ok for v in await other.reserve_many([Claim("o1", "acme", "openai", "gpt-5", "urgent", 0.5)]))
            await other.settle_many([("o1", 0.5)])  # its book's sequence is in the slot too
            frm = redis_cluster.begin_move(slot, to)
            ns = "{" + prefix + "}"
            # Another claim's record moves first: the source still holds everything the settlement names.
            redis_cluster.move_keys(frm, to, [f"{ns}:c:r2"])
            await ctl.settle_many([("r0", 1.5)])
            await ctl.charge_many([Charge("ch-1", "acme", "openai", "gpt-5", 0.25)])
            # Now all but the budget's window: the ledger's scripts go to the target by ASK.
            redis_cluster.move_keys(frm, to, [k for k in redis_cluster.slot_keys(frm, slot) if ":w:" not in k])
            (big,) = await other.reserve_many([Claim("big", "acme", "openai", "gpt-5", "urgent", 4.0)])
            during = (await ctl.report())["ledger"]["unsettled"], ctl._last_error
            redis_cluster.end_move(slot, frm, to)
            frm = None
            await asyncio.wait_for(ctl._flusher, timeout=15)  # the outbox sent once the slot serves again
            ctl.book.doubt_server()  # which process answers is read before the next call: the slot's new node's
            await ctl.settle_many([("r0", 1.5)])  # sent again (a lost reply): counted once
            return big, during, await ctl.report(), ctl.book.server
        finally:
            if frm is not None:
                redis_cluster.end_move(slot, frm, to)
            await ctl.close()
            await other.close()
    with _user(redis_cluster, refused) as url:
        big, during, rep, server = asyncio.run(go(url))
    window = rep["budgets"][0]
    # $7 to $7.50 spent or held: $4 more would pass $10; spent r3's $1, o1's $0.50, r0's $1.50 and the charge's
    # $0.25 once; r1 and r2 hold $4. Compared at once: the code before failed each.
    assert (big.ok, round(window["spent_usd"], 6), round(window["reserved_usd"], 6)) == (False, 3.25, 4.0)
    assert big.reason == "budget_unavailable"
    assert during[0] == 2 and "slot moving between nodes" in during[1]  # the settlement and the charge, kept
    assert rep["ledger"]["unsettled"] == 0 and rep["ledger"]["rejected_settlements"] == 0
    assert rep["ledger"]["lost_writes_found"] == 0  # the book's sequence moved with its slot: nothing lost
    import redis

    assert redis_cluster.node_of("{" + prefix + "}:exp") == to
    with redis.Redis(port=to, socket_timeout=2.0) as c:
        assert server == c.info("server")["run_id"]  # the new node's process was read, and not taken for a restart
    assert (rep["ledger"]["replayed_after_restart"], rep["ledger"]["reopened_after_restart"]) == (0, 0)
