"""Keys never go to a log: ``redact`` masks a provider's key in a text, and every ``smartbatch.*`` logger (made
with ``get_logger``) carries ``KeyFilter``, which masks the formatted line and the traceback of each record it emits.

Why a filter as well as redacting at the source: a log line that quotes an exception (``%s`` of it, ``exc_info``,
``log.exception``) prints words the project did not write, and an SDK's or Ray's may quote a key (a provider's
answer echoing it, a URL with ``?key=`` or a password, a request's headers); each line redacted by hand is one a
new line can forget (the endpoint's 500 line did, stop 80). The filter sits on each project logger, not on the
``smartbatch`` parent alone: a logger's filters see only the records logged on it, never its children's, and
the handlers (pytest's, Ray's, an operator's) are not the project's to filter.

Other libraries' lines in the engine's processes are masked by ``mask_library_logs``, at the record's making (see
there): Ray's "Unhandled error" of a failed call, asyncio's "Task exception was never retrieved", httpx's "HTTP
Request: POST <url>" (a base URL's credentials) quote what the project never wrote, from loggers it does not own.
"""

from __future__ import annotations

import base64
import logging
import re
import traceback
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["KEYLIKE", "LIBRARIES", "KeyFilter", "get_logger", "mask_library_logs", "masked_url", "redact", "scrub", "url_secrets", "words"]

# OpenAI's and Anthropic's keys (sk-...), and Google's (AIza and 35 more), each where a word begins: an "sk-"
# inside a word is no key's (a tenant "risk-management", a custom_id "task-000042" were masked, rvkeylogs80).
KEYLIKE = re.compile(r"(?<![A-Za-z0-9])(sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{6,}|AIza[A-Za-z0-9_\-]{35})")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
# A key in a URL's query (Google's ``?key=``) or in a header or setting quoted as ``name: value``/``name=value``; a
# name may end a longer one (``OPENAI_API_KEY=``, ``x_api_key=``: a shell's or a setting's echo, shown whole before).
_NAMED = re.compile(r"(?i)((?:[?&](?:key|api[_-]?key|access_token|token|password)=)|(?:(?<![A-Za-z0-9])"
                    r"(?:authorization|x-api-key|x-goog-api-key|api[_-]?key|password)['\"]?\s*[:=]\s*['\"]?"
                    r"(?:(?:bearer|basic|token|digest)\s+)?))[^\s&'\",}#]+")  # a header's scheme, then its secret
# A web URL's authority that is a host (a name, or IPv6 in brackets) and a port: with no "@" in it, a later "@" is
# the path's or the query's (a Vertex model's version ``claude-...@20241022``, an e-mail in a query).
_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]*\]|[A-Za-z0-9.\-_~%]+)(?::\d*)?")
_WEB = ("http://", "https://", "ws://", "wss://")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s'\",}]+")


