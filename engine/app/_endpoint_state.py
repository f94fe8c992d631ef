"""The endpoint's files and batches on disk (``smartbatch serve --state-dir DIR``), so a restarted replica (a
Serve restart, a redeploy, ``serve`` run again) knows every file and batch it had accepted.

Layout under ``DIR``:

- ``files/<id>.json`` and ``files/<id>.data``: a file's metadata and bytes (uploads, outputs, error files);
- ``batches/<id>.json``: a batch's record (status, times, errors, file ids, and once ended its counts, usage
  and report), written whole on every change (a temporary file renamed over it: never half written);
- ``batches/<id>.input``: the batch's input, a hard link to its file's bytes taken at create (a user may delete
  the file while its batch runs, as OpenAI allows);
- ``batches/<id>.results.jsonl``: each line's result as it arrives (an open batch only).

A record is JSON a person can read; a line of results cut by a crash is skipped on load (that line is asked of
the engine again, which answers a request it already holds without generating it twice).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, TextIO

from engine.app._endpoint_wire import StoredFile
from engine.core.result import Result

__all__ = ["EndpointState"]

log = logging.getLogger("smartbatch.endpoint")


class EndpointState:
    """Writes and reads the endpoint's state under one directory (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files_dir, self.batches_dir = self.root / "files", self.root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        self._results: dict[str, TextIO] = {}  # open batch -> its results file, appended to

    def __repr__(self) -> str:
        return f"EndpointState({str(self.root)!r}, {len(self._results)} batches open)"

    # -- files ----------------------------------------------------------------------------------------------
    def save_file(self, f: StoredFile) -> None:
        (self.files_dir / f"{f.id}.data").write_bytes(f.data)
        _write_json(self.files_dir / f"{f.id}.json", {"id": f.id, "filename": f.filename, "purpose": f.purpose,
                                                       "created_at": f.created_at, "created_ns": time.time_ns()})

    def drop_file(self, file_id: str) -> None:
        for suffix in (".json", ".data"):
            (self.files_dir / f"{file_id}{suffix}").unlink(missing_ok=True)

    def files(self) -> dict[str, StoredFile]:
        out: dict[str, tuple[int, StoredFile]] = {}
        for meta in self.files_dir.glob("*.json"):
            try:
                m = json.loads(meta.read_text())
                data = (self.files_dir / f"{m['id']}.data").read_bytes()
            except (OSError, ValueError, KeyError) as exc:
                log.error("endpoint state: file record %s is unreadable (%s); it is left out", meta, exc)
                continue
            out[m["id"]] = (m["created_ns"], StoredFile(m["id"], m["filename"], m["purpose"], data, m["created_at"]))
        return {k: f for k, (_, f) in sorted(out.items(), key=lambda kv: kv[1][0])}  # listed in upload order

    # -- batches --------------------------------------------------------------------------------------------
    def keep_input(self, batch_id: str, file_id: str) -> None:
        src, dst = self.files_dir / f"{file_id}.data", self.batches_dir / f"{batch_id}.input"
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # a filesystem without hard links
            dst.write_bytes(src.read_bytes())

    def save_batch(self, record: dict[str, Any]) -> None:
        _write_json(self.batches_dir / f"{record['id']}.json", record)

    def add_result(self, batch_id: str, res: Result) -> None:
        out = self._results.get(batch_id)
        if out is None:
            out = self._results[batch_id] = open(self.batches_dir / f"{batch_id}.results.jsonl", "a",
                                                 encoding="utf-8")
        out.write(res.model_dump_json() + "\n")
        out.flush()  # in the OS's hands: it outlives this process

    def ended(self, batch_id: str) -> None:
        """The batch's record holds all it shows now: its input and results go."""
        out = self._results.pop(batch_id, None)
        if out is not None:
            out.close()
        for suffix in (".input", ".results.jsonl"):
            (self.batches_dir / f"{batch_id}{suffix}").unlink(missing_ok=True)

    def batches(self) -> list[tuple[dict[str, Any], bytes | None, dict[str, Result]]]:
        """Every batch's record, with (an open one's) input bytes and the results in so far (by custom_id),
        oldest first."""
        out = []
        for path in self.batches_dir.glob("*.json"):
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.error("endpoint state: batch record %s is unreadable (%s); it is left out", path, exc)
                continue
            inp = self.batches_dir / f"{rec['id']}.input"
            out.append((rec, inp.read_bytes() if inp.exists() else None, self._read_results(rec["id"])))
        return sorted(out, key=lambda t: t[0]["created_ns"])

    def _read_results(self, batch_id: str) -> dict[str, Result]:
        path = self.batches_dir / f"{batch_id}.results.jsonl"
        got: dict[str, Result] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").split("\n"):
                if line:
                    try:
                        res = Result.model_validate_json(line)
                    except ValueError:  # the line a crash cut: that line is asked of the engine again
                        continue
                    got[res.id] = res
        return got

    def close(self) -> None:
        for out in self._results.values():
            out.close()
        self._results.clear()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)
