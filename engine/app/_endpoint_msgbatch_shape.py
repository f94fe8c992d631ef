"""Anthropic's Message Batches in and out (``engine.app._endpoint_msgbatches``), no I/O: a create's requests checked
and written as the lines of a batch job (url ``/v1/messages``), a job shown as Anthropic's ``message_batch``, and
the rows of a job's output and error files read back as Anthropic's results.

A request refused before the engine (its params not a Messages body, a model not called through Anthropic's API)
or by the engine's own line checks is kept in the job's ``errors`` as ``{"custom_id", "message", "sent"}``
(``sent``: among the job's lines), and answered as an ``errored`` result naming the field: never its neighbours.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from engine.app._endpoint_claude import wire_of
from engine.app._endpoint_job import BatchJob
from engine.app._endpoint_messages import AnthropicError, error_type, messages_body
from engine.app._endpoint_wire import ApiError
from engine.core.answer_body import MESSAGES_URL
from engine.core.catalog import Catalog
from engine.core.result import ANSWERED, CANCELLED
from engine.core.settings import Settings

__all__ = ["MAX_REQUESTS", "batch_lines", "checked_requests", "ended_counts", "live_counts", "refused_line",
           "results_of", "view"]

MAX_REQUESTS = 100_000  # Anthropic's limit of requests in one Message Batch
# Anthropic's pattern of a custom_id, matched whole (``fullmatch``): ``$`` also matches before a final newline, and
# "a\n" beside "a" was taken, then lost (its result never came: a helper's hunt).
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ENDS = ("completed", "cancelled", "expired", "failed")
_STATUS = {"cancelling": "canceling"}  # the job's status -> Anthropic's processing_status (else in_progress / ended)
# An error row's code -> Anthropic's result type (an answered row: succeeded; any other: errored).
_BODY = re.compile(r"\bbody\.")
_RESULT = {"batch_cancelled": "canceled", "batch_expired": "expired"}
_ROW_STATUS = {"request_rejected": 429, "request_failed": 502}  # as the Messages route answers them


def checked_requests(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A create's ``requests``, or a 400 naming what is wrong with the create as a whole: none given, too many, a
    custom_id missing, not matching Anthropic's pattern, or given twice. A bad ``params`` is the request's own
    error (``batch_lines``), not the create's."""
    reqs = body.get("requests")
    if not isinstance(reqs, list) or not reqs:
        raise AnthropicError(400, "requests: is required, a non-empty list of {\"custom_id\": ..., \"params\": "
                                  "{...a Messages request...}}", param="requests")
    if len(reqs) > MAX_REQUESTS:
        raise AnthropicError(400, f"requests: {len(reqs):,} requests, past the {MAX_REQUESTS:,} of one batch; "
                                  "split them into several batches", param="requests")
    if extra := sorted(k for k in body if k != "requests"):
        raise AnthropicError(400, f"{extra[0]}: Extra inputs are not permitted; a create takes 'requests' alone",
                             param=extra[0])
    seen: dict[str, int] = {}
    for i, req in enumerate(reqs):
        if not isinstance(req, dict):
            raise AnthropicError(400, f"requests.{i}: must be an object {{\"custom_id\", \"params\"}}",
                                 param="requests")
        cid = req.get("custom_id")
        if not isinstance(cid, str) or not _CUSTOM_ID.fullmatch(cid):
            shown = repr(cid) if len(repr(cid)) <= 70 else repr(cid)[:67] + "..."
            raise AnthropicError(400, f"requests.{i}.custom_id: {shown} must be 1 to 64 letters, digits, '_' or "
                                      "'-' (the id that pairs the request with its result)", param="custom_id")
        if cid in seen:
            raise AnthropicError(400, f"requests.{i}.custom_id: {cid!r} is also the custom_id of requests."
                                      f"{seen[cid]}; give every request a custom_id of its own", param="custom_id")
        seen[cid] = i
    return reqs