def redact(text: str, secrets: Iterable[Any] = ()) -> str:
    """``text`` with every given secret replaced, then masked as ``scrub`` masks a log line: errors from a
    provider may quote the key that was sent, or a credential it was not told of as one (a base URL's
    ``user:password``, which the SDKs send as ``Authorization: Basic``, echoed by a proxy's 500; mask83). A secret
    is a text or a ``provider_api.Secret``, read here only, so no caller's frame holds the key (keys85)."""
    for s in secrets:
        if isinstance(s, str):
            text = text.replace(s, "[redacted]") if s else text
        elif not s.empty():
            text = text.replace(s.get(), "[redacted]")
    return scrub(text)


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ***, for messages and logs (a user name alone too: a key is often
    passed as one, ``https://sk-...@host``)."""
    start = url.find("//") + 2
    first = url.find("@", start)
    if start < 2 or first < 0 or url[start:start + 1] == "/":  # no user part (``unix:///path``)
        return url
    auth_end = min((k for k in (url.find(c, start) for c in "/?#") if k >= 0), default=len(url))
    if first > auth_end and url.lower().startswith(_WEB) and _HOST_PORT.fullmatch(url, start, auth_end):
        return url
    # Up to the last "@" before the query: a password may hold an "@" itself, or, unescaped, a "/", "?" or "#"
    # that URL parsing takes for the path's, query's or fragment's start (a "/" ended this mask, and the rest of
    # the password was shown); an "@" in the query is not the user part's.
    ends = [k for k in (url.find("?", first), url.find("#", first)) if k >= 0]
    last = url.rfind("@", start, min(ends, default=len(url)))
    user = url[start:last]
    return url[:start] + (user.split(":", 1)[0] + ":***" if ":" in user else "***") + url[last:]


def url_secrets(url: str | None) -> list[str]:
    """The credentials a URL holds (``http://user:password@host``), as ``redact``'s secrets: the password (and a
    user alone: a key is often passed as one), as written and unescaped, and the ``Authorization: Basic`` value
    an HTTP client makes of them, which a server may echo without the header's name."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return []
    said = [v for v in (password if password is not None else user,) if v]
    said += [unquote(v) for v in said if unquote(v) != v]
    if user is not None or password is not None:
        said.append(base64.b64encode(f"{unquote(user or '')}:{unquote(password or '')}".encode()).decode())
    return said


def scrub(text: str) -> str:
    """``text`` for a log: anything shaped like a provider key, and what stands where a secret goes whatever its
    shape (a URL's password, a ``key=`` in a query, an ``Authorization`` or ``x-api-key`` header's value)."""
    text = _URL.sub(lambda m: masked_url(m.group(0)), text)
    text = _BEARER.sub(r"\1[redacted]", _NAMED.sub(r"\1[redacted]", text))
    return KEYLIKE.sub("[redacted]", text)


def words(exc: BaseException) -> str:
    """``exc``'s words (``str``), masked (``scrub``), for a text a user reads or a record keeps: a result's error,
    an endpoint's answer. An actor's exception reaches the driver as Ray's ``RayTaskError``, whose words are the
    actor's whole traceback and its exception's words, a provider's or a library's among them (mask83)."""
    try:
        said = str(exc)
    except Exception:  # an exception whose __str__ raises: its type alone, as Python's own traceback falls back
        return f"<{type(exc).__name__}: its words could not be read>"
    return scrub(said)


class KeyFilter(logging.Filter):
    """Masks (``scrub``) each record's line, its traceback and its stack in place, so every handler of every
    logger above sees the masked text. The traceback is formatted here and ``exc_info`` dropped: a handler would
    otherwise format the exception again from the object, its words unmasked."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            line = record.getMessage()
        except Exception as exc:  # a bad format (``"%d"`` of None): a filter's raise reaches the caller, where
            # logging's own rule (in the handler) is to report and go on, and that report prints the args unmasked
            line = f"(a log line that could not be formatted: {exc}) {record.msg!r} % {record.args!r}"
            record.msg, record.args = line, ()
        clean = scrub(line)
        if clean != line:  # else the record keeps its msg and args (structured handlers read them)
            record.msg, record.args = _within_args(record, clean) or (clean, ())
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = record.exc_text or "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_info = None
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def _within_args(record: logging.LogRecord, clean: str) -> tuple[object, object] | None:
    """``record``'s msg and args each masked, the args' shape kept, if they make ``clean`` (the line masked whole)
    exactly; else None. A formatter may read the args themselves: uvicorn's access lines are formatted from their
    five (``AccessFormatter``), and one masked into ``msg`` with ``args=()`` was a "--- Logging error ---"
    traceback in the request line's place (rvlogs81); a secret that a format's text and an argument share, or
    an argument formatted other than by ``%s``, is masked whole as before."""
    def arg(a):
        if isinstance(a, (int, float)):  # (a status, a count: nothing to mask, and a %d keeps its number)
            return a
        text = a if isinstance(a, str) else str(a)
        masked = scrub(text)
        return a if masked == text else masked

    try:
        args = record.args
        if isinstance(args, Mapping):
            args = {k: arg(v) for k, v in args.items()}
        elif isinstance(args, tuple):
            args = tuple(arg(a) for a in args)
        else:
            return None
        msg = scrub(record.msg) if isinstance(record.msg, str) else record.msg
        line = str(msg) % args if args else str(msg)
    except Exception:  # an argument's str raised, or the masked format no longer fits them
        return None
    return (msg, args) if line == clean else None


def get_logger(name: str) -> logging.Logger:
    """The project's logger ``name`` (``smartbatch`` or below it), with ``KeyFilter`` on it once."""
    if name != "smartbatch" and not name.startswith("smartbatch."):
        raise ValueError(f"logger {name!r}: the project's loggers are named smartbatch or smartbatch.<part>")
    log = logging.getLogger(name)
    if not any(isinstance(f, KeyFilter) for f in log.filters):
        log.addFilter(KeyFilter())
    return log


# The libraries whose loggers log in the engine's processes, by their loggers' first name: the SDKs and their HTTP
# stack (URLs, a request's options), Redis, the endpoint's server, Ray (a failed call's exception) and asyncio (a
# task's). A driver's own loggers, and others', are the user's.
LIBRARIES = frozenset({"aiohttp", "anthropic", "asyncio", "fastapi", "google", "grpc", "httpcore", "httpcore2",
                       "httpx", "httpx2", "openai", "ray", "redis", "requests", "starlette", "urllib3", "uvicorn"})


class _Masking:
    """A log record factory that masks (``KeyFilter``) each record of the loggers it covers as it is made.

    At the making, not a filter: a logger's filter sees only its own records (``httpcore2.http11``'s, not
    ``httpcore2``'s), a handler's only what reaches it, and a handler added later (an SDK's ``basicConfig`` when
    ``ANTHROPIC_LOG`` is set, uvicorn's, Ray Serve's) has none, while every record, whatever its logger and
    handler, is made by the factory, once the logger's level lets it be (a line below it costs nothing). The
    project's own records are its loggers' filters' already."""

    def __init__(self, inner, everything: bool) -> None:
        self.inner, self.everything = inner, everything

    def __repr__(self) -> str:
        return f"_Masking(everything={self.everything}, inner={self.inner!r})"

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        name = record.name
        if name != "smartbatch" and not name.startswith("smartbatch.") and (
                self.everything or name.partition(".")[0] in LIBRARIES):
            _MASK.filter(record)
        return record


_MASK = KeyFilter()  # stateless: one serves every record


def mask_library_logs(everything: bool = False) -> None:
    """In this process, mask the records of the loggers in ``LIBRARIES`` (``everything``: of every logger, in a
    process that is the engine's alone: an actor's, the CLI's) before any handler sees them. Once per process: a
    second call widens the first's, never wraps the factory again (Ray re-runs an actor's ``__init__`` on a
    restart)."""
    current = logging.getLogRecordFactory()
    if isinstance(current, _Masking):
        current.everything = current.everything or everything
        return
    logging.setLogRecordFactory(_Masking(current, everything))
