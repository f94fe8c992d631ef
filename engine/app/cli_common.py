"""What every ``smartbatch`` command shares: the app, its consoles, one-line errors, settings and providers."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, NoReturn

import click
import typer
from rich.console import Console
from rich.text import Text

from engine.core._logkeys import scrub
from engine.core._stderrkeys import mask_process, masked_excepthook
from engine.core.catalog import load_catalog
from engine.core.errors import SmartbatchError
from engine.core.settings import Settings, load_settings

# The help of --reserve-output, one text for every command that takes it.
RESERVE_OUTPUT_HELP = ("output a reservation assumes without a max_output_tokens cap: model_max (default, safe) or "
                       "request (output_tokens, when it is sent as max_tokens)")
_DEBUG = "smartbatch.debug"  # key in click's context meta, shared by every sub-command's context


def _own_exits() -> tuple[type[BaseException], ...]:
    """The exceptions that are click's and typer's own way to end a command (--help, a usage error naming
    its flag, Ctrl-C): they pass through. Newer typer releases vendor click as ``typer._click`` and raise
    those copies, which are not the ``click`` package's classes."""
    kinds: list[type[BaseException]] = [click.exceptions.ClickException, click.exceptions.Exit,
                                        click.exceptions.Abort, typer.Exit, typer.Abort]
    try:
        from typer._click import exceptions as vendored  # type: ignore[import-not-found]
    except ImportError:  # a typer that uses the click package itself
        return tuple(kinds)
    return tuple(kinds + [getattr(vendored, n) for n in ("ClickException", "Exit", "Abort") if hasattr(vendored, n)])


_EXITS = _own_exits()


class _Group(typer.core.TyperGroup):
    """Every error ends the command with one ``error:`` message, never a traceback, unless ``--debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        mask_process(everything=True)  # a command's process is the engine's, its terminal a CI's log
        try:
            return super().invoke(ctx)
        except _EXITS:
            raise
        except Exception as exc:
            if ctx.meta.get(_DEBUG):  # the traceback, masked: typer's own (rich, with each frame's locals) went
                masked_excepthook(type(exc), exc, exc.__traceback__)  # past every filter, a key's setting whole
                raise typer.Exit(1) from None
            if isinstance(exc, SmartbatchError):
                _print_error(str(exc))
                raise typer.Exit(2) from None
            first = (str(exc).strip().splitlines() or [""])[0]
            _print_error(f"{type(exc).__name__}: {first} (unexpected, so a bug in smartbatch: rerun with --debug "
                         "for the traceback and report it)")
            raise typer.Exit(1) from None


# Plain help (click's): typer's rich panels showed "<bool>" beside every flag with click 8.2+, and broke the
# commands' texts at their source lines.
app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="smartbatch: cut the bill of paid generation APIs by deciding how and when each request "
                       "is sent.")
trace_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Build traces (JSONL) from real data or a seeded generator.")
app.add_typer(trace_app, name="trace")
# Wide enough for the results table when output goes to a file or CI log (rich assumes 80 columns there).
# No console markup: what is printed holds user paths, names and ids, and a "[/x]" in one was a MarkupError after a
# paid run, or vanished from the line ("[exp1]"); style goes through ``style=`` or ``Text`` (a helper's hunt).
console = Console(width=None if Console().is_terminal else 120, markup=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False)


def progress(on: Console, *fields: str):
    """A transient bar on ``on`` (stderr): the description, the bar, done/total, ``fields`` (``TextColumn``
    formats) and the time. Shown on a terminal only: elsewhere rich draws nothing and, at its end, wrote an empty
    line, so a command's error in a log or a pipe was a blank line and then the ``error:`` line (a new user's
    tour)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), *(TextColumn(f) for f in fields),
                    TimeElapsedColumn(), console=on, transient=True, disable=not on.is_terminal)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("smartbatch")
        except PackageNotFoundError:  # run from a checkout that was not installed
            v = "unknown (not installed)"
        typer.echo(f"smartbatch {v}")
        raise typer.Exit()


