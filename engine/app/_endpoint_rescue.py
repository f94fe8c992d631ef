"""What the engine of a ``smartbatch serve --state-dir DIR`` killed (kill -9, an OOM kill) left under way at the
providers, read back before the next ``serve`` on DIR starts its engine (``prepare_endpoint``), as ``smartbatch
batch --resume`` does for a killed batch run (``engine.app._batch_rescue``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.app._batch_rescue import ANSWERS, STOPPED_GONE_S, kept_answers, pending, rescue, sweep

__all__ = ["ENDPOINT_ARCHIVE_S", "prepare_endpoint", "stopped_cleanly"]

ENDPOINT_ARCHIVE_S = 3600.0  # a service's ended batches: kept an hour (its replica keeps their answers as they come)


def prepare_endpoint(state_dir: Path | None, settings, cat, *, speedup: float, address: str | None,
                     say: Callable[[str], None] | None = None):
    """Before ``serve --state-dir DIR`` starts its engine: the settings that journal its provider batches under
    ``DIR/journal`` (real calls on this machine's Ray), and what the engine of an endpoint killed on DIR left
    under way at the providers, collected into DIR's open batches (their ``results.jsonl``), so the replica that
    takes them back asks only the other lines. Before, a kill -9 of ``serve`` billed every line of its provider
    batches twice: they ran on unread, and the restart sent every line again (a helper's hunt: 60 of 60)."""
    from engine.app.cli_common import _fail, err_console
    from engine.core.errors import ConfigError

    say = say or (lambda m: err_console.print(m, style="yellow"))
    try:
        return _prepared(state_dir, settings, cat, speedup, address, say)
    except ConfigError as exc:  # before any Ray starts: one line naming the fix, exit 2
        _fail(exc)


def _prepared(state_dir: Path | None, settings, cat, speedup: float, address: str | None, say):
    from engine.app._endpoint_job import BatchJob
    from engine.app._endpoint_state import EndpointState
    from engine.app.provider_setup import http_setup

    if state_dir is None:
        return settings
    _wait_for_the_lock(state_dir, say)
    if address is not None or settings.providers.mode != "http":
        return settings
    root = state_dir / "journal"
    batches, open_, calls = pending(root)
    if batches or calls or kept_answers(root):  # (answers: what a start killed after its rescue had read)
        # (ended batches only: killed before its replica kept what they answered, or a stop past its drain)
        state = EndpointState(state_dir)  # its lock: no replica reads DIR meanwhile
        try:
            kept = {}
            for rec, _, results in state.batches():
                if BatchJob.from_record(rec).final is None:
                    kept[rec["id"]] = results
            plan, keys = http_setup(cat, settings)
            say(f"the engine of an endpoint on {state_dir} did not stop cleanly ({open_:,} provider batch(es) "
                f"and {calls:,} sync call(s) under way): reading what its {batches:,} batch(es) answered"
                + (" after cancelling those still running" if open_ else ""))
            got = rescue(root, settings, plan, keys, speedup=speedup, wanted=_wanted(root, kept, settings), say=say)
            n, errors = 0, state.write_errors
            for rid, res in got.results.items():
                bid, _, line = rid.partition("/")
                if bid in kept and line not in kept[bid]:
                    state.add_result(bid, res.model_copy(update={"id": line}))
                    kept[bid][line] = res
                    n += 1
            if state.write_errors == errors:  # in the batches' results now (else kept for the next start)
                for path in root.glob(f"{ANSWERS}.*.jsonl"):
                    path.unlink(missing_ok=True)
            say(f"{n:,} line(s) of {len(kept):,} open batch(es) answered from them, not sent again"
                + (f"; {got.cut_calls:,} sync call(s) under way then may have been billed, their lines are sent "
                   "again" if got.cut_calls else ""))
        finally:
            state.close()
    sweep(root)
    return settings.model_copy(update={"journal": settings.journal.model_copy(
        update={"dir": root, "archive_s": ENDPOINT_ARCHIVE_S, "take_back": False})})


def _wanted(root: Path, kept: dict[str, dict], settings) -> set[str]:
    """The engine ids (``<batch id>/<line>``) of the lines of open batches that have no result yet, among the
    journaled batches' members, videos made and Veo creates cut (failed, not made again): an archived batch with none of them is not read again (a clean
    restart read every batch of the last hour at the provider)."""
    from actors._file_journal import ARCHIVE, engine_dirs, read_spaces
    from engine.app._video_rescue import lost_creates, made_videos

    out = set()
    for run in engine_dirs(root):
        spaces = read_spaces(run)
        for call, _ in [*made_videos(spaces).values(), *lost_creates(spaces, settings).values()]:
            bid, _, line = call[1].req.id.partition("/")
            if bid in kept and line not in kept[bid]:
                out.add(call[1].req.id)
        for space, recs in spaces.items():
            if not space.removeprefix(ARCHIVE).startswith("batches:"):
                continue
            for rec in recs.values():
                rec = rec[1] if space.startswith(ARCHIVE) else rec
                jobs = rec[2] if space.endswith(":watch") else rec[1]
                for j in jobs:
                    bid, _, line = j.req.id.partition("/")
                    if bid in kept and line not in kept[bid]:
                        out.add(j.req.id)
    return out | {i for i in kept_answers(root) if i.partition("/")[0] in kept}


LOCK_WAIT_S = 30.0  # real seconds to wait for the processes of an endpoint killed on the directory to end


def _wait_for_the_lock(state_dir: Path, say) -> None:
    """Another endpoint's directory is refused now (its replica refused 25 s on, as "a bug": a helper's hunt);
    one killed a moment ago holds it until its replica, a Ray worker that outlives it by seconds, ends."""
    import time

    from engine.app._endpoint_state import EndpointState
    from engine.core.errors import ConfigError

    give_up, said = time.monotonic() + LOCK_WAIT_S, False
    while True:
        try:
            EndpointState(state_dir).close()
            return
        except ConfigError:
            if time.monotonic() > give_up:
                raise
            if not said:
                say(f"{state_dir} is held by another endpoint: waiting up to {LOCK_WAIT_S:.0f} s for it to end "
                    "(the processes of one just killed end within seconds)")
                said = True
            time.sleep(0.2)  # a process ending: no event to wait on but its lock


def stopped_cleanly(state_dir: Path | None) -> None:
    """After ``serve``'s stop went through (drained, its endpoint and engine stopped): what its engine's ended
    batches answered is with the endpoint, so their archived records go. Kept, the next start read them at the
    provider again for nothing, and was refused while the provider was down (a helper's review)."""
    if state_dir is not None:
        sweep(state_dir / "journal", keep_ended=False, wait_s=STOPPED_GONE_S)
