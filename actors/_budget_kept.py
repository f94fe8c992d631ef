"""What a Redis budget ledger had not taken when its engine stopped, kept on the driver's disk for the next engine
on the same ledger (the controller's side: ``actors._budget_stop``).

An engine stopped while its ledger's Redis was away dropped its outbox with it (Ray's key-value store, where it
was journaled, goes with a local Ray, and the stop removed its records anyway): the spend of those settlements and
charges was never counted, their claims held their room until they expired, and a hard budget shared with other
engines could be passed unseen. Now the stop waits up to ``journal.ledger_wait_s`` for Redis; what is left goes to
a file under ``journal.ledger_dir`` (one directory per ledger: its Redis and key prefix, never a password), said
in an ERROR log and the stop's report (``budget.ledger.left_at_stop``). The next engine started on that ledger
takes the files back at its start (claimed by a lock on the file and a rename: two engines starting together do
not both take one; were they to, sending one again counts nothing twice), journals their items as its own outbox,
and deletes the file once Redis took them all, or at its own stop once that stop kept what is still unsent
(``KeptClaims``). Deleted once journaled in Ray's store, which a local Ray takes with it, the file's spend was
lost when that engine died before Redis answered, and a file taken by a start that died stayed ``*.taking-*``,
read by nobody (a review). The files hold spend and who spent it: the user's alone (0600, in a 0700 directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from actors._stop_claim import note_kept
from engine.core._logkeys import get_logger

__all__ = ["KeptClaims", "keep_left", "kept_dir", "leave_call_s", "take_back_kept"]

log = get_logger("smartbatch.budget")
_SUFFIX = ".outbox"
_TAKING = ".taking-"  # <kept file>.taking-<host>-<pid>-<token>: taken by an engine, locked while it runs
TAKE_CALL_S = 60.0  # bound on the controller's take-back at start (it journals, and sends if Redis answers)
SENT_CALL_S = 2.0  # bound on asking the controller which items taken back still wait (a driver's check)


def kept_dir(settings) -> Path:
    """The directory of ``settings``' ledger (its Redis and key prefix) under ``journal.ledger_dir``."""
    j, b = settings.journal, settings.budgets
    if j.ledger_dir is not None:
        root = Path(j.ledger_dir)
    elif j.dir is not None:
        root = Path(j.dir) / ".budget-outbox"  # (a dot: not taken for an engine run's journal, and swept)
    else:  # read when a stop needs it, not at import
        root = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "smartbatch" / "budget-outbox"
    return root.expanduser() / hashlib.sha256(_ledger(b.redis_url or "", b.redis_prefix).encode()).hexdigest()[:16]


def _ledger(url: str, prefix: str) -> str:
    """The ledger ``url`` and ``prefix`` name, never its user or password, with Redis's defaults filled in (port
    6379, database 0, given in the path or as ``?db=``): spelt another way, an engine did not find what one
    stopped on the same ledger kept (a review)."""
    u = urlsplit(url)
    asked = parse_qs(u.query).get("db", ["0"])[0]
    if u.scheme == "unix":
        return f"unix://{u.path}/{asked}|{prefix}"
    return f"{u.scheme}://{u.hostname}:{u.port or 6379}/{u.path.strip('/') or asked}|{prefix}"


def leave_call_s(settings) -> float:
    """How long a stop waits for the controller's answer to ``leave``: its wait for Redis, a Redis call out then
    (two timeouts), and slack for a busy actor (``_leave`` adds a restart's ``RESTART_AT_STOP_S``)."""
    return settings.journal.ledger_wait_s + 2 * settings.budgets.redis_timeout_s + 30.0