@app.callback()
def _main(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error"),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    ctx.meta[_DEBUG] = debug


def _print_error(message: str) -> None:
    # Text, not markup: messages quote user input and lists such as ['512x512'] that rich would eat. A lone
    # surrogate (from a file name or a bad line) is escaped, so printing the error cannot fail in turn. Masked as a
    # log line is (``scrub``): a bug's words may quote a key, and a terminal's lines often go to a CI's logs.
    safe = scrub(message).encode("utf-8", "backslashreplace").decode("utf-8")
    err_console.print(Text.assemble(("error: ", "bold red"), safe))


def _fail(exc: SmartbatchError) -> NoReturn:
    raise exc  # _Group prints it as one error (exit status 2), or its traceback with --debug


def _settings(catalog: Path | None, overlay: Path | None = None) -> tuple[Settings, object]:
    settings = load_settings()
    return settings, load_catalog(catalog or settings.catalog_path, overlay or settings.catalog_overlay)


def _url_fix(url: str) -> str:
    """The URL ``--base-url`` offers for ``url``, which does not start with ``http://`` or ``https://``. An http
    scheme in capitals or misspelt keeps its ``s`` (``HTTPS://h`` was offered as ``http://h``: the key sent in clear
    to a remote API); another scheme or none is replaced by https, or by http for a host of this machine or a
    private network (a local server, the emulator); not ``http://ftp://h`` (stop 79)."""
    import ipaddress
    import re
    from urllib.parse import urlsplit

    if m := re.match(r"(?i)(https?)(?::/{0,2}|/{1,2})(?!/)", url):  # HTTPS://, https//, https:/, http:
        return f"{m[1].lower()}://{url[m.end():]}"
    scheme, sep, rest = url.partition("://")
    rest = rest if sep else url
    try:
        host = urlsplit(f"//{rest}").hostname or ""
    except ValueError:  # (a bracket left open): the safe scheme
        host = "."
    try:
        local = not ipaddress.ip_address(host).is_global
    except ValueError:  # a name: one with no dot is a machine of the network (docker compose's "vllm")
        local = host == "localhost" or "." not in host or host.endswith((".local", ".internal", ".localhost"))
    return f"{'http' if local else 'https'}://{rest}"


def _providers(settings: Settings, mode: str | None, base_urls: list[str] | None) -> Settings:
    """``--providers sim|http`` and ``--base-url NAME=URL`` on top of ``settings.providers``."""
    from engine.core._catalog_errors import _closest
    from engine.core._settings_providers import PRESETS, refuse_url_credentials
    from engine.core.errors import ConfigError
    from engine.core.settings import ProvidersSettings

    raw = settings.providers.model_dump()
    if mode is not None:
        if mode not in ("sim", "http"):
            raise ConfigError(f"--providers {mode!r}: use sim (every provider simulated) or http (real calls to the "
                              "providers with an endpoint)")
        raw["mode"] = mode
    for item in base_urls or []:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"--base-url {item!r}: write NAME=URL, e.g. --base-url openai=http://127.0.0.1:8000/v1")
        if not url.startswith(("http://", "https://")):
            # Checked here to name the flag: the endpoint's own check came back as pydantic's dump of
            # ProvidersSettings. A credential before an "@" is not printed.
            shown = f"***@{url.rpartition('@')[2]}" if "@" in url else url
            raise ConfigError(f"--base-url '{name}={shown}': the URL must start with http:// or https://; write "
                              f"--base-url {name}={_url_fix(shown)}")
        if name not in raw["endpoints"] and name in PRESETS:  # google: its preset, at this URL (the emulator's)
            raw["endpoints"][name] = {}
        if name not in raw["endpoints"]:
            # google is taken too (its preset), and a misspelt name told the one it may mean (a helper's tour: the
            # list named the two default endpoints alone).
            names = sorted({*raw["endpoints"], *PRESETS})
            near = _closest(name, names)
            raise ConfigError(f"--base-url {item!r}: no endpoint named {name!r}; "
                              + (f"did you mean {near!r}? " if near else "") + f"it takes {', '.join(names)} "
                              "(add another with SMARTBATCH_PROVIDERS__ENDPOINTS)")
        # Checked here to name the flag, as the scheme is.
        refuse_url_credentials(url, f"--base-url {name}", raw["endpoints"][name].get("api_key_env")
                               or PRESETS.get(name, {}).get("api_key_env") or "its api_key_env")
        raw["endpoints"][name]["base_url"] = url
    if base_urls and raw["mode"] != "http":  # else taken and unused: the run simulated what it was pointed at
        raise ConfigError("--base-url says where calls go over HTTP, and this run simulates every provider "
                          "(providers.mode sim): add --providers http (or export SMARTBATCH_PROVIDERS__MODE=http), "
                          "or leave --base-url out")
    try:
        return settings.model_copy(update={"providers": ProvidersSettings.model_validate(raw)})
    except ValueError as exc:
        raise ConfigError(f"providers: {exc}") from None




