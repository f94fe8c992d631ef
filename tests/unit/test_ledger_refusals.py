"""Which errors of the ledger's scripts are refusals of what they were given (settled apart, dropped one by one with
an ERROR) and which are Redis's state (an outage: waited out in the outbox, counted once Redis takes writes).
Parsed by redis-py from the exact lines Redis sends; no Redis."""

from __future__ import annotations

import pytest
from redis._parsers.base import BaseParser

from actors.budget_redis import _refused

# Redis 6.2 and older wrap the error a command meets inside a script in "Error running script", its code after a
# dash (scripting.c: luaPushError on shared.oomerr, then evalGenericCommand); Redis 7 starts the line with the code.
_V6 = "ERR Error running script (call to f_5d2c3e1a): @user_script:21: @user_script: 21: "
STATE = [
    _V6 + "-OOM command not allowed when used memory > 'maxmemory'. ",
    _V6 + "-READONLY You can't write against a read only replica. ",
    _V6 + "-MISCONF Redis is configured to save RDB snapshots, but it is currently not able to persist on disk. ",
    "OOM command not allowed when used memory > 'maxmemory'. script: 5d2c3e1a, on @user_script:21.",
    "READONLY You can't write against a read only replica. script: 5d2c3e1a, on @user_script:21.",
]
REFUSED = [
    "WRONGTYPE Operation against a key holding the wrong kind of value script: 5d2c3e1a, on @user_script:9.",
    _V6 + "WRONGTYPE Operation against a key holding the wrong kind of value ",
    "ERR user_script:12: attempt to perform arithmetic on a nil value script: 5d2c3e1a, on @user_script:12.",
    "ERR Error running script (call to f_5d2c3e1a): @user_script:12: user_script:12: attempt to compare nil with "
    "number ",
]


@pytest.mark.parametrize("line", STATE)
def test_a_full_or_read_only_redis_is_an_outage_in_every_redis_version_s_words(line):
    """Before (a review), Redis 6's words for a full Redis read as a refusal: each settlement was dropped, its spend
    never counted, its claim held until ``reservation_ttl_s``."""
    assert not _refused(BaseParser.parse_error(line))


@pytest.mark.parametrize("line", REFUSED)
def test_what_a_script_cannot_read_is_still_a_refusal(line):
    assert _refused(BaseParser.parse_error(line))


# A Redis Cluster's words for a key the node does not serve (a ledger on a cluster node through a plain client, or
# its slot moving while a script ran): Redis's state, never what the script was given.
CLUSTER = [
    "ERR Script attempted to access a non local key in a cluster node script: 70bdbe20, on @user_script:68.",
    "ERR Script attempted to access keys that do not hash to the same slot script: 5d2c3e1a, on @user_script:9.",
    "CROSSSLOT Keys in request don't hash to the same slot",
    "MOVED 3999 127.0.0.1:6381",
    "ASK 3999 127.0.0.1:6381",
    "CLUSTERDOWN The cluster is down",
    # cluster-allow-reads-when-down yes: the script runs, its first write is refused (Redis 7, then Redis 6's words)
    "ERR Script attempted to execute a write command while the cluster is down and readonly script: 70bdbe20, on "
    "@user_script:54.",
    "ERR Error running script (call to f_70bdbe20): @user_script:54: @user_script: 54: Lua script attempted to "
    "execute a write command while the cluster is down and readonly ",
]


@pytest.mark.parametrize("line", CLUSTER)
def test_a_cluster_node_that_does_not_serve_a_ledger_key_is_an_outage_not_a_refusal(line):
    """Before, a settlement's script meeting a key of another node was read as a refusal: it was settled again one
    by one over what its first try had written (no script is rolled back), then dropped: a $0.80 settlement counted
    $1.60 spent and released its $1.00 reservation twice (-$1.00 reserved), on a 3-node cluster
    (docs/budgets.md, Redis Cluster). Now it waits in the outbox, as an outage does."""
    assert not _refused(BaseParser.parse_error(line))
