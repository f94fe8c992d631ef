"""Members of a batch taken from the hub's index that no driver re-admitted (``actors._batch_index``): strays.

The driver's sweep takes such a batch up with the members that came back (``BatchIndex.adopt``, ``force``); the
batch, re-attached by the provider's id, runs the others' lines too, and the provider bills them. Before, nothing
here knew those lines: each was read as a response naming no member (an ERROR), its claim held until
``reservation_ttl_s`` and then let go, its spend counted by no ledger (a review's run at the emulator, 4 members, 3
re-admitted: 4 items billed, $0.000244, the ledger $0.000179), and the member, should its driver re-admit it later,
was sent again, paid twice.

Now each stray is a member of the handle (``Provider.reattach``) under a stand-in request made from its entry (its
tenant and id from its uid, the batch's provider and model, its attempts: its ``custom_id``), so the provider
prices its line as any member's, by the cost model at the usage the line reports. When the batch ends its claim is
settled at that cost, as a member's is; with no line (cancelled, never run) or one refused, released at 0 (at once
for a simulated batch, which is drawn again without it). The line's outcome is kept: a late re-admission of the
request is answered with it (``recall``/``holds`` say it is held, ingest hands its request over, ``adopt``), no new
call; one that came back while the batch ran gets it when the batch ends. The hub cannot be sent it before: a
``Result`` needs the request, and the entry has none. A review (stop 79) added: the strays are read with the
batch (a give-up past ``batch_results_read_max_s`` fails them possibly billed, as the members), apart from its
members' lines (its turnaround), settled at their bound by the engine's stop, named in its record and index entry
(a restart before it ends holds them again, ``Strays``), and a request of other content under a stray's id (free
again at the hub) is carried out, not answered with the stray's line (``_stray_of_other``)."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from actors._shards import class_shard
from actors._types import Job
from engine.core._logkeys import get_logger
from engine.core.cost import reserve_bound
from engine.core.features import fingerprint
from engine.core.provider_api import CallJob, CallOutcome, call_key
from engine.core.request import Request, validation_context
from engine.runtime.outcomes import verdict

__all__ = ["STRAYS_KEPT", "BatchStrays", "Strays"]

log = get_logger("smartbatch.dispatcher")

STRAYS_KEPT = 4096  # read strays' outcomes kept for a late re-admission (its driver gone, most never come)
STRAYS_OUTPUT_MB = 64.0  # of their outputs, the newest kept (an image's is 1-6 MB of base64: ``_keep_done``'s rule)


class Strays(NamedTuple):
    """The strays of a batch known by its provider's id, in its journal record (its ``body``, which such a batch
    has no use for) and so in its index entry: (entry, call job) of each, this member alone in the entry. A restart
    before the batch ends holds them again, from the record (``_strays_again``) or, that lost too, as members of the
    entry. Named by neither (a review), they were no longer held after it: their lines counted nowhere, their
    requests sent again should they come back, paid twice."""

    of: tuple


class _Stray:
    __slots__ = ("cj", "claim", "entry", "key", "out", "read", "req")

    def __init__(self, key: str, entry: tuple, cj: CallJob, claim: str | None):
        self.key, self.entry, self.cj, self.claim = key, entry, cj, claim  # entry: the index entry, this member alone
        self.req: Request | None = None  # its request, once re-admitted
        self.out: CallOutcome | None = None
        self.read = False  # the batch ended (``out``: its line, None where none came back)


def stand_in(uid: str, provider: str, model: str, attempts: int, row: int, start: float, context: dict) -> CallJob:
    """The call job of a member known by its uid alone (``Request.uid``: ``<len>:<tenant>/<id>``): its call key
    names its line of the batch, and the provider prices that line by its usage, the model's and the mode's."""
    n, _, rest = uid.partition(":")
    tenant, rid = rest[:int(n)], rest[int(n) + 1:]
    # (never sent: a media model's wants a prompt. Its params are unknown: an image is priced at the model's
    # default size, and at the quality its answer reports where one does, OpenAI's. Checked against the engine's
    # catalog, one it was given having models of its own; ``kept``: its tenant as journaled, ``tenant_ends_problem``)
    req = Request.model_validate({"id": rid, "tenant": tenant, "arrival_s": 0.0, "provider": provider,
                                  "model": model, "input_tokens": 0, "output_tokens": 0, "prompt": "-"},
                                 context={**context, "kept": True})
    return CallJob(call_key(tenant, rid, model, attempts), req, start, attempts, row)


class BatchStrays:
    """Mixed into ``BatchIndex``: the strays of a batch taken up at the sweep's forced re-admission."""

    def _strays(self) -> dict[str, _Stray]:
        return self.__dict__.setdefault("_stray", {})

    def _stray_calls(self, key: str, e: tuple, gone: list[tuple], jobs: list[Job], start: float) -> list[CallJob]:
        """``gone`` (entry members no driver re-admitted) of batch ``key`` as strays: still held here (``_known``),
        their call jobs to re-attach the batch with. A simulated batch (drawn again without them) or one whose id
        is unknown has none: their claims go at 0 (simulated) or stay held (its create cut, ``_let_go``)."""
        uids = [m[0] for m in gone]
        if e[3] is None:
            self._known.difference_update(uids)
            return []
        if e[3] == "":
            self._known.difference_update(uids)
            self._settle.extend((m[5], 0.0) for m in gone if m[5] is not None)
            return []
        model, strays, out = jobs[0].req.model, self._strays(), []
        context = validation_context(self.catalog, self.settings)
        for m in gone:
            try:
                cj = stand_in(m[0], self.name, model, m[3], m[1], start, context)
            except Exception as exc:  # (a uid of another shape): as before, its line unread and uncounted
                log.error("dispatcher %s: batch %s: member %s, not re-admitted, cannot be read from its entry (%s): "
                          "its line's cost is not counted", self.name, key, m[0], exc)
                self._known.discard(m[0])
                continue
            strays[m[0]] = _Stray(key, (*e[:4], [m], *e[5:]), cj, m[5])
            out.append(cj)
        return out

    def _with_strays(self, key: str, cjobs: list[CallJob]) -> list[CallJob]:
        """``cjobs`` of batch ``key`` and its strays', to read its results with (``cjobs`` itself where it has
        none): a read given up on past ``batch_results_read_max_s`` fails them possibly billed, as the members
        (``_unread_batch``), and a read's bound counts their lines. Left out (a review), they were read as lines
        that never ran, their claims released at 0, and sent again should they come back: paid twice."""
        strays = self.__dict__.get("_stray")
        mine = [s.cj for s in strays.values() if s.key == key and not s.read] if strays else None
        return cjobs + mine if mine else cjobs

    def _weighed(self, key: str, jobs: list[Job]) -> list[Job]:
        """``jobs`` of batch ``key`` and its strays', whose lines its results hold too, for the image results room
        (``_results_slot``; ``jobs`` itself where it has none): weighed by its members' alone (a review), a batch
        of one member back and its strays read them all on a slot's room for one."""
        mine = self._with_strays(key, [])
        return jobs + [Job(cj.row, cj.req, "") for cj in mine] if mine else jobs

    def _strays_apart(self, key: str, read: dict | None) -> tuple[dict, dict | None]:
        """Batch ``key``'s lines ``read`` (None: unread) as its members' and its strays' (``read`` itself where it
        has none). Among its members' (a review), a batch every line of which ran was learned as cut short, its
        lines outnumbering its members: its groupers told only that it ran longer than it did."""
        mine = self._with_strays(key, []) if read else None
        return (read or {}, read) if not mine else (read, {cj.key: read.pop(cj.key) for cj in mine if cj.key in read})

    def _strays_cut(self) -> list[tuple[str, Job]]:
        """The strays of batches the engine's stop cuts short (unread): their lines run as the members' do, so each
        claim is settled at its bound too, its stand-in's (``_settle_cut_short``). Left out (a review), it was held
        until ``reservation_ttl_s``, its spend then counted by no ledger."""
        strays = self.__dict__.get("_stray")
        return [("batch_api", Job(s.cj.row, s.cj.req, "", s.cj.attempt, claim=s.claim)) for s in strays.values()
                if not s.read and s.key in self._open] if strays else []

    def _strays_of(self, key: str) -> Strays | None:
        """Batch ``key``'s strays, for its record (``Strays``)."""
        strays = self.__dict__.get("_stray") or {}
        mine = tuple((s.entry, s.cj) for s in strays.values() if s.key == key and not s.read)
        return Strays(mine) if mine else None

    def _strays_again(self, key: str, body) -> None:
        """A restart re-attaches batch ``key`` from its record: its strays (``body``, where it is ``Strays``) are
        held again, as at its take-up, but for one carried here already."""
        for e, cj in body.of if isinstance(body, Strays) else ():
            m = e[4][0]
            if m[0] not in self._known and m[0] not in self._done:
                self._strays()[m[0]] = _Stray(key, e, cj, m[5])
                self._known.add(m[0])

    def _strays_wanted(self, uids: list[str]) -> set[str]:
        strays = self.__dict__.get("_stray") or {}
        return {u for u in uids if u in strays}

    def _strays_back(self, requests: list[Request], checked: bool = False) -> None:
        """Requests of strays re-admitted: answered with their line once the batch is read. One of other content
        (``_stray_of_other``) goes to its grouper instead, as a request no dispatch holds. ``checked``: their
        content is the strays' (a copy's, ``_fresh``)."""
        strays = self.__dict__.get("_stray") or {}
        share = self.settings.cache.share_across_tenants
        for r in requests:
            s = strays.get(r.uid)
            if s is None:
                continue
            j = None if checked else Job(s.cj.row, r, fingerprint(r, share_across_tenants=share),
                                         cache_shard=class_shard(r, len(self.caches)) if self.caches else 0)
            if j is not None and self._stray_of_other(j):
                self._readmit.append(j)
                self._kick()
                continue
            s.req = r
            if s.read:
                self._stray_answer(r.uid)

    def _stray_of_other(self, j: Job) -> bool:
        """Whether ``j``, under a stray's id, is another request: of other content, the id free again at the hub
        once the stray's driver was long gone (docs/service.md, "one id, one request"). The stray then lets the id
        go (its line still read and settled on its claim, under a name no request has) and ``j`` is carried out
        as any. Taken for the stray's (a review), it was answered with the other content's line."""
        strays = self.__dict__.get("_stray")
        s = strays.get(j.req.uid) if strays else None
        if s is None or s.req is not None or s.entry[4][0][2] == j.fp:
            return False
        del strays[j.req.uid]
        if not s.read:
            strays["\0" + j.req.uid] = s
            rec = self._open.get(s.key)  # its record no longer names it: a restart would hold the id again
            if rec is not None and isinstance(rec[5], Strays):
                rest = tuple(x for x in rec[5].of if x[0][4][0][0] != j.req.uid)
                self._open[s.key] = (*rec[:5], Strays(rest) if rest else None)
                self._spawn(self._journal_put(s.key), [], rec[0])
        self._known.discard(j.req.uid)
        return True

    def _strays_end(self, key: str, outs: dict | None) -> None:
        """Batch ``key`` ended (``outs``: its lines; None when they could not be read, its members sent again):
        each stray's claim settled at its line's cost, as a member's (a line not billed: 0). Unread, a stray whose
        request came goes again with its claim, as the members do; one whose request did not fails possibly billed
        at its bound, held, as the members of a read given up on (``_unread_batch``): before (a review), it was no
        longer held, its claim left until ``reservation_ttl_s``, and its late request sent again, paid twice."""
        strays = self.__dict__.get("_stray")
        mine = [u for u, s in strays.items() if s.key == key and not s.read] if strays else []
        if not mine:
            return
        kept: deque = self.__dict__.setdefault("_strays_kept", deque())
        done = self._settled_at_stop or ()
        for uid in mine:
            s = strays[uid]
            if outs is None and s.req is not None:  # (its members go again: it goes with them, and its claim)
                log.error("dispatcher %s: batch %s, its results unread, ran the line of %s, which no driver had "
                          "re-admitted at its take-up: its cost is not counted", self.name, key, uid)
                s.read = True
                self._stray_answer(uid, s.claim)
                continue
            o = s.out = outs.get(s.cj.key) if outs is not None else CallOutcome(
                False, self.clock.now(), reserve_bound(s.cj.req, self.catalog, "batch_api", None), retryable=False,
                real=self.provider.real, maybe_billed=True, error=f"{self.name}: the results of batch {key} could "
                "not be read (its re-admitted members were sent again); its line ran and may be billed, so it is not "
                "sent again")
            s.read = True
            usd = o.cost if o is not None and (o.ok or o.maybe_billed) else 0.0
            if s.claim is None or s.claim not in done:  # (settled at its bound by the stop: counted there, once)
                if o is not None and not o.ok and o.maybe_billed and o.cost:
                    self.possibly_billed += 1
                    self.possibly_billed_usd += o.cost
                if s.claim is not None:
                    self._settle.append((s.claim, usd))
            if s.req is not None:
                self._stray_answer(uid)
            elif uid[0] == "\0":  # its id taken by another request (``_stray_of_other``): nothing to keep
                strays.pop(uid)
            elif o is None or verdict(o.ok, s.cj.attempt + 1, self.max_att, o.retryable) == "retry":
                self._stray_drop(uid)  # nothing billed: sent anew should it come back
            else:
                kept.append(uid)
        if len(kept) > STRAYS_KEPT:  # those answered since leave their place first (kept, one held was let go)
            kept = self.__dict__["_strays_kept"] = deque(u for u in kept if u in strays)
        while len(kept) > STRAYS_KEPT:
            self._stray_drop(kept.popleft())
        self._strays_outputs(kept, strays)
        self._kick()

    def _stray_answer(self, uid: str, claim: str | None = None) -> None:
        """A read stray whose request is here: resolved as the member it was, its claim settled already (but for
        ``claim``, one its batch's unread end left it)."""
        s = self._strays().pop(uid)
        j = self._jobs_of(s.entry, {uid: s.req})[0]._replace(claim=claim)
        self.in_flight += 1  # (let go by the resolution, as a member's)
        o = s.out
        if o is None:  # never ran: back to its policy, as an unfinished member at a hedge
            self._hedged(j)
        else:
            if not o.ok and o.maybe_billed:  # settled on its claim already: said on its result, not settled again
                j, o = j._replace(billed_usd=j.billed_usd + o.cost), o._replace(maybe_billed=False)
            self._attempt(s.entry[0], j, o.ok, o.cost, "batch_api", o)
        self._kick()

    def _strays_outputs(self, kept: deque, strays: dict) -> None:
        """The outputs the ``kept`` strays hold, the newest ``STRAYS_OUTPUT_MB``: past it, the oldest's goes, and
        its request, should it come, is answered that it was made and billed but its output no longer kept, not
        made again (as ``_keep_done`` does a finished request's). Bounded by their count alone (a review), an
        image batch's strays held all their images, gigabytes, for requests that mostly never come."""
        held = [(u, strays[u].out) for u in kept if u in strays and strays[u].out is not None]
        size = sum(len(o.output or "") for _, o in held)
        for u, o in held:
            if size <= STRAYS_OUTPUT_MB * 2**20:
                return
            if o.output:
                size -= len(o.output)
                strays[u].out = o._replace(ok=False, output=None, raw=None, usage=None, tool_calls=None,
                                           retryable=False, maybe_billed=False, error=(
                    f"its line of a batch taken up after a restart was made and billed (${o.cost:.6f}, counted on "
                    f"its budget), but its output ({len(o.output):,} characters) was no longer kept when its request "
                    f"came back (a dispatcher keeps its newest {STRAYS_OUTPUT_MB:g} MB of those outputs); not made "
                    "again, so not paid twice"))

    def _stray_drop(self, uid: str) -> None:
        if self._strays().pop(uid, None) is not None:
            self._known.discard(uid)
