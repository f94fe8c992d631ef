"""A driver's crash insurance: an engine started with ``journal.dir`` (real providers) takes back what an engine on
that directory left when its process was killed, before it sends anything, and answers from it the requests its
driver submits again.

A SIGKILL, an OOM kill or a closed laptop ends a driver script with no word: the engine's provider batches run on
and bill every member they finish, and the script run again sent those requests again, paying twice. Its
dispatchers journal every batch in the directory (``actors._file_journal``); a new engine on it cancels and reads
each batch named there (``_batch_rescue.rescue``: a cancel keeps what finished, billed) and keeps the answers, with
the answers the killed driver had received (written here, each before its future resolved). A request submitted
again under the same tenant and id, with the same content, gets its kept answer at once, at the cost the earlier
run paid; one with other content is sent as new (an id reused across jobs never gets another job's answer). A
stop with nothing open removes the directory's contents: the job ended, and nothing is left to take back.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from engine.core.errors import ConfigError
from engine.core.request import Request
from engine.core.result import Result

__all__ = ["DRIVER_ANSWERS", "KeptAnswers", "content_digest", "take_back"]

log = logging.getLogger("smartbatch.driver")

DRIVER_ANSWERS = "driver-answers"  # one JSON line an answer: {"digest": ..., "result": ...}
KEPT_REASON = "answered by an earlier run of this job (journal.dir), not sent again"


def content_digest(req: Request) -> str:
    """What a request asks, whatever its arrival: the same content submitted again has the same digest."""
    return hashlib.sha256(req.model_dump_json(exclude={"arrival_s"}).encode()).hexdigest()


class KeptAnswers:
    """The answers an earlier run of the job paid for, by ``Request.uid`` with their request's digest, and the file
    this run's answers are appended to as they reach the driver."""

    def __init__(self, root: Path, kept: dict[str, tuple[str, Result]]):
        self.root = root
        self._kept = kept
        self._path = root / f"{DRIVER_ANSWERS}.{os.getpid()}-{time.time_ns()}.jsonl"
        self._lock = threading.Lock()
        self._write_failed = False
        self.given, self.given_usd = 0, 0.0

    def __repr__(self) -> str:
        return f"KeptAnswers(root={str(self.root)!r}, kept={len(self._kept)}, given={self.given})"

    def __len__(self) -> int:
        return len(self._kept)

    def holds(self, req: Request) -> bool:
        """Whether an earlier run answered this tenant, id and content (``take`` gives it)."""
        got = self._kept.get(req.uid)
        return got is not None and got[0] == content_digest(req)

    def take(self, req: Request) -> Result | None:
        """The kept answer to ``req`` if an earlier run answered this tenant, id and content (else None)."""
        if not self.holds(req):
            return None
        got = self._kept[req.uid]
        with self._lock:
            self.given += 1
            self.given_usd += got[1].cost_usd
        return got[1].model_copy(update={"reason": KEPT_REASON})

    def charges(self) -> list:
        """Every kept answer as a charge for this run's budgets: billed, never counted by the run cut off."""
        from engine.core.budgets import Charge

        return [Charge(f"resume:{self.root}:{r.tenant}:{r.id}", r.tenant, r.provider, r.model, r.cost_usd)
                for _, r in self._kept.values() if r.cost_usd and r.provider and r.model]

    def record(self, pairs: Iterable[tuple[Request, Result]]) -> None:
        """Append the answers among ``pairs`` (billed or reused) before their futures resolve: a kill after this
        leaves them to the next run, never paid again. Lines go in one write (a kill cuts the last at most)."""
        data = "".join(_line(content_digest(q), r) for q, r in pairs if r.status in ("ok", "reused"))
        if not data:
            return
        try:
            with self._lock, open(self._path, "a", encoding="utf-8") as f:
                f.write(data)
        except OSError as exc:  # the answers still reach the driver; only the insurance is lost
            if not self._write_failed:
                self._write_failed = True
                log.error("journal.dir %s: answers could not be kept (%s): if this run is killed, the next pays "
                          "for them again", self.root, exc.strerror or exc)

    def finish(self, clean: bool) -> None:
        """After the engine's stop. ``clean`` (nothing was open): the job ended, so its journal goes; else it stays
        for the next run to take back."""
        if not clean:
            return
        from engine.app._batch_rescue import sweep

        for p in self.root.glob(f"{DRIVER_ANSWERS}.*.jsonl"):
            p.unlink(missing_ok=True)
        sweep(self.root, keep_ended=False)


def _line(digest: str, res: Result) -> str:
    return json.dumps({"digest": digest, "result": res.model_dump(mode="json")}) + "\n"


def _read(paths: Iterable[Path]) -> dict[str, tuple[str, Result]]:
    out: dict[str, tuple[str, Result]] = {}
    for p in paths:
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:  # a torn last line (a kill mid-write) is skipped
                d = json.loads(line)
                res = Result.model_validate(d["result"])
                out.setdefault(res.uid, (str(d["digest"]), res))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def take_back(settings, catalog, keys: dict, *, speedup: float) -> KeptAnswers | None:
    """Before an engine a driver starts sends anything: what an engine killed on ``journal.dir`` left (None: no
    directory, take-back off, or simulated providers, whose calls bill nothing)."""
    j = settings.journal
    if j.dir is None or not j.take_back or settings.providers.mode != "http":
        return None
    from engine.app._batch_rescue import pending, rescue
    from engine.core.files import write_atomic

    root = Path(j.dir).absolute()
    old = sorted(root.glob(f"{DRIVER_ANSWERS}.*.jsonl")) if root.is_dir() else []
    kept = _read(old)
    batches, open_, calls = pending(root)
    if batches or calls:
        log.warning("journal.dir %s: an engine on it was cut off with %d provider batch(es) (%d under way) and %d "
                    "sync call(s) out; reading what they finished before anything is sent", root, batches, open_, calls)

        written: list[Path] = []

        def keep(got) -> None:  # whole, before the records it read are removed
            merged = dict(kept)
            for uid, (req, res) in got.members.items():
                merged.setdefault(uid, (content_digest(req), res))
            if len(merged) > len(kept):
                path = root / f"{DRIVER_ANSWERS}.rescued-{time.time_ns()}.jsonl"
                write_atomic(path, "".join(_line(d, r) for d, r in merged.values()).encode(), durable=True)
                written.append(path)
            kept.update(merged)

        try:  # (in a thread of its own: the driver may call this from a running event loop)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                got = pool.submit(rescue, root, settings, catalog, keys, speedup=speedup, wanted=None,
                                  say=log.warning, keep=keep).result()
        except ConfigError as exc:
            raise ConfigError(f"journal.dir={root}: {exc}; or remove that directory to send everything again") from None
        if written:  # the old answers are in the file just written
            for p in old:
                p.unlink(missing_ok=True)
        if got.cut_calls:
            log.warning("journal.dir %s: %d sync call(s) were under way when the earlier engine was cut off; they "
                        "may have been billed, and are sent again when submitted", root, got.cut_calls)
    if kept:
        log.warning("journal.dir %s: %d answer(s) an earlier run of this job paid for are kept: the same requests "
                    "submitted again get them, not sent again", root, len(kept))
    root.mkdir(parents=True, exist_ok=True)
    return KeptAnswers(root, kept)
