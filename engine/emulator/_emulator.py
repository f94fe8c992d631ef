"""The public facade: ``Emulator`` (start/stop, URLs, bill, faults, calls) and the blocking ``serve``."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.core.catalog import Catalog, default_catalog, load_catalog
from engine.core.errors import ConfigError
from engine.emulator._app import ROUTE_NAMES, App, Call
from engine.emulator._bill import Bill
from engine.emulator._core import KEEP_RECORDS, Core
from engine.emulator._faults import FaultPlan
from engine.emulator._server import EmulatorServer

__all__ = ["Emulator", "serve"]


class Emulator:
    """A loopback HTTP server speaking the OpenAI and Anthropic wire formats for every catalog provider.

    ``speedup``: emulator seconds per real second (latencies, batch turnarounds, cache TTLs all compress).
    ``latency_scale``: multiplies the real sleep of sync calls (0: answer at once, for unit tests).
    ``validating_s``/``finalizing_s``/``cancel_s``: emulator seconds an OpenAI batch spends validating and
    finalizing, and any batch takes to cancel (members keep finishing meanwhile).
    ``honour_keys``: False plays the providers as documented, where ``Idempotency-Key`` is not a feature.
    ``keep_records``: how many of the latest call records (``calls``), billed items (``bill().items``) and
    Idempotency-Key answers it keeps; older ones are dropped (a warning says so once) while ``bill()``'s totals,
    ``count`` and ``counters`` still cover every call. An answer is kept at least an hour of emulator time
    (``KEEP_ANSWERS_S``), so an engine's retry of a call cut off on the wire is replayed, billed once.
    """

    def __init__(self, catalog: Catalog | None = None, *, port: int = 0, host: str = "127.0.0.1",
                 speedup: float = 1.0, latency_scale: float = 1.0, seed: int = 0, default_output_tokens: int = 256,
                 cancel_s: float = 30.0, validating_s: float = 1.0, finalizing_s: float = 1.0,
                 honour_keys: bool = True, keep_records: int = KEEP_RECORDS):
        if default_output_tokens < 0:
            raise ConfigError(f"default_output_tokens must be >= 0, got {default_output_tokens}")
        self.catalog = catalog or default_catalog()
        self.host, self._port = host, port
        self._stopping = threading.Event()
        self._core = Core(self.catalog, speedup=speedup, seed=seed, default_output_tokens=default_output_tokens,
                          latency_scale=latency_scale, stopping=self._stopping, validating_s=validating_s,
                          finalizing_s=finalizing_s, cancel_s=cancel_s, keep_records=keep_records)
        self.faults = FaultPlan(seed, ROUTE_NAMES, self.catalog.providers)
        self._app = App(self._core, self.faults)
        self._app.honour_keys = honour_keys
        self._server: EmulatorServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def honour_keys(self) -> bool:
        """Whether a call or batch create made again under its ``Idempotency-Key`` gets the first answer, billed
        once (True), or runs and bills again, as OpenAI's and Anthropic's documented APIs do (False)."""
        return self._app.honour_keys

    @honour_keys.setter
    def honour_keys(self, value: bool) -> None:
        self._app.honour_keys = value

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> Emulator:
        """Bind (port 0: a free port) and serve in a daemon thread."""
        if self._server is not None:
            raise ConfigError("the emulator is already running; call stop() before start()")
        self._stopping.clear()
        try:
            self._server = EmulatorServer((self.host, self._port), self._app)
        except OSError as exc:
            raise ConfigError(f"cannot bind the emulator to {self.host}:{self._port}: {exc}; pick another port "
                              "(0 picks a free one)") from exc
        self._port = self._server.server_address[1]
        self._app.origin = f"http://{self.host}:{self._port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"emulator-{self._port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; calls in flight are cut (and not billed), held faults are released."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes sleeping latencies and held connections first
        server.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._port

    def follow(self, clock, *, seed: int = 0, slot_s: float = 60.0, world=None) -> None:
        """Run on an engine's ``clock`` and draw batch turnarounds as the simulator does with ``seed`` (one
        draw per ``slot_s`` of submission time), members of a batch finishing together at its end, so a live
        run over HTTP compares with the simulated one. Timestamps then read as engine seconds. ``world``: the
        simulator's ``TurnaroundWorld`` (a provider slower or faster than the catalog says), followed too."""
        from engine.core.draws import Draws

        self._core.follow(clock, Draws(0, 1, seed, slot_s), world)

    @property
    def cancel_s(self) -> float:
        """Emulator seconds a batch takes to cancel (an engine pointed here plans its hedges with it)."""
        return self._core.cancel_s

    # -- URLs ----------------------------------------------------------------------------------------------
    def _origin(self, provider: str) -> str:
        self.catalog.provider(provider)  # CatalogError naming the providers when unknown
        if self._server is None:
            raise ConfigError("the emulator is not running; call start() (or use it as a context manager) first")
        return f"http://{self.host}:{self._port}"

    def base_url(self, provider: str) -> str:
        """Base URL for the OpenAI SDK: ``http://host:port/<provider>/v1``."""
        return f"{self._origin(provider)}/{provider}/v1"

    def anthropic_base_url(self, provider: str) -> str:
        """Base URL for the Anthropic SDK (it appends ``/v1/messages``): ``http://host:port/<provider>``."""
        return f"{self._origin(provider)}/{provider}"

    # -- what happened -------------------------------------------------------------------------------------
    def bill(self) -> Bill:
        """Everything billed so far (batch members that finished by now included)."""
        self._core.advance_batches()
        with self._core.lock:
            return self._core.ledger.bill()

    @property
    def calls(self) -> list[Call]:
        """The latest ``keep_records`` received requests in arrival order of their answers: provider, route name,
        method, status (``count``/``counters`` count every one)."""
        return self._app.calls()

    def count(self, route: str, provider: str | None = None, status: int | None = None) -> int:
        """How many requests reached ``route`` (e.g. "chat.completions"), optionally of one provider/status."""
        if route not in ROUTE_NAMES and route != "?":
            raise ConfigError(f"unknown route {route!r}; routes are {sorted(ROUTE_NAMES)}")
        return sum(n for (p, r, _, st), n in self._app.tally().items() if r == route and provider in (None, p)
                   and status in (None, st))

    def files(self, purpose: str | None = None) -> dict[str, str]:
        """The files stored now (uploaded, or a batch's output and error files, not deleted), id -> purpose;
        ``purpose`` ("batch", "batch_output"): only those. Deletions are ``count("files.delete", status=200)``."""
        with self._core.lock:
            return {i: f.purpose for i, f in self._core.files.items() if purpose in (None, f.purpose)}

    def counters(self) -> Counter[tuple[str, str]]:
        """Calls per (provider, route name), every call received."""
        out: Counter[tuple[str, str]] = Counter()
        for (p, r, _, _), n in self._app.tally().items():
            out[p, r] += n
        return out

    def now(self) -> float:
        """Emulator time: a virtual unix time running ``speedup`` times faster than the wall clock."""
        return self._core.now()

    def reset(self) -> None:
        """Forget the bill, calls, caches, files, batches, idempotency keys and faults; reseed the draws."""
        self.faults.clear()
        self._app.reset()
        self._core.reset()

    def __repr__(self) -> str:
        where = f"http://{self.host}:{self._port}" if self.running else "stopped"
        with self._core.lock:
            billed = self._core.ledger.bill().total_usd
            n_batches = len(self._core.batches)
        return (f"Emulator({where}, speedup={self._core.clock.speedup:g}, calls={self._app.tally().total()}, "
                f"batches={n_batches}, billed_usd={billed:.6f})")


def serve(port: int, *, catalog_path: str | Path | None = None, speedup: float = 1.0, seed: int = 0,
          host: str = "127.0.0.1", on_start: Callable[[Emulator], None] | None = None,
          on_stop: Callable[[Emulator], None] | None = None, **kwargs: Any) -> None:
    """Run an emulator in the foreground until Ctrl-C or SIGTERM (for ``smartbatch emulate --port P``).
    ``on_start(emu)`` once it listens; ``on_stop(emu)`` as it stops, while its bill can still be read."""
    catalog = load_catalog(catalog_path) if catalog_path is not None else None
    emu = Emulator(catalog, port=port, host=host, speedup=speedup, seed=seed, **kwargs).start()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, timeout, a service manager) stops it as Ctrl-C does: on_stop still runs.
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if on_start is not None:
            on_start(emu)
        assert emu._thread is not None
        while emu._thread.is_alive():
            emu._thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        try:
            if on_stop is not None:
                on_stop(emu)
        finally:
            emu.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
