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


def test_a_node_that_loses_the_ledger_soon_after_its_slot_moved_there_is_not_taken_for_the_move(redis_cluster):
    """The ledger's slot moved, quietly (no call failed, so no engine read the new node's ``run_id``), to a node that
    then restarted empty (no persistence) and still serves it. The watch of an engine whose claim waits for its
    provider, with no call meanwhile, reads another process there, and the node the slot left, still the same process,
    a master holding no key of the slot, told a move: nothing was put back, and its $6 claim stayed lost until its next
    call while another engine was granted $5 under a $10 limit (a review). Now a move is taken only if the new node
    holds the book's own sequence as high as the book saw (``actors._budget_replay``): it does not, the claim is
    reserved again at that check, and the $5 waits. It also needs the watch to read the node the slot went to: the
    cluster client learns a move only from a MOVED, and the watch of an engine with no call since read the node the
    slot left, the same process each second, and never saw the restart (``serving_node``). One node's restart: 2 s."""
    import signal

    import redis

    prefix = f"sbtest-reshard-lost-{next(_prefix)}"
    slot = key_slot(("{" + prefix + "}").encode())
    frm = redis_cluster.node_of_slot(slot)
    to = next(p for p in redis_cluster.ports if p != frm)

    async def go():
        waiting, busy = _controller(redis_cluster.url, prefix), _controller(redis_cluster.url, prefix)
        try:
            await waiting.check_ledger()
            await busy.check_ledger()
            assert all(v.ok for v in await waiting.reserve_many([Claim("w1", "acme", "openai", "gpt-5", "urgent", 6.0)]))
            assert waiting.book._server_at == f"127.0.0.1:{frm}"  # read where the slot was
            redis_cluster.end_move(slot, redis_cluster.begin_move(slot, to), to)  # no call meanwhile
            redis_cluster.signal(to, signal.SIGKILL)
            redis_cluster.revive(to)  # empty, the slot still its own (its nodes.conf kept)
            # The waiting engine's watch, as each second: its first read meets the connection the restart closed.
            for _ in range(3):
                waiting.book.doubt_server()
                try:
                    await waiting.book._same_server()
                    break
                except redis.ConnectionError:  # the connection the restart closed; the watch's next tick reads again
                    continue
            verdicts = []
            for _ in range(3):  # its first call may meet the closed connection too: an outage until the flusher ends
                (v,) = await busy.reserve_many([Claim(f"b{len(verdicts)}", "acme", "openai", "gpt-5", "urgent", 5.0)])
                verdicts.append(v)
                if v.reason != "budget_unavailable":
                    break
                if busy._flusher is not None:
                    await asyncio.wait_for(busy._flusher, timeout=15)
            return verdicts[-1], waiting.book.reopened, await busy.report()
        finally:
            await waiting.close()
            await busy.close()
    big, reopened, rep = asyncio.run(go())
    window = rep["budgets"][0]
    # The code before: (True, 0, 5.0): $5 granted with the $6 claim lost.
    assert (big.ok, reopened, round(window["reserved_usd"], 6)) == (False, 1, 6.0)
