"""Keys never go to stderr either: what a process prints outside logging, masked (``scrub``) as its log lines are.

Python prints four things to stderr without logging: an uncaught exception's traceback (``sys.excepthook``), a
thread's (``threading.excepthook``, "Exception in thread ..."), an exception it could not raise ("Exception
ignored in ...", ``sys.unraisablehook``: a ``__del__``'s, a generator's close) and a warning
(``warnings.showwarning``, masked in ``warnings.formatwarning``, which it calls). Each quotes an exception's or a
warning's words, which the project did not write: an SDK's error echoing a request's ``Authorization`` header, a
URL with ``?key=``, a ``RayTaskError`` carrying an actor's traceback. ``KeyFilter`` masks records only, so these
went out whole (keys82). asyncio's "Task exception was never retrieved" is a record of the ``asyncio`` logger,
masked by ``mask_library_logs``.

``mask_stderr`` replaces each of the four only where Python's own stands: one installed by someone else (a
driver's user, pytest, IPython) is theirs and keeps its place. The text is Python's own format, masked.
"""

from __future__ import annotations

import sys
import threading
import traceback
import warnings

from engine.core._logkeys import mask_library_logs, scrub

__all__ = ["mask_process", "mask_stderr", "masked_excepthook"]


def _write(text: str) -> None:
    out = sys.stderr
    if out is None:  # (pythonw, a daemon with stderr closed: Python's hooks print nothing there either)
        return
    try:
        out.write(scrub(text))
        out.flush()
    except (OSError, ValueError):  # a closed or broken stderr: a hook must not raise in turn
        pass


def masked_excepthook(exc_type, exc_value, tb) -> None:
    """``sys.excepthook``'s print, masked: the traceback and the exception's words (its chained ones too)."""
    _write("".join(traceback.format_exception(exc_type, exc_value, tb)))


def _masked_thread_hook(args) -> None:
    if args.exc_type is SystemExit:  # as Python's own: a thread's sys.exit() is no error
        return
    name = args.thread.name if args.thread is not None else threading.get_ident()
    _write(f"Exception in thread {name}:\n"
           + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))


def _masked_unraisable_hook(args) -> None:
    head = args.err_msg or "Exception ignored in"
    try:
        where = f"{head}: {args.object!r}\n" if args.object is not None else f"{head}:\n"
    except Exception:  # an object whose repr raises: Python's own prints "<object repr() failed>"
        where = f"{head}: <object repr() failed>\n"
    _write(where + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))


def _masked_formatwarning(message, category, filename, lineno, line=None) -> str:
    return scrub(warnings._formatwarning_orig(message, category, filename, lineno, line))


def mask_stderr() -> None:
    """In this process, mask what Python prints to stderr outside logging (see the module), where Python's own
    hooks stand. Idempotent: a second call finds its own hooks and leaves them (Ray re-runs an actor's
    ``__init__`` on a restart)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = masked_excepthook
    # Ray's import puts its own hook first (it records a driver's death, then calls the hook that stood at that
    # import), so where Ray came first Python's stood behind it and printed whole (a ``RayTaskError``, an
    # actor's traceback in it). Read from the modules loaded, not imported: the core never imports Ray, and a
    # Ray imported after this call finds the masked hook in place.
    ray_worker = sys.modules.get("ray._private.worker")
    if getattr(ray_worker, "normal_excepthook", None) is sys.__excepthook__:
        ray_worker.normal_excepthook = masked_excepthook
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = _masked_thread_hook
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _masked_unraisable_hook
    # A warning's text, not its printing: ``catch_warnings`` puts ``showwarning`` back at its end (a driver started
    # in such a block printed whole after it) and, recording, stands Python's there with its own recorder behind it
    # (a masking ``showwarning`` took the warnings past it, the record empty); it leaves ``formatwarning``, which
    # Python's printing and ``logging.captureWarnings``' both call (rvkeys82). The original's own test, as
    # ``warnings`` makes it; tracemalloc's "Object allocated at" lines are its alone, not printed once replaced.
    if warnings.formatwarning is getattr(warnings, "_formatwarning_orig", None):
        warnings.formatwarning = _masked_formatwarning


def mask_process(everything: bool = False) -> None:
    """Where an engine's process starts (an actor's, a command's, a driver's): its log records masked
    (``mask_library_logs``, ``everything`` as there) and what it prints outside logging (``mask_stderr``)."""
    mask_library_logs(everything)
    mask_stderr()