def keep_left(ray, budget, settings, engine: str, where: str | Path | None = None) -> dict[str, Any] | None:
    """The engine stops: have ``budget`` wait for its Redis to take what waits for it, and keep what it has not
    taken in a file, in ``where`` (the ledger's directory its start resolved, ``kept_dir``; None: resolved
    here). Returns the figures of what was left (None: nothing), for the stop's report."""
    if not settings.budgets.redis_url:
        return None
    wait = settings.journal.ledger_wait_s
    try:
        left = _leave(ray, budget, wait, leave_call_s(settings))
    except Exception as exc:
        log.error("engine %s: the budget ledger did not say what waits for its Redis at the stop (%s): whatever "
                  "it held is dropped with the engine, its claims released at their expiry", engine,
                  type(exc).__name__)
        return {"error": f"not asked: {type(exc).__name__}"}
    if not left:
        return None
    records = left.pop("records")
    path = Path(where or kept_dir(settings)) / f"{time.time_ns()}-{secrets.token_hex(4)}{_SUFFIX}"
    note_kept(engine, str(path))  # (a stop that takes this one over, its process killed, keeps nothing again)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # spend, and who spent it: the owner's alone
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pickle.dumps({**left, "engine": engine, "at": time.time(), "records": records}))
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


def _leave(ray, budget, wait_s: float, call_s: float) -> dict[str, Any]:
    """``budget.leave(wait_s)``, asked again while Ray restarts a controller that died in it (within
    ``RESTART_AT_STOP_S`` more): its successor reads its outbox back from Ray's store first. The death taken for
    the answer, nothing was kept, and the spend waiting for Redis was counted by no ledger. One dead for good
    (another stop killed it, and kept what it held) raises."""
    from actors._peer import RESTART_POLL_S, restarting
    from actors._stop_dispatchers import RESTART_AT_STOP_S

    give_up = time.monotonic() + call_s + RESTART_AT_STOP_S
    while True:
        try:
            return ray.get(budget.leave.remote(wait_s), timeout=max(0.001, min(call_s, give_up - time.monotonic())))
        except ray.exceptions.RayActorError as exc:
            if time.monotonic() + RESTART_POLL_S >= give_up or not (restarting(exc) or _back(ray, budget)):
                raise
            log.warning("budget ledger: its controller died in the stop (%s); asked again once Ray restarted it",
                        type(exc).__name__)
        time.sleep(RESTART_POLL_S)  # a pause between asks of a restarting actor, not a wait for its answer


def _back(ray, budget) -> bool:
    """Whether ``budget``, whose call failed with its death, is restarting or back (a ping it answers), not dead
    for good (the ping says so at once)."""
    from actors._peer import restarting

    try:
        ray.get(budget.ping.remote(), timeout=SENT_CALL_S)
    except ray.exceptions.RayActorError as exc:
        return restarting(exc)
    except Exception:  # noqa: BLE001 (not answering yet: restarting)
        pass
    return True


class KeptClaims:
    """The kept files an engine took back at its start, held (locked) until Redis took their items
    (``drop_sent``, at the driver's checks) or its stop: their items meanwhile live in its controller's memory
    and Ray's store, which a local Ray takes with it, so a file goes only once Redis took them or the stop has
    kept what is still unsent (``finish``). An engine that dies holding them lets go of their locks with its
    process, and the next engine on the ledger takes them back (``take_back_kept``)."""

    def __init__(self) -> None:
        self.held: list[tuple[Path, BinaryIO, list[str]]] = []  # (file, its lock, its items' keys)
        self.taken = 0  # items taken back
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeptClaims(files={len(self.held)}, taken={self.taken})"

    def drop_sent(self, ray, budget) -> None:
        """Delete the files held whose items Redis has all taken (``BudgetController.kept_waiting``): held on, a
        crash of this engine days later had the next one send them again once their markers had expired."""
        if not self.held:
            return
        try:
            waiting = set(ray.get(budget.kept_waiting.remote([k for *_, keys in list(self.held) for k in keys]),
                                  timeout=SENT_CALL_S))
        except Exception:  # noqa: BLE001 (busy, restarting: asked again at the next check)
            return
        with self._lock:  # (the stop's ``finish`` may come from another thread)
            sent = [h for h in self.held if not waiting.intersection(h[2])]
            self.held = [h for h in self.held if h not in sent]
        for path, f, _ in sent:
            try:
                path.unlink()
            except OSError as exc:
                log.error("budget ledger: %s, whose items Redis took, not removed (%s)", path, exc)
            finally:
                f.close()

    def finish(self, left: dict[str, Any] | None) -> None:
        """The engine stops, ``keep_left`` said ``left``: delete the files held if what their items left unsent is
        kept anew (or nothing was left), else give them back for the next engine (sent again: counted once)."""
        kept_anew = left is None or bool(left.get("kept_in"))
        with self._lock:
            held, self.held = self.held, []
        for path, f, _ in held:
            try:
                if kept_anew:
                    path.unlink()
                else:
                    os.rename(path, _kept_name(path))
            except OSError as exc:
                log.error("budget ledger: %s not %s (%s)", path, "removed" if kept_anew else "given back", exc)
            finally:
                f.close()