def _check_outputs(files: dict[str, Path | None] | None = None, dirs: dict[str, Path] | None = None,
                   inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before anything is simulated or sent, an output that cannot be written, or that would overwrite
    an input or another output: found only at the end, it cost a whole run (a paid one, against real
    providers) and lost its results, as an 'unexpected' error. ``files`` and ``dirs`` map a flag to its path."""
    import os

    from engine.core.errors import ConfigError

    ins = {p.resolve() for p in inputs}
    seen: dict[Path, str] = {}
    for flag, p in (files or {}).items():
        if p is None:
            continue
        if p.exists() and not p.is_file() and not p.is_dir():
            # A stream (/dev/null, /dev/stdout, a pipe): written as it is, never a file to destroy or share.
            if not os.access(p, os.W_OK):
                raise ConfigError(f"{flag} {p}: cannot write there (permission denied); give a writable path")
            continue
        r = p.resolve()
        if r in ins or (r.exists() and any(i.exists() and os.path.samefile(r, i) for i in ins)):
            raise ConfigError(f"{flag} {p}: that is the input file, which writing would destroy; give another path")
        if r in seen:
            raise ConfigError(f"{flag} {p}: {seen[r]} writes to the same file; give each its own path")
        seen[r] = flag
        if r.is_dir():
            raise ConfigError(f"{flag} {p}: is a directory; give a file path")
        if r.exists():  # overwritten in place: the file must be writable, its directory need not be
            if not os.access(r, os.W_OK):
                raise ConfigError(f"{flag} {p}: cannot write there (permission denied); give a writable path")
        else:
            _probe_dir(flag, p, r.parent)
    for flag, d in (dirs or {}).items():
        r = d.resolve()
        if r.exists() and not r.is_dir():
            raise ConfigError(f"{flag} {d}: is a file; give a directory (it is created if missing)")
        _probe_dir(flag, d, r)


def _probe_dir(flag: str, shown: Path, d: Path) -> None:
    """Create directory ``d`` (its outputs go there anyway) and write a scratch file in it."""
    import tempfile

    from engine.core.errors import ConfigError

    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {shown}: cannot write there ({exc.strerror or exc}); give a writable path") from None


SKIPPED_SHOWN = 5


def _warn_skipped(count: int, what: str, problems: list[tuple]) -> None:
    """In yellow: how many lines were skipped, the first few by place, field and problem, and how many of
    them each field accounts for (a file with thousands of bad lines has a few causes, not thousands)."""
    lines = [f"skipped {count} {what}:"]
    lines += [f"  {src}:{line}: field '{field}': {msg}" for src, line, field, msg in problems[:SKIPPED_SHOWN]]
    if len(problems) > SKIPPED_SHOWN:
        by_field = collections.Counter(p[2] for p in problems).most_common()
        lines.append(f"  ... and {len(problems) - SKIPPED_SHOWN} more; by field: "
                     + ", ".join(f"'{f}' {n}" for f, n in by_field))
    err_console.print(Text("\n".join(lines), style="yellow"))


def _check_tenant(tenant: str) -> None:
    """``--tenant`` (of every line of a batch file) against the rule of a request's tenant, once, naming the flag."""
    from engine.core._checks import tenant_problem
    from engine.core.errors import ConfigError

    why = tenant_problem(tenant)
    if why is not None:
        raise ConfigError(f"--tenant {tenant!r}: {why}; give a name of 1 to 256 characters, "
                          "none of them a control character")


def _write_results(results: list, path: Path) -> Path:
    """Every request's result, a line each (the provider's raw body left out): a video's or an image's address,
    a text's answer. Before, ``run`` kept four samples and a video trace's other addresses, paid for, were in no
    file (a helper's tour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in results:
            fh.write(r.model_dump_json(exclude={"raw"}) + "\n")
    return path
