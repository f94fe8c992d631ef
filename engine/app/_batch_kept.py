"""What ``smartbatch batch`` keeps of an earlier run writing the same output: the lines its output file answers
and the choices its error file holds of lines of n choices (``engine.core._batch_rows``), written again and never
sent again (``--resume``), or a refusal to send them again (paid twice) without ``--overwrite``; and what the kept
answers cost, counted against the budgets of this run, never less than they were billed. A line the error file
says failed possibly billed (``BILLED_KEY``: it ran and its answer could not be read, or a call got none) is kept
back too, written again as it was, unless ``--resend-possibly-billed`` asks for it to be sent again: then its
bound goes with it (``BatchLine.billed``), counted in this run and carried on in the row its new answer or error
gets. A kept answer's own ``BILLED_KEY`` (its earlier calls that got no answer: a flex call given up) is counted
beside its cost, as its run's ledger counted it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

__all__ = ["RESEND_FLAG", "billed_charges", "earlier_answers", "kept_charges"]

RESEND_FLAG = "--resend-possibly-billed"


def earlier_answers(bf, input_file: Path, out: Path, errors: Path, *, resume: bool, overwrite: bool,
                    resend_billed: bool = False, cat=None, say: Callable[[str], None] | None = None):
    """(the lines still to answer, with the choices kept from the error file; the rows of ``out`` kept, by line
    number; the lines they answer; the error rows of lines kept back as possibly billed, by line number).
    ``ConfigError`` where a paid answer would be sent again or dropped. ``say``: told of each ``BILLED_KEY`` kept
    that holds no bound (``_mend``; ``cat`` prices it)."""
    from engine.core.batchfile import BatchFile, answered_choices, answered_lines, possibly_billed_lines
    from engine.core.errors import ConfigError

    if resume and overwrite:
        raise ConfigError("--resume keeps the lines OUT answers and --overwrite sends them again: give one")
    if resend_billed and not resume:
        raise ConfigError(f"{RESEND_FLAG} sends again, on a --resume, the lines the earlier run's error file says "
                          "failed possibly billed: give it with --resume (--overwrite sends every line again)")
    if overwrite:
        return bf, {}, [], {}
    done, partly, billed = answered_lines(out), answered_choices(errors), possibly_billed_lines(errors)
    ours = {ln.custom_id: ln for ln in bf.lines}
    if not resume:
        # Its answers were paid for: sent again, they are paid twice, and OUT's copy is lost (a helper's hunt).
        # A line of n choices one of which failed is in the error file, with the choices answered; a line that
        # failed possibly billed is there too, and sent again it may be paid twice.
        again = [cid for cid in dict.fromkeys([*done, *partly, *billed]) if cid in ours]
        if again:
            raise ConfigError(f"--out {out} (or its error file) already answers {len(again):,} line(s) of "
                              f"{input_file} (e.g. {again[0]!r}), or choices of them, paid for by an earlier run: "
                              "pass --resume to keep them and send only the others, --overwrite to send every line "
                              "again (paid again), or give another --out")
        if done or partly or billed:  # another input's answers, which writing OUT would drop
            some = list(dict.fromkeys([*done, *partly, *billed]))
            raise ConfigError(f"--out {out} (or its error file) holds {len(some):,} answered (or possibly billed) "
                              f"line(s) of another input (e.g. {some[0]!r}), paid for by an earlier run: give "
                              "another --out, or --overwrite to replace them")
        return bf, {}, [], {}
    # What an earlier run answered was paid for: written again, never sent again. OUT and the error file are
    # rewritten below: a paid answer of another input would be lost with no word.
    foreign = sorted((set(done) | set(billed)) - set(ours)) + sorted(
        cid for cid, got in partly.items() if cid not in done and not _fits(ours.get(cid), got))
    if foreign:
        raise ConfigError(f"--resume: {out} (or its error file) holds {len(foreign):,} answered line(s) or choices "
                          f"that are not {input_file}'s (e.g. {foreign[0]!r}: no such custom_id, or not a line of as "
                          "many choices): it is another input's output, and resuming would drop them; give another "
                          "--out, or the input that made it")
    _mend(ours, done, partly, billed, out, errors, cat, say)
    kept = {ln.no: done[ln.custom_id] for ln in bf.lines if ln.custom_id in done}
    # It ran and its answer could not be read (or a call got none): its error said "not sent again", and a resume
    # sent it again all the same, paid twice (a review). Kept back, its error line as it was, unless asked.
    held = {} if resend_billed else {ln.no: billed[ln.custom_id] for ln in bf.lines
                                     if ln.custom_id in billed and ln.no not in kept and ln.request is not None}
    lines = [_again(ln, partly, billed if resend_billed else {}) for ln in bf.lines
             if ln.no not in kept and ln.no not in held]
    return BatchFile(bf.source, lines, bf.file_problems), kept, [ln for ln in bf.lines if ln.no in kept], held


def _mend(ours: dict, done: dict, partly: dict, billed: dict, out: Path, errors: Path, cat, say) -> None:
    """Each ``BILLED_KEY`` of a row kept, a line held back or sent again, or a choice kept, that holds no bound
    (edited by hand, or hostile: a string, negative, NaN, Infinity) is said, naming its file, line and field, and
    set to what this run counts, so that no later resume counts less and the file is strict JSON again: the
    reserve bound of its calls (what one more call of each could bill; a string spelling more, that). Read as 0
    before (a review), the line was counted its answer alone, and an error line's sent again (maybe paid twice).
    Its neighbours go on."""
    from engine.core._batch_rows import bound_of
    from engine.core.batchfile import BILLED_KEY, CHOICES_KEY

    said: dict[str, None] = {}

    def mend(row: dict, where: str, reqs: list) -> None:
        if not isinstance(row, dict) or bound_of(row) is not None or not reqs:
            return
        nonlocal cat
        if cat is None:
            from engine.core.catalog import default_catalog
            cat = default_catalog()
        v, usd = row[BILLED_KEY], math.fsum(_dearest_bound(q, cat) for q in reqs)
        with contextlib.suppress(TypeError, ValueError):
            usd = max(usd, float(v)) if isinstance(v, str) and 0 <= float(v) < math.inf else usd
        row[BILLED_KEY] = usd
        said[f"{where}: field '{BILLED_KEY}' is {json.dumps(v)[:40]}, not a number of dollars >= 0: counted at "
             f"${usd:.6f} (its calls' reserve bound, or the number it spells if more), and written so"] = None

    for path, rows in ((out, done), (errors, billed), (errors, partly)):
        for cid, row in rows.items():
            ln = ours.get(cid)
            if ln is None or ln.request is None:
                continue
            where = f"{path}, the line of custom_id {cid!r}"
            if rows is partly:  # (its choices, by index)
                for k, c in row.items():
                    mend(c, f"{where}, {CHOICES_KEY} index {k}", ln.choices[k:k + 1])
                continue
            mend(row, where, ln.choices)
            for c in row.get(CHOICES_KEY) or () if rows is billed else ():
                k = c.get("index") if isinstance(c, dict) else None
                if type(k) is int and 0 <= k < len(ln.choices):
                    mend(c, f"{where}, {CHOICES_KEY} index {k}", ln.choices[k:k + 1])
    for m in said:
        (say or _log_warning)(m)


def _dearest_bound(q, cat) -> float:
    """The reserve bound of one call of ``q`` in the dearest mode its model takes (a model sync refuses raised
    there, and the resume of every line with it)."""
    from engine.core.cost import MODES, mode_allowed, reserve_bound

    prov, spec = cat.provider(q.provider), cat.model(q.provider, q.model)
    return max((reserve_bound(q, cat, m) for m in MODES if m != "reuse" and mode_allowed(prov, spec, m)),
               default=0.0)


def _log_warning(m: str) -> None:
    from engine.core._logkeys import get_logger

    get_logger("smartbatch.batch").warning("%s", m)


def _again(ln, partly: dict[str, dict], billed: dict[str, dict]):
    """``ln`` to send again: with the choices its error row holds answered, and the bound of the earlier calls
    that may have billed it (sent again by ``--resend-possibly-billed``: dropped, no later resume counted them)."""
    from engine.core._batch_rows import billed_of

    got = {"kept": partly[ln.custom_id]} if ln.custom_id in partly else {}
    if ln.custom_id in billed and ln.request is not None:
        got["billed"] = billed_of(billed[ln.custom_id])
    return dataclasses.replace(ln, **got) if got else ln


def billed_charges(lines: list, held: dict[int, dict], cat, out: Path) -> list:
    """The lines kept back as possibly billed (``held``: their error rows, by line number) as charges of their
    bound, as the earlier run's budget kept it, and of the choices their rows hold answered (a line of n
    choices, ``kept_charges``): an in-process ledger starts at 0 with each run."""
    from engine.core.batchfile import BILLED_KEY, CHOICES_KEY
    from engine.core.budgets import Charge

    mine = [ln for ln in lines if ln.no in held and ln.request is not None]
    answered = [dataclasses.replace(ln, kept={c["index"]: c for c in held[ln.no].get(CHOICES_KEY) or ()
                                              if isinstance(c, dict) and type(c.get("index")) is int
                                              and 0 <= c["index"] < len(ln.choices)}) for ln in mine]
    return [Charge(f"resume-billed:{out}:{ln.request.uid}", ln.request.tenant, ln.request.provider,
                   ln.request.model, float(held[ln.no][BILLED_KEY])) for ln in mine] + kept_charges(
        [ln for ln in answered if ln.kept], {}, cat, out)


def _fits(ln, got: dict[int, dict]) -> bool:
    """Whether the choices ``got`` can be choices of ``ln``: a valid line with that many choices at least."""
    return ln is not None and ln.request is not None and max(got) < len(ln.choices)


def kept_charges(lines: list, kept: dict[int, dict], cat, out: Path) -> list:
    """What each line kept from an earlier run cost (``kept``: its row, by line number), and each choice a line
    kept (``BatchLine.kept``), priced from the usage its answer reports at the sync price, its input at the
    dearer of what it reports and all but its reads written to a prompt cache (the file does not say which mode
    answered it, nor always what it wrote: never less than it cost), at the flex price where its body says the flex
    tier served it (``_tier``); a text one with no usage, or one that counts no input, as its run counted it (at
    its reserve bound, ``HttpBase._priced``); any other with none, at its list price. A line
    the cache answered (its request id says so) and a line that shares its request id with a line before it (a
    copy answered by that call) cost 0. A line of n choices is priced from the n calls' usage its answer adds up
    (choice 0's among them, at its call's, when the cache answered it: more than it cost, never less). Beside its
    cost, each kept answer's ``BILLED_KEY`` (its earlier calls that got no answer), and a line's ``billed`` (a line
    sent again by ``--resend-possibly-billed``: what its earlier calls may have billed)."""
    from engine.core._batch_rows import billed_of
    from engine.core.budgets import Charge

    charges, calls = [], set()
    for ln in lines:
        if ln.request is None:
            continue
        answers = [(ln.request, kept[ln.no].get("response") or {}, billed_of(kept[ln.no]))] if ln.no in kept else []
        answers += [(ln.choices[k], c, billed_of(c)) for k, c in sorted(ln.kept.items())]
        for req, resp, bound in answers:
            usd = _charged(req, resp, calls, cat) + bound
            charges.append(Charge(f"resume:{out}:{req.uid}", req.tenant, req.provider, req.model, usd))
        if ln.billed > 0:
            q = ln.request
            charges.append(Charge(f"resume-billed:{out}:{q.uid}", q.tenant, q.provider, q.model, ln.billed))
    return charges


def _charged(req, resp: dict, calls: set, cat) -> float:
    """What one kept answer (``resp``: its request id and body) cost; ``calls``: the request ids counted before."""
    from engine.core._gemini import gemini_output_tokens
    from engine.core.cost import price_alone, price_usage, reserve_bound

    body = resp.get("body")
    u = body.get("usage") if isinstance(body, dict) else None
    rid = resp.get("request_id")
    several = isinstance(body, dict) and len(body.get("choices") or ()) > 1  # n calls, never all from the cache
    if isinstance(rid, str) and not several and (rid.startswith("smartbatch_reused_") or rid in calls):
        usd = 0.0  # answered from the cache, or by a call another kept line already counts
    elif req.kind == "text" and isinstance(u, dict) and any(u.get(k) for k in _INPUT_COUNTS):
        # (a usage that counts no input, zeros written for an answer that came without one, is none: it was
        # charged $0, where its run counted it; a helper's hunt)
        chat = "prompt_tokens" in u  # chat completions; else Responses, or Anthropic's own
        read = ((u.get("prompt_tokens_details") if chat else u.get("input_tokens_details")) or {}).get(
            "cached_tokens") or u.get("cache_read_input_tokens") or 0
        write = u.get("cache_creation_input_tokens") or 0
        inp = u.get("prompt_tokens", 0) if chat else u.get("input_tokens", 0) + (
            read + write if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u else 0)
        out_t = u.get("completion_tokens" if chat else "output_tokens", 0)
        if chat and cat.provider(req.provider).compat == "gemini":
            out_t = gemini_output_tokens(u)  # its thoughts, counted in total_tokens alone, are billed as output
        # An answer in chat shape may not say what its input wrote to a prompt cache (an Anthropic one
        # rewritten as a chat completion): every unread input token priced as a write bounds it (a review).
        usd = max(price_usage(req, cat, _tier(req, body, several, cat), input_tokens=inp, output_tokens=out_t, cache_read=r,
                              cache_write=w).total for r, w in ((read, write), (read, inp - read)))
    elif req.kind == "text":
        # No usage, or one that counts no input (zeros written for an answer that came without one, or its output
        # told alone): its run counted it as a budget reserves it (``HttpBase._priced``), and so is it here. At its
        # list price (the request's estimates) an uncapped answer of 3,000 tokens told, estimated at 256, was
        # charged a twelfth of what its run counted and its provider billed (a review of moneyhunt).
        told = (gemini_output_tokens(u) if "prompt_tokens" in u and cat.provider(req.provider).compat == "gemini"
                else u.get("completion_tokens") or u.get("output_tokens") or 0) if isinstance(u, dict) else 0
        told = told if isinstance(told, int) and not isinstance(told, bool) else 0
        usd = reserve_bound(req, cat, _tier(req, body, several, cat), max(req.output_tokens, told)) * (
            len(body["choices"]) if several else 1)
    elif req.kind == "image" and req.params.get("quality") in (None, "auto"):
        # The quality the provider picked, as its answer says (``_as_made``), else the dearest: at the default,
        # two kept "high" images were counted at a quarter of their bill, past a hard limit (a hunt).
        made = body.get("quality") if isinstance(body, dict) else None
        q = made if made in (cat.model(req.provider, req.model).per_image_quality or {}) else "auto"
        usd = price_alone(req.model_copy(update={"params": {**req.params, "quality": q}}), cat, "sync").total
    else:
        usd = price_alone(req, cat, "sync").total * (len(body["choices"]) if several else 1)
    if isinstance(rid, str):
        calls.add(rid)
    return usd


_INPUT_COUNTS = ("prompt_tokens", "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def _tier(req, body: dict, several: bool, cat) -> str:
    """The mode a kept text answer is priced at: ``flex`` where its body says OpenAI's flex tier served it and the
    catalog gives its model that tier (billed at flex prices: counted at the standard price, a resumed run held
    twice what it cost against its budgets), else ``sync``. A line of n choices stays at sync: its merged body
    names its first call's tier, and another call may have been refused at flex and answered standard."""
    flex = body.get("service_tier") == "flex" and not several
    return "flex" if flex and cat.provider(req.provider).supports_flex(req.model) else "sync"
