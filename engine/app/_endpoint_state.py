"""The endpoint's files and batches on disk (``smartbatch serve --state-dir DIR``), so a restarted replica (a
Serve restart, a redeploy, ``serve`` run again) knows every file and batch it had accepted.

Layout under ``DIR``:

- ``files/<id>.json`` and ``files/<id>.data``: a file's metadata and bytes (uploads, outputs, error files);
- ``batches/<id>.json``: a batch's record (status, times, errors, file ids, and once ended its counts, usage
  and report), written whole on every change (``write_atomic``, as a file's data is: never half written);
- ``batches/<id>.input``: the batch's input, a hard link to its file's bytes taken at create (a user may delete
  the file while its batch runs, as OpenAI allows);
- ``batches/<id>.results.jsonl``: each line's result as it arrives (an open batch only);
- ``videos/<id>.json``: a video's record (the request the engine was given, and its result once in:
  ``engine.app._endpoint_videos``), written whole on every change;
- ``retries-0.jsonl`` and ``retries-1.jsonl``: the SDK tries of generations, for their retries after a restart
  (``engine.app._endpoint_retry_log``: append-only, a window of 120 s each, emptied in turn);
- ``retries.secret``: the random key (0600) of the HMACs those lines, and the batch and video records
  (``retry_h``), name a try's content by, made once and kept
  (``engine.app._endpoint_retry_secret``: a plain hash let a reader of the directory confirm a guessed prompt);
- ``.lock``: held while an endpoint uses the directory (two would take each other's batches).

A record that cannot be read (cut by a power loss, from another version) is renamed ``*.bad`` and logged: one bad
record never keeps the endpoint from starting. A results line cut by a crash is dropped (that line is asked of the
engine again, which answers a request it already holds without generating it twice).

Writes that fail (a full disk) are logged and counted in ``write_errors``. What the endpoint must not accept
unless it is on disk is refused with a 507 instead (an upload, a batch's input and first record: taken with
200, they were gone or failed at the next start), and a batch whose end cannot be written stays open on disk,
with its results, for the next start to write it (saved ended, its paid answers were gone). A result that
cannot be appended is only logged: its line is asked again at the next start. The temporary files of writes a
kill cut, and inputs with no record, are swept when an endpoint takes the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from engine.app._endpoint_wire import ApiError, StoredFile
from engine.core._logkeys import get_logger
from engine.core.errors import ConfigError
from engine.core.files import write_atomic
from engine.core.result import Result

__all__ = ["EndpointState"]

log = get_logger("smartbatch.endpoint")


class EndpointState:
    """Writes and reads the endpoint's state under one directory (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files_dir, self.batches_dir = self.root / "files", self.root / "batches"
        self.videos_dir = self.root / "videos"
        for d in (self.files_dir, self.batches_dir, self.videos_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / ".lock", "a")  # noqa: SIM115  (held for the endpoint's life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ConfigError(f"state_dir {self.root}: another endpoint uses this directory; give each its own "
                              "--state-dir") from None
        self.write_errors = 0
        self._sweep()

    def _sweep(self) -> None:
        """What a kill left half made, now that no other endpoint writes here: the temporary files of writes it
        cut (an upload's bytes, up to its 200 MB; a helper's hunt), and inputs kept for a batch with no record."""
        # The root's too: the log of SDK tries' rewrite and its secret, the ledger's id (a review, revlog).
        for d in (self.root, self.files_dir, self.batches_dir, self.videos_dir):
            for tmp in d.glob(".tmp-*"):
                tmp.unlink(missing_ok=True)
        for d, data in ((self.batches_dir, "*.input"), (self.files_dir, "*.data")):
            for path in d.glob(data):  # bytes whose record a kill or a full disk kept from being written
                if not path.with_suffix(".json").exists():
                    path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"EndpointState({str(self.root)!r}, write_errors={self.write_errors})"

    def _guarded(self, what: str, write, strict: bool = False) -> None:
        """``write()``; a failure is logged and counted, and raised too if ``strict`` (what the endpoint must not
        accept unless it is on disk: an upload, a batch's input and first record, a batch's end)."""
        try:
            write()
        except OSError as exc:
            self.write_errors += 1
            log.error("endpoint state: could not write %s under %s (%s); a restart would not know it", what,
                      self.root, exc)
            if strict:
                raise

    def no_room(self, exc: OSError, what: str) -> ApiError:
        """The answer to a request refused because ``what`` could not be kept here."""
        return ApiError(507, f"the endpoint could not keep {what} in its state directory {self.root} "
                             f"({exc.strerror or exc}): not accepted; free room there and send it again",
                        type="server_error")

    def ledger_id(self) -> str | None:
        """The budget ledger id the endpoint last ran under (None: none recorded)."""
        try:
            return json.loads((self.root / "ledger.json").read_bytes()).get("ledger_id")
        except (OSError, ValueError, AttributeError):
            return None

    def record_ledger_id(self, current: str) -> None:
        if current != self.ledger_id():
            self._guarded("the budget ledger's id", lambda: _write_json(self.root / "ledger.json",
                                                                        {"ledger_id": current}))

    # -- files ----------------------------------------------------------------------------------------------
    def save_file(self, f: StoredFile, strict: bool = False) -> None:
        def write() -> None:
            write_atomic(self.files_dir / f"{f.id}.data", f.data, durable=True)
            try:
                _write_json(self.files_dir / f"{f.id}.json", {"id": f.id, "filename": f.filename,
                                                               "purpose": f.purpose, "created_at": f.created_at,
                                                               "created_ns": time.time_ns(), "tenant": f.tenant})
            except OSError:  # its bytes would stay for good, listed by nothing (a helper's review)
                (self.files_dir / f"{f.id}.data").unlink(missing_ok=True)
                raise
        self._guarded(f"file {f.id}", write, strict)

    def _drop(self, what: str, paths: list[Path]) -> None:
        def drop() -> None:
            for path in paths:
                path.unlink(missing_ok=True)
        self._guarded(what, drop)

    def drop_file(self, file_id: str) -> None:
        self._drop(f"the deletion of file {file_id}", [self.files_dir / f"{file_id}{s}" for s in (".json", ".data")])

    def files(self) -> dict[str, StoredFile]:
        out: list[tuple[int, StoredFile]] = []
        for meta in self.files_dir.glob("*.json"):
            try:
                m = json.loads(meta.read_bytes())
                f = StoredFile(m["id"], m["filename"], m["purpose"], (self.files_dir / f"{m['id']}.data").read_bytes(),
                               int(m["created_at"]), m.get("tenant") or self._owner_before_tenants(m["id"]))
                out.append((int(m.get("created_ns", 0)), f))
            except Exception as exc:
                _set_aside(meta, exc)
        return {f.id: f for _, f in sorted(out, key=lambda t: (t[0], t[1].created_at))}  # in upload order

    def _owner_before_tenants(self, file_id: str) -> str:
        """The tenant of a file kept before files had one: a batch's output or error file is its batch's (asked
        for by that tenant), any other 'default'."""
        bid, _, kind = file_id.removeprefix("file-").rpartition("-")
        try:
            if kind in ("output", "error"):
                return str(json.loads((self.batches_dir / f"{bid}.json").read_bytes())["tenant"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return "default"

    # -- batches --------------------------------------------------------------------------------------------
    def keep_input(self, batch_id: str, file_id: str, strict: bool = False) -> None:
        def link() -> None:
            src, dst = self.files_dir / f"{file_id}.data", self.batches_dir / f"{batch_id}.input"
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # a filesystem without hard links
                dst.write_bytes(src.read_bytes())
        self._guarded(f"the input of batch {batch_id}", link, strict)

    def take_batch(self, batch_id: str, file_id: str, record: dict[str, Any]) -> None:
        """A batch's input and first record, on disk before the engine has a line, or ``ApiError`` (507) with
        nothing of it left: taken with a failed write, it was in progress and then failed at the next start,
        its input gone (a helper's hunt: a full disk)."""
        try:
            self.keep_input(batch_id, file_id, strict=True)
            self.save_batch(record, strict=True)
        except OSError as exc:
            self.forget_batch(batch_id)
            raise self.no_room(exc, "the batch") from None

    def save_batch(self, record: dict[str, Any], strict: bool = False) -> None:
        self._guarded(f"batch {record['id']}", lambda: _write_json(self.batches_dir / f"{record['id']}.json", record),
                      strict)

    def add_result(self, batch_id: str, res: Result) -> None:
        def append() -> None:  # opened per result: an endpoint with thousands of open batches holds no handles
            with open(self.batches_dir / f"{batch_id}.results.jsonl", "ab") as out:
                out.write(res.model_dump_json().encode() + b"\n")
        self._guarded(f"a result of batch {batch_id}", append)

    def rewrite_results(self, batch_id: str, results: list[Result]) -> None:
        """An open batch's results, written whole (its appends may have failed as its end did: a full disk)."""
        data = b"".join(r.model_dump_json().encode() + b"\n" for r in results)
        self._guarded(f"the results of batch {batch_id}",
                      lambda: write_atomic(self.batches_dir / f"{batch_id}.results.jsonl", data, durable=True))

    def ended(self, batch_id: str) -> None:
        """The batch's record holds all it shows now: its input and results go."""
        self._drop(f"the end of batch {batch_id}", [self.batches_dir / f"{batch_id}{s}"
                                                    for s in (".input", ".results.jsonl")])

    def forget_batch(self, batch_id: str) -> None:
        """A create that did not go through: nothing of it stays."""
        self._drop(f"batch {batch_id}", [self.batches_dir / f"{batch_id}{s}" for s in (".json", ".input",
                                                                                    ".results.jsonl")])

    def set_aside(self, batch_id: str, exc: BaseException) -> None:
        """A record read but not taken back (from another version?): renamed *.bad with its input and results,
        so the next start skips it and nothing of it is left to grow."""
        _set_aside(self.batches_dir / f"{batch_id}.json", exc)
        for suffix in (".input", ".results.jsonl"):
            path = self.batches_dir / f"{batch_id}{suffix}"
            if path.exists():
                _set_aside(path, exc)

    def batches(self) -> list[tuple[dict[str, Any], Path, dict[str, Result]]]:
        """Every readable batch record, with the path of its input (an open one's, if kept) and the results in
        so far (by custom_id), oldest first."""
        out = []
        for path in self.batches_dir.glob("*.json"):
            try:
                rec = json.loads(path.read_bytes())
                bid = rec["id"]
                results = self._read_results(bid)
                out.append((rec, self.batches_dir / f"{bid}.input", results))
            except Exception as exc:
                _set_aside(path, exc)
        return sorted(out, key=lambda t: (t[0].get("created_ns", 0), t[0].get("created_at", 0)))

    def _read_results(self, batch_id: str) -> dict[str, Result]:
        path = self.batches_dir / f"{batch_id}.results.jsonl"
        if not path.exists():
            return {}
        data = path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) < len(data):  # a line a crash cut: dropped, so the next append starts a line of its own
            with open(path, "r+b") as f:
                f.truncate(len(whole))
        got: dict[str, Result] = {}
        for line in whole.split(b"\n"):
            if line:
                try:
                    res = Result.model_validate_json(line)
                except ValueError:  # not a result (written by another version?): that line is asked again
                    continue
                got[res.id] = res
        return got

    # -- videos ---------------------------------------------------------------------------------------------
    def save_video(self, record: dict[str, Any], strict: bool = False) -> None:
        self._guarded(f"video {record['id']}", lambda: _write_json(self.videos_dir / f"{record['id']}.json", record),
                      strict)

    def drop_video(self, video_id: str) -> None:
        self._drop(f"video {video_id}", [self.videos_dir / f"{video_id}.json"])

    def set_aside_video(self, video_id: str, exc: BaseException) -> None:
        _set_aside(self.videos_dir / f"{video_id}.json", exc)

    def videos(self) -> list[dict[str, Any]]:
        """Every readable video record, oldest first: an object whose id is its file's name (a record is set
        aside by its id, and sorted by its fields: a list there stopped the endpoint's start, and a bad record
        naming another video had that video's file set aside)."""
        out = []
        for path in self.videos_dir.glob("*.json"):
            try:
                rec = json.loads(path.read_bytes())
                if not isinstance(rec, dict) or rec.get("id") != path.stem:
                    raise ValueError(f"not the record of video {path.stem}")
                out.append(rec)
            except Exception as exc:
                _set_aside(path, exc)
        return sorted(out, key=lambda r: (r.get("created_ns", 0), r.get("created_at", 0)))

    def close(self) -> None:
        self._lock.close()  # and with it the lock


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(doc, separators=(",", ":")).encode(), durable=True)


def _set_aside(path: Path, exc: BaseException) -> None:
    log.error("endpoint state: %s is unreadable (%s: %s); renamed *.bad and left out", path, type(exc).__name__, exc)
    try:
        os.replace(path, path.with_suffix(path.suffix + ".bad"))
    except OSError:
        pass
