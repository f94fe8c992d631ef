"""The endpoint's answer to an exception no route expected (a bug of its own): a 500 in the shape of its other
errors, with the call's id where the SDKs read one, logged under that id. Before, Starlette's own 500 answered it,
a plain-text ``Internal Server Error`` with no id at all (the OpenAI SDK's ``e.request_id`` was None, Anthropic's
too) and no line of the endpoint's log said which call it was (a stop's notes)."""

from __future__ import annotations

import traceback

from engine.app._endpoint_wire import ApiError
from engine.core._logkeys import get_logger

__all__ = ["INTERNAL_CODE", "internal_error"]

log = get_logger("smartbatch.endpoint")
INTERNAL_CODE = "internal_error"


def internal_error(exc: BaseException, request_id: str, where: str, shape: type[ApiError] = ApiError) -> ApiError:
    """The 500 of ``exc``, raised where no route expected it, answered under ``request_id`` in ``shape`` (OpenAI's
    ``ApiError``, Anthropic's ``AnthropicError``); logged with its traceback under that id (``where``: the call).
    Its message names the exception's type alone: its words may quote a key, a prompt or a path, and a message
    goes to the caller, often into its logs; the operator reads them in the endpoint's log."""
    kind = type(exc).__name__
    # The traceback as text: its last line is the exception's words, which may quote a key, masked by the
    # logger's own filter (``KeyFilter``, ``scrub``: a header's or a query's secret too), the one place that masks
    # it (it was masked by hand as well, ``redact``, a narrower rule, keys82); ``where`` holds the caller's path,
    # whose %0a would start a line of the caller's writing.
    trace = "".join(traceback.format_exception(exc))
    log.error("%s failed on an unexpected %s, answered as a 500 under request id %s\n%s", _one_line(where), kind,
              _one_line(request_id), trace, extra={"error_type": kind})
    return shape(500, f"the endpoint failed on an unexpected error ({kind}), a fault of its own, not of the "
                      f"request; its log has it under request id {request_id}", type="server_error",
                 code=INTERNAL_CODE, headers={shape.id_header: request_id})


def _one_line(text: str) -> str:
    """``text`` with its line breaks and other control characters written out (``\\n``): a log line holds it."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
