"""What a ``smartbatch batch`` run cut off by a crash had under way at the providers, read back from its journal
beside the output file (``journal.dir``, ``actors._file_journal``).

A SIGKILL, an OOM kill or a lost machine ends the run with no word: its provider batches run on at the
providers and bill every member they finish, and a rerun that sent those lines again paid for them twice. Before
a ``--resume`` sends anything, ``rescue`` cancels each batch the journal names (a cancel keeps what already
finished: billed, and read here) and waits for it to end; the members it finished are answered from its output,
never sent again, and only the rest go to the new run. Waiting on instead of cancelling would keep the discount
for the members still to run, but a batch may take up to its 24 h window: the rest are sent again at once, by a
policy that batches them anew. Sync calls that were under way are counted, not collected: their answers went
with the process (a provider that does not honour idempotency keys bills them again); but a video whose create was
answered is polled to its end and answers its request (``engine.app._video_rescue``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from actors._file_journal import ARCHIVE, engine_dirs, locked_out, read_spaces
from actors.providers import make_provider
from engine.app._batch_ended import ProviderUnread, brief, ended
from engine.app._batch_record import named
from engine.app._rescue_settle import settle_claims
from engine.app._video_rescue import fail_lost, made_videos, read_video
from engine.core._logkeys import get_logger
from engine.core.clock import ManualClock
from engine.core.provider_api import CallJob, call_key
from engine.core.result import Result
from engine.runtime.outcomes import failed_result, ok_result

log = get_logger("smartbatch.rescue")

__all__ = ["ANSWERS", "Rescued", "charges", "finish", "journal_dir", "kept_answers", "pending", "prepare", "rescue",
           "sweep", "watch_answers"]

WRITERS_GONE_S = 60.0  # real seconds to wait for the processes of a killed run to end
STOPPED_GONE_S = 2.0  # ... and of a run its own stop killed (``actors._engine_stop.DEATH_WAIT_S``), for a sweep


def journal_dir(out: Path) -> Path:
    """Where ``batch`` keeps the journal of a run writing ``out`` (beside the file a link names, as its record)."""
    out = named(out)
    return out.with_name(out.name + ".journal")


@dataclass
class Rescued:
    results: dict[str, Result] = field(default_factory=dict)  # request id -> its answer from an earlier batch
    batches: int = 0  # provider batches of the earlier run read back
    lost_batches: int = 0  # those given up on (not ended in time, unreadable, or a cut create not found)
    cut_calls: int = 0  # sync calls under way when the earlier run was cut off (maybe billed, sent again)
    videos: int = 0  # videos the earlier run had made (create answered, journaled), polled to their end
    answered: int = 0  # of ``results``, those the earlier run's driver had received (the rest: from batches)
    # Every member a batch answered, by (tenant, id), with the request it answered: what a driver's take-back
    # (``engine.app._driver_resume``) matches against the content submitted again, tenants apart.
    members: dict[str, tuple] = field(default_factory=dict)  # Request.uid -> (Request, Result)
    # The journaled claim of every member a batch finished (answered, or possibly billed), wanted or not: its cost,
    # settled in a Redis ledger (``engine.app._rescue_settle``), where the killed run left it open.
    claims: dict[str, float] = field(default_factory=dict)


def _spaces_of(run: Path) -> dict[str, dict]:
    return {s: recs for s, recs in read_spaces(run).items() if s.startswith(("batches:", "sync:", "jobs:", ARCHIVE))}


ANSWERS = "answers"  # the answers a run's driver received, one JSON Result a line: ``answers.<run>.jsonl``


def watch_answers(settings, futs: list) -> list:
    """``futs``, each of whose answers (succeeded or reused) is appended, as it reaches the driver, to a file in
    the run's journal: a run killed before its end writes no output file, and the sync answers it had were paid
    for again by the resume (provider batches' answers are read again at the provider)."""
    root = settings.journal.dir
    if root is None:
        return futs
    path = Path(root) / f"{ANSWERS}.{os.getpid()}-{time.time_ns()}.jsonl"
    lock = threading.Lock()

    def keep(fut) -> None:
        try:
            r = fut.result()
        except BaseException:
            return
        if r.status in ("ok", "reused"):
            line = r.model_dump_json() + "\n"
            with lock, open(path, "a", encoding="utf-8") as f:  # a whole line at once: a kill cuts at most it
                f.write(line)
    for f in futs:
        f.add_done_callback(keep)
    return futs


def kept_answers(root: Path) -> dict[str, Result]:
    """The answers earlier runs' drivers received (a torn last line, from a kill mid-write, is skipped)."""
    out: dict[str, Result] = {}
    for p in sorted(root.glob(f"{ANSWERS}.*.jsonl")) if root.is_dir() else ():
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = Result.model_validate_json(line)
            except ValueError:
                continue
            out.setdefault(r.id, r)
    return out


def pending(root: Path) -> tuple[int, int, int]:
    """(provider batches, of which still under way, sync calls under way) that the journal under ``root`` names."""
    batches = open_ = calls = 0
    for run in engine_dirs(root):
        for space, recs in _spaces_of(run).items():
            if space.startswith("sync:"):
                calls += len(recs)
            elif not space.startswith("jobs:"):  # (a video's call is one of the sync calls)
                batches += len(recs)
                open_ += 0 if space.startswith(ARCHIVE) else len(recs)
    return batches, open_, calls


def sweep(root: Path, keep_ended: bool = True, runs: list[Path] | None = None, wait_s: float = 0.0) -> None:
    """Remove the journal of every run under ``root`` (or of ``runs`` only) that no live process holds, with
    nothing under way, nor (``keep_ended``) any ended batch archived, and ``root`` once empty. ``wait_s``: how
    long a held run is waited for (real seconds; after a stop, its killed dispatchers' processes ending)."""
    for run in engine_dirs(root) if runs is None else [r for r in runs if r.is_dir()]:
        # Under the run's lock, read once it is taken: a dispatcher holds its run from its start, before its first
        # record, and a live run with nothing journaled yet looked empty: removed under a second engine on the same
        # ``journal.dir``, its next record failed on the directory gone.
        try:
            lock = locked_out(run, wait_s)
        except OSError:  # removed meanwhile (another sweep): nothing left to do
            continue
        if lock is None:  # a live process writes it
            continue
        try:
            if not any(recs for space, recs in _spaces_of(run).items() if keep_ended or not space.startswith(ARCHIVE)):
                shutil.rmtree(run, ignore_errors=True)
        finally:
            os.close(lock)
    try:  # (not while it holds answers)
        root.rmdir()
    except OSError:
        pass


def rescue(root: Path, settings, catalog, keys: dict, *, speedup: float = 1.0, wanted: set[str] | None = None,
           say: Callable[[str], None] = print, strict: bool = True,
           keep: Callable[[Rescued], None] | None = None) -> Rescued:
    """Take the answers, and cancel and read every provider batch, that the journal under ``root`` names. Only
    the answers of requests in ``wanted`` (ids; None: all) are kept. What was read is written whole into one
    answers file under ``root`` before anything read is removed, so a run killed after this (before it wrote
    its output) loses none of it to the next. A batch that cannot be read (its provider unreachable, or not
    ended well after its cancel) raises ``ConfigError`` with nothing removed: sending its lines again would pay
    for what it finished twice (``strict``; else it is said, and the journal goes all the same). ``speedup``:
    engine seconds per real second of the providers (1 when real). ``keep``: how what was read is kept (a
    driver's own answers file), instead of the batch command's."""
    return asyncio.run(_rescue(root, settings, catalog, keys, speedup, wanted, say, strict, keep))


async def _rescue(root, settings, catalog, keys, speedup, wanted, say, strict, keep) -> Rescued:
    from engine.core.errors import ConfigError

    got = Rescued()
    got.results.update((i, r) for i, r in kept_answers(root).items() if wanted is None or i in wanted)
    got.answered = len(got.results)
    old_answers = sorted(root.glob(f"{ANSWERS}.*.jsonl")) if root.is_dir() else []
    providers: dict[str, object] = {}
    runs, locks = engine_dirs(root), []
    real = set(settings.providers.http_providers(catalog.providers))

    def provider(name: str, clock=None):
        """Made when a batch of ``name`` is read: never a simulated one (a journaled batch is a real one)."""
        if name not in real:
            raise ProviderUnread(f"{name} is not called over HTTP in this run (its endpoint, or the catalog, "
                                 "changed since): give it its endpoint again")
        if (name, clock is None) not in providers:  # its answers date from before this run: at its time 0
            providers[name, clock is None] = make_provider(name, catalog, settings, None, clock or ManualClock(0.0),
                                                           keys.get(name))
        return providers[name, clock is None]
    try:
        for run in runs:
            # Its dispatchers outlive a killed driver by seconds, still following (and hedging) its batches.
            lock = locked_out(run, 0.0)
            if lock is None:
                say(f"waiting for the processes of the earlier run to end (they hold {run})")
                lock = await asyncio.to_thread(locked_out, run, WRITERS_GONE_S)
            if lock is None:
                raise ConfigError(f"the journal {run} is still held {WRITERS_GONE_S:.0f} s on: an engine on it "
                                  "still runs (another job given the same journal directory: give each its own), "
                                  "or processes of a killed run linger (Ray workers: `ps -ef | grep ray::`; stop "
                                  "them); then run again")
            locks.append(lock)
        jobs, seen = [], set()
        for run in runs:
            spaces = _spaces_of(run)
            videos = made_videos(spaces)  # (their calls: read, not cut)
            jobs += [read_video(provider, sp, k, call, rec, got, speed=speedup, wanted=wanted, say=say)
                     for (sp, k), (call, rec) in videos.items()]
            lost = fail_lost(spaces, settings, catalog, got, wanted=wanted, say=say)  # (Veo's: failed, not made again)
            for space, recs in spaces.items():
                if space.startswith("sync:"):
                    got.cut_calls += sum((space, k) not in videos and (space, k) not in lost for k in recs)
                if space.startswith(("sync:", "jobs:")):
                    continue
                archived = space.startswith(ARCHIVE)
                name = space.removeprefix(ARCHIVE).split(":")[1]
                for key, rec in recs.items():
                    rec = rec[1] if archived else rec  # (when it was archived, the record)
                    jobs.append(_collect(provider, name, catalog, key, rec, space.endswith(":watch"), got,
                                         speed=speedup, wanted=wanted, say=say, archived=archived, seen=seen))
        # Together: a cancel takes up to 10 minutes, and one batch after another took that many times over.
        errors = [e for e in await asyncio.gather(*jobs, return_exceptions=True) if e is not None]
        if errors and strict:
            raise ConfigError(f"{len(errors)} provider batch(es) or video(s) of the earlier run could not be read "
                              f"({errors[0]}); nothing of its journal ({root}) was removed: try again once the provider answers "
                              "(sending their lines again would pay twice for what they finished)")
        for e in errors:
            say(f"a provider batch or video of the earlier run could not be read ({e}): what it made is paid twice")
        try:
            (keep or (lambda g: _keep_answers(root, g.results)))(got)  # first: then what was read can go
        except OSError as exc:
            why = exc.strerror or exc
            raise ConfigError(f"could not keep what the earlier run's journal gave under {root} ({why}); nothing "
                              "of it was removed: free room there and run again") from None
        try:  # before the journal goes: a run again settles them again, each counted once
            await settle_claims(settings, got.claims)
        except ConfigError as exc:
            if strict:
                raise
            say(f"{exc}; what the earlier run's batches finished is counted by no ledger")
        for run in runs:
            shutil.rmtree(run, ignore_errors=True)
        for path in old_answers:
            path.unlink(missing_ok=True)
    finally:
        for fd in locks:
            os.close(fd)
        for p in providers.values():
            await p.close()
    sweep(root)
    return got


def _keep_answers(root: Path, results: dict[str, Result]) -> None:
    """``results`` in one answers file under ``root``, whole (written aside, flushed, renamed) or not at all."""
    if not results:
        return
    from engine.core.files import write_atomic

    data = "".join(r.model_dump_json() + "\n" for r in results.values()).encode()
    write_atomic(root / f"{ANSWERS}.rescued-{time.time_ns()}.jsonl", data, durable=True)


async def _collect(provider, name: str, catalog, key: str, rec: tuple, watch: bool, got: Rescued, *, speed: float,
                   wanted: set[str] | None, say, archived: bool, seen: set[str]) -> Exception | None:
    """One journaled batch: found (if its create was cut), cancelled, read; its finished members into ``got``.
    ``archived``: one that ended in the run (its answers may not have reached the output file). Returns the
    error that kept it from being read, if one did."""
    if watch:
        b, handle, jobs, start, _ = rec
    else:
        b, jobs, start, _, handle, _ = rec
    if not getattr(handle, "real", True):  # the simulator ran it (Gemini beside real calls): nothing was billed
        return None
    if archived and (handle is None or wanted is not None and not any(
            j.req.id in wanted and j.req.id not in got.results for j in jobs)):
        return None  # ended: its create failed (nothing made), or what it answered is in the output file already
    try:
        p = provider(name)
    except ProviderUnread as exc:
        return exc
    if handle is None and getattr(p, "names_batches", True):
        cjobs = [CallJob(call_key(j.req.tenant, j.req.id, j.req.model, j.attempts), j.req, start, j.attempts, j.seq)
                 for j in jobs]
        try:
            handle = await p.find_batch(cjobs, key)
        except Exception as exc:
            return ProviderUnread(f"{name}: the lookup of batch {key} failed: {brief(exc)}")
    if handle is None:
        got.lost_batches += 1
        say(f"a provider batch of the earlier run ({name}) was being created when it was cut off and cannot be "
            "found: if it was made, what it finishes is billed and its lines are sent again")
        return None
    if handle.id in seen:  # a hedged batch is both archived and watched
        return None
    seen.add(handle.id)
    got.batches += 1  # (one still under way is cancelled, wanted or not: what it goes on finishing is billed)
    try:
        outs = await ended(p, handle, catalog.provider(name).batch_api.cancel_s, speed)
    except Exception as exc:
        return ProviderUnread(f"{name} batch {handle.id}: {brief(exc)}")
    try:  # read: its input file (the prompts) goes, once; its output stays for a later read (docs/providers.md)
        await p.discard(handle)
    except Exception as exc:
        log.warning("%s: the input file of batch %s could not be deleted (%s)", name, handle.id, brief(exc))
    asked = {j.req.uid: j.asked for j in jobs if getattr(j, "asked", None)}  # members rerouted to a fallback
    claim = {j.req.uid: j.claim for j in jobs if getattr(j, "claim", None)}
    for ckey, o in outs.items():
        cj = handle.jobs.get(ckey)
        # A member that ran and cannot be read (its line unreadable, or no response naming it beside one naming
        # none) fails at its bound, kept: left out, the resume sent it again, paid twice.
        if cj is None or not (o.ok or o.maybe_billed and not o.retryable):
            continue
        if cj.req.uid in claim:
            got.claims[claim[cj.req.uid]] = o.cost
        res = ok_result(cj.req, at=0.0, cost=o.cost, mode="batch_api", batch_id=b.bid,
                        recommendation=b.recommendation, reason="answered by a provider batch of an earlier run",
                        out=o) if o.ok else failed_result(
            cj.req, at=0.0, batch_id=b.bid, recommendation=b.recommendation, tries=cj.attempt + 1,
            max_attempts=cj.attempt + 1, real=True, error=f"{o.error}; read back by a resume, charged its upper "
            f"bound ${o.cost:.6f}", possibly_billed_usd=o.cost).model_copy(update={"cost_usd": o.cost})
        was = asked.get(cj.req.uid)  # the request as its driver asked it, not as rerouted
        got.members.setdefault(cj.req.uid, (cj.req.model_copy(update={"provider": was[0], "model": was[1]})
                                            if was else cj.req, res))
        if (wanted is None or cj.req.id in wanted) and cj.req.id not in got.results:
            got.results[cj.req.id] = res
    return None


def charges(results: dict[str, Result], out: Path) -> list:
    """The rescued answers as charges for this run's budgets (billed, never counted by the run that was cut off),
    and the failures that may be billed at their bound (``Result.possibly_billed_usd``)."""
    from engine.core.budgets import Charge

    return [Charge(f"rescue:{out}:{r.tenant}:{r.id}", r.tenant, r.provider, r.model,
                   r.billed_bound_usd) for r in results.values()]


def prepare(out: Path, settings, cat, requests: list, *, resume: bool, overwrite: bool, address: str | None,
            speedup: float, say: Callable[[str], None] | None = None) -> tuple[object, Rescued, list]:
    """Before a ``batch`` run writing ``out`` sends anything: the settings that journal its provider work beside
    ``out`` (real calls on this machine's Ray only: a cluster's dispatchers write to their own disks), what the
    earlier runs cut off by a crash left under way, collected (``--resume``), cancelled unread (``--overwrite``)
    or refused with the way on, and the requests still to send."""
    from engine.app.cli_common import err_console
    from engine.app.provider_setup import http_setup
    from engine.core.errors import ConfigError

    say = say or (lambda m: err_console.print(m, style="yellow"))
    # Its own journal is taken back here, or none (a cluster, OUT a stream): never a driver job's journal.dir
    # (exported for it), which its engine took over, and its end removed what that job's killed run paid for.
    settings = settings.model_copy(update={"journal": settings.journal.model_copy(update={"take_back": False})})
    if address is not None or settings.providers.mode != "http":
        return settings, Rescued(), requests
    root = journal_dir(out.absolute())
    batches, open_, calls = pending(root)
    answered = len(kept_answers(root))
    got = Rescued()
    if batches or calls or answered:
        if not resume and not overwrite:
            raise ConfigError(
                f"--out {out}: an earlier run writing it did not finish (its journal {root} holds {answered:,} "
                f"answer(s) it had received and names {batches:,} provider batch(es), {open_:,} of them still "
                f"under way, and {calls:,} sync call(s) under way); "
                "pass --resume to collect what those batches answered (billed) and send only the rest, or "
                "--overwrite to cancel them and send every line again (what they answered is paid again)")
        plan, keys = http_setup(cat, settings)
        say(f"an earlier run writing {out} did not finish: taking the {answered:,} answer(s) it had received and "
            f"reading what its {batches:,} provider batch(es) answered" + (
                f", after cancelling the {open_:,} still under way (a cancel takes up to 10 minutes at OpenAI and "
                "Anthropic)" if open_ else ""))
        got = rescue(root, settings, plan, keys, speedup=speedup,
                     wanted=set() if overwrite else {r.id for r in requests}, say=say, strict=not overwrite)
        if got.cut_calls:
            say(f"{got.cut_calls:,} sync call(s) were under way when it was cut off: they may have been billed, "
                "and their lines are sent again")
    sweep(root)
    rest = [r for r in requests if r.id not in got.results]
    if out.exists() and not out.is_file():  # a stream (/dev/stdout, a pipe): no place beside it
        return settings, got, rest
    try:
        root.mkdir(exist_ok=True)
    except OSError as exc:  # a read-only directory (OUT itself writable): the run goes on, unjournaled
        say(f"no journal beside {out} ({exc.strerror or exc}): if this run is killed, what its provider batches "
            "finish is paid again by the next run")
        return settings, got, rest
    return settings.model_copy(update={"journal": settings.journal.model_copy(update={"dir": root})}), got, rest


def finish(settings, out: Path, clean: bool) -> None:
    """After a ``batch`` run writing ``out``: its journal goes if the run ended cleanly (every line has its final
    answer in ``out``), else only what names nothing under way (a run interrupted with batches still open leaves
    them to ``--resume``). A journal directory set by hand (``journal.dir``) is left as it is."""
    root = settings.journal.dir
    if root is None or Path(root) != journal_dir(out.absolute()):
        return
    if clean:
        shutil.rmtree(root, ignore_errors=True)
    else:
        sweep(Path(root), wait_s=STOPPED_GONE_S)
