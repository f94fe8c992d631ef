"""Where a ``smartbatch batch`` run wrote the error file of its output, recorded beside the output
(``<OUT>.smartbatch.json``), with the lines in it that were paid for or may be billed.

The error file holds money: the lines that failed possibly billed (``BILLED_KEY``) and the answered choices of
lines of n choices (``CHOICES_KEY``), which a ``--resume`` keeps rather than send again. A first run given
``--errors PATH`` and a resume not given it again read OUT's default error file, found neither, and sent those
lines again: paid twice (a new user's hunt). So the run records where it wrote them, a later run on the same OUT
reads them there, and a run that cannot find them (the file moved or deleted, or another ``--errors`` given while
the recorded one still holds them) is refused, naming the fix, rather than send them again."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["check_own_files", "default_errors", "error_file", "named", "record_path", "recorder", "unrecorded"]

VERSION = 1


def named(out: Path) -> Path:
    """OUT as the file a link names (``latest.jsonl -> run-7.jsonl``; it is written through the link): its record and
    journal go beside that file. Named after the spelling given, a resume given the other found no record (nor
    journal) and sent again the lines that may be billed (a review of stop 77)."""
    try:
        return out.resolve() if out.is_symlink() else out
    except OSError:  # (a link loop: refused as OUT later, by the write)
        return out


def record_path(out: Path) -> Path:
    """The record of the run that last wrote ``out``."""
    out = named(out)
    return out.with_name(out.name + ".smartbatch.json")


def default_errors(out: Path) -> Path:
    return out.with_name(out.stem + ".errors.jsonl")


def _stream(out: Path) -> bool:
    return out.exists() and not out.is_file()  # /dev/stdout, a pipe: no place beside it


def _read(out: Path, overwrite: bool = False) -> dict | None:
    from engine.core.errors import ConfigError

    rec = record_path(out)
    if _stream(out) or not _there(rec):
        return None
    try:
        doc = json.loads(rec.read_text(encoding="utf-8"))
        errors, billed, choices = doc["errors"], doc.get("possibly_billed", []), doc.get("choices", [])
        if not (isinstance(errors, str) and all(isinstance(x, list) and all(isinstance(c, str) for c in x)
                                                for x in (billed, choices))):
            raise TypeError("not a record of an error file")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if overwrite:  # every line is sent again, asked for: nothing is kept, and the run writes the record anew
            return None
        raise ConfigError(f"{rec}: the record of where the earlier run writing {out} put its error file cannot be "
                          f"read ({exc}); delete it, and give --errors where that run's error file is (or "
                          "--overwrite to send every line again, paid again, which replaces it)") from None
    return {"errors": errors, "possibly_billed": billed, "choices": choices}


def check_own_files(out: Path, files: dict[str, Path | None]) -> None:
    """``ConfigError`` for an output flag (``files``: flag -> path) that names a file the run keeps beside OUT: written
    there, the report or the error lines replaced the record (the next run on OUT was refused as unreadable, and where
    the lines that may be billed are was lost), or took the journal's place. Before any work, as ``_check_outputs``."""
    from engine.app._batch_rescue import journal_dir
    from engine.core.errors import ConfigError

    if _stream(out):
        return
    if (real := named(out)) != out:  # a link: a record or journal left beside it (before a review) is read no more
        for end in (".smartbatch.json", ".journal"):
            if (left := out.with_name(out.name + end)).exists():
                raise ConfigError(f"--out {out} is a link to {real}, whose record and journal go beside that file; "
                                  f"{left} was left beside the link by an earlier run: move it to "
                                  f"{real.with_name(real.name + end)}, then run again")
    own = [("record", record_path(out), "where its error file is, and which lines may be billed"),
           ("journal", journal_dir(out), "its provider batches under way, taken back by a run cut off")]
    # Beside a link, their names are kept free too: a report there would be taken for one left (above).
    own += [(what, out.with_name(out.name + end), holds) for (what, _, holds), end in
            zip(own, (".smartbatch.json", ".journal")) if real != out]
    for flag, p in files.items():
        for what, path, holds in own:
            if p is not None and _same(p, path):
                raise ConfigError(f"{flag} {p}: that is the {what} the run keeps beside --out {out} ({holds}); "
                                  f"writing there would destroy it: give {flag} another path")
        # The journal is a directory a run ending cleanly removes whole: an error file in it went at the end of the
        # run that wrote it (its lines that may be billed with it), a report at the next run's.
        if p is not None and journal_dir(out).absolute().resolve() in p.absolute().resolve().parents:
            raise ConfigError(f"{flag} {p}: that is inside the journal the run keeps beside --out {out} "
                              f"({journal_dir(out)}), which a run that ends removes: give {flag} another path")


def _same(a: Path, b: Path) -> bool:
    return a.absolute().resolve() == b.absolute().resolve()