def _kept_name(path: Path) -> Path:
    return path.with_name(path.name.split(_TAKING)[0])


def _claim(path: Path) -> tuple[Path, BinaryIO] | None:
    """Take ``path`` (a kept file, or one an engine that died had taken) for this process: an exclusive lock on
    it, held until it is given back or deleted, and renamed (pid and host only tell a reader who took it; the lock
    says whether that one still runs: the system lets go of it when its process ends). None: another has it."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (held open: the lock lives as long as it)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mine, now = os.fstat(f.fileno()), os.stat(path)
        # Taken and deleted, or renamed, between this open and this lock: the file opened is no longer that one.
        if mine.st_nlink == 0 or (mine.st_ino, mine.st_dev) != (now.st_ino, now.st_dev):
            raise FileNotFoundError(path)
        who = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64]
        taking = _kept_name(path).with_name(f"{_kept_name(path).name}{_TAKING}{who}-{os.getpid()}-"
                                            f"{secrets.token_hex(4)}")
        os.rename(path, taking)
    except OSError:  # BlockingIOError: its taker runs; FileNotFoundError: another took it
        f.close()
        return None
    return taking, f


def take_back_kept(ray, budget, settings) -> KeptClaims:
    """At an engine's start: give ``budget`` what engines stopped on its ledger left on disk, and what an engine
    that died holding it had taken back. Returns the files taken back, held until Redis took their items or the
    engine stops (``KeptClaims``)."""
    claims = KeptClaims()
    if not settings.budgets.redis_url:
        return claims
    d = kept_dir(settings)
    found = sorted([*d.glob("*" + _SUFFIX), *d.glob(f"*{_SUFFIX}{_TAKING}*")]) if d.is_dir() else []
    for f in found:
        claim = _claim(f)
        if claim is None:
            continue
        mine, held = claim
        try:
            records = pickle.loads(held.read())["records"]
        except Exception as exc:
            bad = mine.with_name(mine.name.split(_SUFFIX)[0] + ".unreadable")
            log.error("budget ledger: %s unreadable (%s); set aside as %s, its spend not counted", f, exc, bad.name)
            with contextlib.suppress(OSError):
                os.rename(mine, bad)
            held.close()
            continue
        try:
            unjournaled = ray.get(budget.take_kept.remote(records), timeout=TAKE_CALL_S)
        except Exception as exc:
            unjournaled = -1
            log.error("budget ledger: what %s holds not taken back (%s); kept for the next start", f,
                      type(exc).__name__)
        if unjournaled:  # given back for the next engine: sending one again counts nothing twice
            with contextlib.suppress(OSError):  # (left as taken: unlocked below, the next start takes it)
                os.rename(mine, _kept_name(mine))
            held.close()
        else:
            claims.held.append((mine, held, list(records)))
            claims.taken += len(records)
    claims.drop_sent(ray, budget)  # Redis answered at the start: nothing to hold
    return claims
