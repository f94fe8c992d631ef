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
