"""What a Redis budget ledger had not taken when its engine stopped, kept on the driver's disk for the next engine
on the same ledger (the controller's side: ``actors._budget_stop``).

An engine stopped while its ledger's Redis was away dropped its outbox with it (Ray's key-value store, where it
was journaled, goes with a local Ray, and the stop removed its records anyway): the spend of those settlements and
charges was never counted, their claims held their room until they expired, and a hard budget shared with other
engines could be passed unseen. Now the stop waits up to ``journal.ledger_wait_s`` for Redis; what is left goes to
a file under ``journal.ledger_dir`` (one directory per ledger: its Redis and key prefix, never a password), said
in an ERROR log and the stop's report (``budget.ledger.left_at_stop``). The next engine started on that ledger
takes the files back at its start (claimed by a rename: two engines starting together do not both take one; were
they to, sending one again counts nothing twice), journals their items as its own outbox and deletes the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["keep_left", "kept_dir", "take_back_kept"]

log = logging.getLogger("smartbatch.budget")
_SUFFIX = ".outbox"
TAKE_CALL_S = 60.0  # bound on the controller's take-back at start (it journals, and sends if Redis answers)


def kept_dir(settings) -> Path:
    """The directory of ``settings``' ledger (its Redis and key prefix) under ``journal.ledger_dir``."""
    j, b = settings.journal, settings.budgets
    if j.ledger_dir is not None:
        root = Path(j.ledger_dir)
    elif j.dir is not None:
        root = Path(j.dir) / ".budget-outbox"  # (a dot: not taken for an engine run's journal, and swept)
    else:  # read when a stop needs it, not at import
        root = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "smartbatch" / "budget-outbox"
    u = urlsplit(b.redis_url or "")
    ledger = f"{u.scheme}://{u.hostname}:{u.port}{u.path}|{b.redis_prefix}"  # no user, no password
    return root.expanduser() / hashlib.sha256(ledger.encode()).hexdigest()[:16]


def keep_left(ray, budget, settings, engine: str) -> dict[str, Any] | None:
    """The engine stops: have ``budget`` wait for its Redis to take what waits for it, and keep what it has not
    taken in a file. Returns the figures of what was left (None: nothing), for the stop's report."""
    if not settings.budgets.redis_url:
        return None
    wait = settings.journal.ledger_wait_s
    try:
        left = ray.get(budget.leave.remote(wait), timeout=wait + 2 * settings.budgets.redis_timeout_s + 30.0)
    except Exception as exc:
        log.error("engine %s: the budget ledger did not say what waits for its Redis at the stop (%s): whatever "
                  "it held is dropped with the engine, its claims released at their expiry", engine,
                  type(exc).__name__)
        return {"error": f"not asked: {type(exc).__name__}"}
    if not left:
        return None
    records = left.pop("records")
    path = kept_dir(settings) / f"{time.time_ns()}-{secrets.token_hex(4)}{_SUFFIX}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps({**left, "engine": engine, "at": time.time(), "records": records}))
        os.replace(tmp, path)  # whole or not there: a reader never sees half of it
    except OSError as exc:
        left["kept_in"] = None
        log.error("engine %s: budget ledger's Redis at %s away at the stop (%s), and what waited for it could not "
                  "be kept (%s): %d settlement(s) and %d charge(s), %.6f USD spent, are LOST to the ledger (their "
                  "claims are released at their expiry, their spend never counted); set journal.ledger_dir to a "
                  "writable directory", engine, left["redis_url"], left["error"], exc, left["settlements"],
                  left["charges"], left["unsettled_usd"])
        return left
    left["kept_in"] = str(path)
    log.error("engine %s: budget ledger's Redis at %s did not answer within %.1f s of the stop (%s): %d "
              "settlement(s) and %d charge(s), %.6f USD spent, are not counted in the ledger yet; kept in %s and "
              "sent by the next engine started on this ledger (journal.ledger_dir)", engine, left["redis_url"],
              wait, left["error"], left["settlements"], left["charges"], left["unsettled_usd"], path)
    return left


def take_back_kept(ray, budget, settings) -> int:
    """At an engine's start: give ``budget`` what engines stopped on its ledger left on disk; each file goes once
    the controller journaled its items or Redis took them. Returns how many items were taken back."""
    if not settings.budgets.redis_url:
        return 0
    d = kept_dir(settings)
    taken = 0
    for f in sorted(d.glob("*" + _SUFFIX)) if d.is_dir() else ():
        mine = f.with_name(f"{f.name}.taking-{secrets.token_hex(4)}")
        try:
            os.rename(f, mine)
        except FileNotFoundError:  # another engine starting on this ledger took it
            continue
        try:
            records = pickle.loads(mine.read_bytes())["records"]
        except Exception as exc:
            log.error("budget ledger: %s unreadable (%s); left as is, its spend not counted", mine, exc)
            continue
        try:
            unjournaled = ray.get(budget.take_kept.remote(records), timeout=TAKE_CALL_S)
        except Exception as exc:
            unjournaled = -1
            log.error("budget ledger: what %s holds not taken back (%s); kept for the next start", f,
                      type(exc).__name__)
        if unjournaled:  # kept for the next engine: sending one again counts nothing twice
            os.rename(mine, f)
        else:
            mine.unlink()
            taken += len(records)
    return taken