def batch_lines(reqs: list[dict[str, Any]], catalog: Catalog, settings: Settings) -> tuple[bytes, list[dict]]:
    """The requests that pass the Messages route's checks as the lines of a batch file (url ``/v1/messages``),
    and the errors of the others (see the module docstring)."""
    lines, errors = [], []
    for req in reqs:
        cid, params = req["custom_id"], req.get("params")
        try:
            if not isinstance(params, dict):
                raise ApiError(400, "is required, an object: the body of a Messages request (model, max_tokens, "
                                    "messages, ...)", param="params")
            if params.get("stream") is not None and params["stream"] is not False:
                raise ApiError(400, "stream: a batch's requests are answered whole; leave stream out",
                               param="stream")
            model = params.get("model")
            api, spec = wire_of(model, catalog, settings)
            if spec is not None and api != "anthropic":
                raise ApiError(400, f"model {model!r} is not a Claude model called through Anthropic's Messages "
                                    "API; send it in an OpenAI batch (POST /v1/files, then /v1/batches), or name a "
                                    "Claude model here", param="model")
            body, _ = messages_body(params, {}, catalog, settings)
        except ApiError as exc:
            errors.append(refused_line(cid, exc.param or "params", exc.message, sent=False))
            continue
        line = {"custom_id": cid, "method": "POST", "url": MESSAGES_URL, "body": body}
        lines.append(json.dumps(line, separators=(",", ":")).encode() + b"\n")
    return b"".join(lines), errors


def refused_line(custom_id: str, field: str, message: str, *, sent: bool) -> dict[str, Any]:
    """The error of a request refused before it reached the engine, naming its field under ``params``."""
    name = field.removeprefix("body.").removeprefix("params.")
    name = "params" if name in ("params", "line", "body") else f"params.{name}"
    message = message.removeprefix(f"field '{field}': ")
    for said in (field, field.removeprefix("body."), "params"):
        message = message.removeprefix(f"{said}: ").removeprefix(f"{said} ")
    # The engine names a line's fields body.X (its own name of a batch line's body): the caller sent params.X.
    return {"custom_id": custom_id, "message": f"{name}: {_BODY.sub('params.', message)}", "sent": sent}


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _errored(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": message}}}


def results_of(rows: list[dict], errors: list[dict]) -> list[dict[str, Any]]:
    """Anthropic's results of a job: its output and error files' ``rows``, and the requests of ``errors``."""
    # (an error of the whole batch, with no custom_id, is no request's: a record written before the take-back of
    # a Message Batch kept its errors per request, _endpoint_resume)
    refused = {e["custom_id"]: e["message"] for e in errors if "custom_id" in e}
    out = []
    for row in rows:
        cid, err = row["custom_id"], row.get("error")
        if cid in refused:
            result = _errored(refused.pop(cid))
        elif err is None:
            result = {"type": "succeeded", "message": row["response"]["body"]}
        elif err.get("code") in _RESULT:
            result = {"type": _RESULT[err["code"]]}
        else:
            status = (row.get("response") or {}).get("status_code") or _ROW_STATUS.get(err.get("code"), 502)
            result = _errored(err.get("message", ""), error_type(status))
        out.append({"custom_id": cid, "result": result})
    out += [{"custom_id": cid, "result": _errored(msg)} for cid, msg in refused.items()]
    return out


def live_counts(job: BatchJob) -> dict[str, int]:
    """An open job's counts in Anthropic's names, from the results in so far. (Anthropic counts every request as
    processing until the batch ends; these move as results arrive, and add up to the same total.)"""
    n = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    n["errored"] = sum(not e["sent"] for e in job.errors)
    for ln in job.bf.lines if job.bf is not None else []:
        res = job.results.get(ln.request.id) if ln.request is not None else None
        if ln.request is None:
            n["errored"] += 1
        elif res is None:
            n["processing"] += 1
        elif res.status in ANSWERED:
            n["succeeded"] += 1
        elif res.status == "expired":
            n["expired"] += 1
        else:
            n["canceled" if (res.error or "").startswith(CANCELLED) else "errored"] += 1
    return n


def ended_counts(results: list[dict]) -> dict[str, int]:
    n = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    for r in results:
        n[r["result"]["type"]] += 1
    return n


def view(job: BatchJob, counts: dict[str, int], base_url: str) -> dict[str, Any]:
    """``job`` as Anthropic's ``message_batch`` (its times in RFC 3339); ``base_url``: where its results are."""
    ended = job.status in _ENDS
    status = "ended" if ended else _STATUS.get(job.status, "in_progress")
    end_at = next((job.at[s] for s in _ENDS if s in job.at), None) if ended else None
    return {"id": job.id, "type": "message_batch", "processing_status": status, "request_counts": counts,
            "created_at": _rfc3339(job.created_at), "ended_at": _rfc3339(end_at),
            "expires_at": _rfc3339(job.created_at + job.window_s / job.speedup), "archived_at": None,
            "cancel_initiated_at": _rfc3339(job.at.get("cancelling")),
            "results_url": f"{base_url.rstrip('/')}{MESSAGES_URL}/batches/{job.id}/results" if ended else None}
