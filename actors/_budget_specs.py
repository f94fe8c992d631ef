"""The budgets in force on a Redis ledger, shared by every engine on it (``actors._budget_live`` follows them).

One hash per ledger, ``{prefix}:specs``: ``version`` (the number of the last change made on the ledger, by any
engine), ``specs`` (the budgets, JSON), ``by`` (a token drawn by the change that wrote them) and ``chain`` (the
tokens of the last ``CHAIN_KEPT`` changes, the last one ``by``: what it was built on, so an engine whose change
lost its reply can tell whether the budgets in force descend from it). Keyed by the
ledger's prefix, not by an engine: two engines on one ledger share its windows, so they share its budgets too.
An engine checks ``version`` (one small read) to see whether another engine changed them; a change is written
only over the version it was merged on (a compare-and-set in one script), so of two engines changing at once
one writes and the other is told the budgets now in force, merges on them and tries again."""

from __future__ import annotations

import json
from typing import NamedTuple

from engine.core.budgets import BudgetSpec

__all__ = ["CHAIN_KEPT", "SPECS_TTL_S", "Kept", "SpecStore"]

SPECS_TTL_S = 400 * 86400  # the budgets of a ledger outlive any run of its engines, then go
# Changes whose tokens the ledger keeps: an engine whose change lost its reply looks for it there at its next
# call Redis answers, a second or so later; a hundred changes made meanwhile on other engines is far past that.
CHAIN_KEPT = 100

# ARGV: the version the change was merged on, its version, the budgets, its token, the TTL, CHAIN_KEPT. Written
# only when the ledger holds that version still (none: 0), its token added to the chain of the change it was
# merged on; else the ledger's fields are returned, and nothing is written.
_WRITE = """
local now = redis.call('HMGET', KEYS[1], 'version', 'specs', 'by', 'chain')
if tonumber(now[1] or '0') ~= tonumber(ARGV[1]) then return now end
local chain = {}
for token in string.gmatch(now[4] or '', '%S+') do chain[#chain + 1] = token end
chain[#chain + 1] = ARGV[4]
local from = math.max(1, #chain - tonumber(ARGV[6]) + 1)
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'specs', ARGV[3], 'by', ARGV[4],
           'chain', table.concat(chain, ' ', from, #chain))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return false
"""


class Kept(NamedTuple):
    """The budgets a ledger holds: version 0 and no token when none was ever written (or Redis lost them)."""

    version: int
    specs: tuple[BudgetSpec, ...]
    by: str
    chain: tuple[str, ...] = ()  # the tokens of the last changes, ``by`` last

    def built_on(self, token: str) -> bool:
        """Whether these budgets are the change of ``token`` or were made on it (a change after it)."""
        return token == self.by or token in self.chain

    def tells(self, version: int) -> bool:
        """Whether the chain reaches back to change ``version``: else (more changes since than it keeps, or a
        Redis that lost the budgets or went back since) ``built_on`` cannot tell a change of it made from not."""
        return self.version - len(self.chain) < version <= self.version


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _kept(fields) -> Kept:
    version, specs, by, chain = (*fields, None)[:4]
    if version is None or specs is None:
        return Kept(0, (), "")
    return Kept(int(_text(version)), tuple(BudgetSpec.model_validate(s) for s in json.loads(specs)),
                _text(by or ""), tuple(_text(chain or "").split()))


class SpecStore:
    """The ``{prefix}:specs`` hash of a ledger, through ``client`` (a ``redis.asyncio.Redis``)."""

    def __init__(self, client, prefix: str):
        self.client, self.key = client, f"{prefix}:specs"

    def __repr__(self) -> str:
        return f"SpecStore({self.key!r})"

    async def head(self) -> tuple[int, str]:
        """The number of the last change on the ledger (0: none) and its token: the once-a-second check, a few
        bytes. The token tells two changes of one number apart (written where Redis had lost the budgets)."""
        version, by = await self.client.hmget(self.key, "version", "by")
        return (0, "") if version is None else (int(_text(version)), _text(by or ""))

    async def read(self) -> Kept:
        return _kept(await self.client.hmget(self.key, "version", "specs", "by", "chain"))

    async def write(self, base: int, version: int, specs: tuple[BudgetSpec, ...], by: str) -> Kept | None:
        """Write ``specs`` as change ``version`` if the ledger holds change ``base`` still: None when written, else
        what it holds (another engine's change came first)."""
        body = json.dumps([s.model_dump() for s in specs])
        now = await self.client.eval(_WRITE, 1, self.key, base, version, body, by, SPECS_TTL_S, CHAIN_KEPT)
        return None if now is None else _kept(now)