def error_file(out: Path, given: Path | None, ids: set[str], *, resume: bool, overwrite: bool,
               resend_billed: bool) -> tuple[Path, str]:
    """(the error file of this run, how messages name it). Without ``--errors``, the one the record beside ``out``
    names, else OUT's default. ``ConfigError`` where a line of this input (``ids``: its custom_ids) that the
    earlier run's error file held paid for or possibly billed would not be found, and so be sent again."""
    from engine.app._batch_kept import RESEND_FLAG
    from engine.core.batchfile import answered_choices, answered_lines, possibly_billed_lines
    from engine.core.errors import ConfigError

    rec = _read(out, overwrite)
    default = default_errors(out)
    recorded = Path(rec["errors"]) if rec is not None else default
    if given is None:
        where = f"recorded in {record_path(out)}" if not _same(recorded, default) else "OUT's stem + .errors.jsonl"
        errors, flag = recorded, f"the error file ({where})"
    else:
        errors, flag = given, "--errors"
    if overwrite:  # every line is sent again, asked for: nothing there is kept
        return errors, flag
    if not _same(errors, recorded):
        # Two error files for one OUT: reading the new one, the resume sent the old one's lines again.
        # (OUT's default, its name too long for one: none; it raised. Lines that may be billed, asked to be sent
        # again, are not kept: refused, as they were not once that file had moved.)
        paid = [] if not _there(recorded) else sorted((set(answered_choices(recorded)) | (
            set() if resume and resend_billed else set(possibly_billed_lines(recorded)))) & ids)
        if paid:
            raise ConfigError(f"--errors {given}: the earlier run writing {out} wrote its error file to {recorded}, "
                              f"which holds {len(paid):,} line(s) it paid for or that may be billed (e.g. "
                              f"{paid[0]!r}); reading another, they would be sent again: give --errors {recorded} "
                              f"(or move that file to {given}), or --overwrite to send every line again (paid again)")
    if rec is None:
        return errors, flag
    # What the record says was there and is not: the file moved, deleted or replaced since. Sent again, paid twice.
    billed = [] if resend_billed and resume else [c for c in rec["possibly_billed"] if c in ids]
    choices = [c for c in rec["choices"] if c in ids]
    if billed or choices:  # (OUT and the error file read only then: each read again after, a big OUT twice)
        done, held, got = set(answered_lines(out)), possibly_billed_lines(errors), answered_choices(errors)
        billed = [c for c in billed if c not in done and c not in held]
        choices = [c for c in choices if c not in done and c not in got]
    if billed or choices:
        why = "a stream: nothing kept" if _stream(errors) else "replaced, or its last write failed"
        gone = "is gone" if not errors.exists() else f"does not hold them ({why})"
        if not _same(errors, recorded):  # (the recorded file is gone too, or it was refused above)
            # (It said "does not exist, and neither does <the recorded file>" of one there.)
            gone = (("does not hold them" if errors.exists() else "does not exist") + ", and "
                    + (f"{recorded} does not hold them" if recorded.exists() else f"{recorded} is gone"))
        some = (billed or choices)[0]
        # Lost choices have no flag of their own: --overwrite alone paid again for every line OUT answers (a review).
        ways = ([f"--resume {RESEND_FLAG} to send the lines that may be billed again (maybe paid twice)"] if billed
                and not choices else []) + ([f"delete {record_path(out)} and --resume to send those lines again "
                                             "whole (their choices answered paid twice), the lines OUT answers kept"]
                                            if choices else []) + ["--overwrite to send every line again (paid again)"]
        what = " and ".join(([f"{len(billed):,} line(s) that failed possibly billed"] if billed else [])
                            + ([f"{len(choices):,} line(s) with choices answered"] if choices else []))
        raise ConfigError(f"{flag} {errors} {gone}: the earlier run writing {out} wrote {what} (e.g. {some!r}) to "
                          f"{recorded}, as {record_path(out)} records; found nowhere, they would be sent again and "
                          "paid twice. Give --errors where that file is now, or put it back; or " + ", or ".join(ways))
    return errors, flag


def recorder(out: Path, errors: Path):
    """The ``before`` hook of ``write_results`` that records where the error file goes and which of its lines were
    paid for or may be billed (None for a stream OUT). Written (whole, or not at all) before the files: a run cut
    off between them, or whose files could not be written (a full disk: both left as they were), leaves a record
    that a later run refuses on, rather than none, which sent the lines again. With the default error file and
    nothing paid in it, no record is left: it would say nothing."""
    from engine.core.batchfile import answered_choices, possibly_billed_lines
    from engine.core.files import write_atomic

    if _stream(out):
        return None
    rec = record_path(out)

    def keep(rows: list[dict]) -> None:
        billed, choices = sorted(possibly_billed_lines(rows)), sorted(answered_choices(rows))
        doc = {"version": VERSION, "errors": str(errors.absolute()), "possibly_billed": billed, "choices": choices}
        data = (json.dumps(doc, indent=1) + "\n").encode()
        if _cannot_add(rec):
            # A directory that takes no new file, OUT written in place there: an OSError here lost the run's
            # answers, paid for (a review). One there is written in place; none: ``unrecorded`` said so.
            if _there(rec):
                rec.write_bytes(data)
            return
        if _same(errors, default_errors(out)) and not billed and not choices:
            rec.unlink(missing_ok=True)
            return
        write_atomic(rec, data, durable=True)
    return keep


def _cannot_add(rec: Path) -> str | None:
    """Why ``rec`` cannot be made beside OUT, if it cannot: OUT's directory takes no new file, or OUT's name is so
    long that its record's is over the file system's limit (OUT's own, 240 to 255 bytes, was taken before)."""
    import os

    try:
        if not os.access(rec.parent, os.W_OK):
            return f"{rec.parent} takes no new file"
        if len(os.fsencode(rec.name)) > os.pathconf(rec.parent, "PC_NAME_MAX"):
            return f"the name {rec.name!r} is too long for its file system"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _there(rec: Path) -> bool:
    try:
        return rec.is_file()
    except OSError:  # (a name too long: none there)
        return False


def unrecorded(out: Path, errors: Path) -> str | None:
    """What to say before a run whose error file (not OUT's default) cannot be recorded beside OUT (a directory
    that takes no new file; as for its journal, the run goes on): a later run must be given it again."""
    rec = record_path(out)
    why = None if _stream(out) or _same(errors, default_errors(out)) or _there(rec) else _cannot_add(rec)
    if why is None:
        return None
    return (f"no record beside {out} of where its error file goes ({why}): give --errors {errors} again to a later "
            f"run on {out}, else the lines it holds that may be billed are sent again")
