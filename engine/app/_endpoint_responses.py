"""The endpoint's record of whose each provider response id is (``engine.core.response_owners``): a
``previous_response_id`` or ``conversation`` that no answer of the caller's tenant carried is a 404 in OpenAI's
words, naming the field, before the engine sees the request; in a batch, that line alone is an error line.

The record is its engine driver's own (``Engine.responses``: what the driver learns from every answer it gets),
so the endpoint's check and the driver's agree; an engine without one (a test's) gets one here. Before a check, an
id the record does not know is asked of the engine (``Engine.know_owners``: what the engine's other drivers learnt,
another replica's answers among them); an engine that does not answer then makes a request the record alone would
refuse a 503 to send again, not a 404 that says the caller's own conversation is gone. Learnt: the id of
each Responses answer the endpoint gives (a call's, not a copy from the cache: a copy's id is its source's), and of
each answered line of a ``/v1/responses`` batch once its output is written.

With ``--state-dir`` the ids the endpoint gave out are appended to ``responses.jsonl`` (one ``[kind, id, tenant]``
line each, before the answer leaves), and again each time a request continues one (before it goes), read back at
the next start, later lines as more lately used, and rewritten whole, least lately used first, once the log holds
twice what the record keeps: a restarted endpoint takes the continuation of a conversation it answered, and
forgets first what it would have forgotten first had it run on.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.app._endpoint_wire import RETRY_AFTER_S, ApiError
from engine.core._logkeys import get_logger
from engine.core.batchfile import BatchFile
from engine.core.files import write_atomic
from engine.core.response_owners import ResponseOwners, refs_of

__all__ = ["OwnedResponses"]

log = get_logger("smartbatch.endpoint")

LOG_NAME = "responses.jsonl"


class OwnedResponses:
    """The record (``owners``) and its log under the endpoint's state directory (``root``; None: memory only)."""

    def __init__(self, owners: ResponseOwners | None, root: Path | None = None,
                 know: Callable[[Iterable[Mapping[str, Any]]], Awaitable[bool]] | None = None) -> None:
        self.owners = owners if owners is not None else ResponseOwners()
        self._know = know  # asks the engine about ids the record does not know (``Engine.know_owners``)
        self._path = Path(root) / LOG_NAME if root is not None else None
        self._lines = 0  # in the log: rewritten whole past twice what the record keeps
        self.write_errors = 0
        if self._path is not None:
            self._read()

    def __repr__(self) -> str:
        return f"OwnedResponses({self.owners!r}, log={str(self._path) if self._path else None!r})"

    async def acheck(self, tenant: str, body: Mapping[str, Any] | None) -> None:
        """``check``, once the engine said whose the ids ``body`` names and the record does not know are."""
        answered = await self.ask([body])
        if not answered and (no := self.owners.refusal(tenant, body)) is not None and self.owners.unknown([no.ref]):
            raise _unanswered()  # refused for want of the engine's word, not for another tenant's id
        self.check(tenant, body)

    async def alines(self, bf: BatchFile, tenant: str, answered: Mapping[str, Any] | None = None) -> BatchFile:
        """``lines``, once the engine said whose the ids the lines name are (one ask for the whole file): if it
        did not answer and a line would be refused, the create is a 503 to send again, no line refused for it."""
        bodies = [ln.request.body for ln in bf.lines if ln.request is not None]
        if not await self.ask(bodies):
            refused = [no.ref for b in bodies if (no := self.owners.refusal(tenant, b)) is not None]
            if self.owners.unknown(refused):
                raise _unanswered()
        return self.lines(bf, tenant, answered)

    async def ask(self, bodies: list[Mapping[str, Any] | None]) -> bool:
        """Ask the engine about the ids ``bodies`` name that the record does not know; False if it did not answer."""
        return True if self._know is None else await self._know([b for b in bodies if b is not None])

    def check(self, tenant: str, body: Mapping[str, Any] | None) -> None:
        """Raise the 404 of an id ``body`` names that is not ``tenant``'s (``previous_response_id``, ``conversation``)."""
        no = self.owners.refusal(tenant, body)
        if no is not None:
            param = no.field.removeprefix("body.")
            raise ApiError(404, no.message, param=param, code=no.code)
        self._used(tenant, [(kind, ident) for _, kind, ident in refs_of(body)])

    def lines(self, bf: BatchFile, tenant: str, answered: Mapping[str, Any] | None = None) -> BatchFile:
        """``bf`` with each line that names an id not ``tenant``'s an invalid line of its own, naming the field;
        ``answered``: results by request id, of lines that stay as they are (paid for before a restart)."""
        out, answered, used = [], answered or {}, []
        for ln in bf.lines:
            open_ = ln.request is not None and not any(q.id in answered for q in ln.choices)
            no = self.owners.refusal(tenant, ln.request.body) if open_ else None
            out.append(ln if no is None else replace(ln, request=None, more=(), problem=(no.field, no.message)))
            used += [(kind, ident) for _, kind, ident in refs_of(ln.request.body)] if open_ and no is None else []
        self._used(tenant, used)
        return BatchFile(bf.source, out, bf.file_problems)

    def learn(self, tenant: str, answers: list[Mapping[str, Any]]) -> None:
        """Make the ids of ``answers`` (Responses bodies given to ``tenant``) its own, on disk first if kept there
        (each, though its driver may have learnt it already from the raw answer: the driver's record is memory)."""
        mine = [ref for body in answers for ref in self.owners.learn(tenant, body)]
        if mine and self._path is not None:
            self._append([[kind, ident, tenant] for kind, ident in mine])

    def _used(self, tenant: str, refs: list[tuple[str, str]]) -> None:
        """Log ``refs`` (ids of ``tenant``'s a request continues) as used now: read back, a later row counts as
        more lately used, so a restart forgets what this run would have forgotten. Logged only when learnt, a
        conversation continued all day sat among the oldest rows and was the first forgotten at a restart (past
        ``kept`` rows), an open batch's line continuing it refused once taken back."""
        if refs and self._path is not None:  # only the tenant's: an input item's own id (never learnt) is nobody's
            mine = [[kind, ident, owner] for kind, ident, owner in self.owners.known(refs) if owner == tenant]
            if mine:
                self._append(mine)

    def _append(self, rows: list[list[str]]) -> None:
        try:
            if self._lines + len(rows) > 2 * self.owners.kept:
                self._rewrite()
                return
            with open(self._path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
            self._lines += len(rows)
        except OSError as exc:  # the answer still goes: this endpoint knows the id until it restarts
            self.write_errors += 1
            log.warning("endpoint: %d response id(s) not kept in %s (%s); a restart will refuse their "
                        "continuation", len(rows), self._path, exc)

    def _rewrite(self) -> None:
        assert self._path is not None
        rows = self.owners.rows()
        write_atomic(self._path, "".join(json.dumps(list(r)) + "\n" for r in rows).encode())
        self._lines = len(rows)

    def _read(self) -> None:
        assert self._path is not None
        # A rewrite a kill cut (the endpoint holds the directory's lock by now: no other writes here).
        for tmp in self._path.parent.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        if not self._path.exists():
            return
        rows, bad = [], 0
        with open(self._path, encoding="utf-8", errors="replace") as f:
            for text in f:
                try:
                    kind, ident, tenant = json.loads(text)
                    rows.append((str(kind), str(ident), str(tenant)))
                except (ValueError, TypeError):  # a line a crash cut: that one id is refused from now on
                    bad += 1
        if bad:
            log.warning("endpoint: %d unreadable line(s) in %s skipped", bad, self._path)
        self.owners.load(rows)
        self._lines = len(rows)
        if len(rows) > self.owners.kept or bad:
            try:
                self._rewrite()
            except OSError as exc:
                self.write_errors += 1
                log.warning("endpoint: %s not rewritten (%s)", self._path, exc)


def _unanswered() -> ApiError:
    return ApiError(503, "the engine did not say in time whose a response or item id this request names is (its "
                         "result hub is restarting?); send the request again", type="server_error",
                    code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
