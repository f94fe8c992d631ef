"""``smartbatch serve`` (a named engine that other drivers attach to, optionally behind an OpenAI-compatible HTTP
endpoint) and ``smartbatch stop``."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer

from engine.app.cli_common import _fail, _providers, _settings, app, console, err_console
from engine.core.errors import SmartbatchError


@app.command()
def serve(name: str = typer.Option("smartbatch", "--name", help="the engine's name: what drivers pass to "
                                   "Engine.connect, and what `smartbatch stop --name` takes"),
          policy: str = typer.Option("smart", help="registered name or module:Class"),
          address: str | None = typer.Option(None, help="run on this Ray cluster (e.g. auto); default: start a "
                                             "local Ray that other drivers on this machine attach to"),
          speedup: float = typer.Option(1.0, min=0.001, help="engine seconds per real second (1: real time; "
                                        "higher only against simulated or emulated providers)"),
          providers: str | None = typer.Option(None, "--providers", help="sim: every provider simulated; http: "
                                               "real calls to the providers with an endpoint (default: settings)"),
          base_url: list[str] | None = typer.Option(None, "--base-url", help="NAME=URL: where provider NAME is "
                                                    "reached over HTTP (repeatable)"),
          http_port: int | None = typer.Option(None, "--http-port", help="serve the OpenAI-compatible endpoint "
                                               "(/v1/chat/completions, /v1/files, /v1/batches ...) on this port "
                                               "(0: a free one); default: no endpoint"),
          http_host: str = typer.Option("127.0.0.1", "--http-host", help="the endpoint's bind address (0.0.0.0: "
                                        "every interface)"),
          seed: int = typer.Option(0, help="seed of the simulated draws"),
          shards: int = typer.Option(1, "--shards", min=1, help="actors each of ingest, cache, result hub and "
                                     "groupers (one per core of the cluster spreads the load; docs/benchmarks.md)"),
          catalog: Path | None = typer.Option(None, help="a catalog YAML replacing the packaged one")) -> None:
    """Start a named, detached engine and keep it running (and supervised) until Ctrl-C or `smartbatch stop`.
    Drivers attach with Engine.connect(NAME, address=...), and share its cache, budgets and idempotency."""
    import ray

    from actors._peer import read_layout
    from engine.app.driver import Engine

    done = threading.Event()
    try:
        settings, cat = _settings(catalog)
        settings = _providers(settings, providers, base_url)
        if not ray.is_initialized():
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        eng = Engine.start(settings, policy=policy, catalog=cat, speedup=speedup, seed=seed, name=name,
                           detached=True, num_shards=shards)
    except SmartbatchError as exc:
        _fail(exc)
    gcs = ray.get_runtime_context().gcs_address
    endpoint = None
    try:
        if http_port is not None:
            from engine.app.serve_http import start_endpoint

            endpoint = start_endpoint(name, host=http_host, port=http_port)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        console.print(f"engine {name!r} is serving (policy {policy}, speed-up x{speedup:g})")
        console.print(f"ray address: {gcs}")
        console.print(f"attach: Engine.connect({name!r}, address={gcs!r})")
        if eng.metrics_urls:
            console.print(f"metrics at {', '.join(eng.metrics_urls)}")
        if endpoint is not None:
            console.print(f"OpenAI-compatible endpoint at {endpoint}")
        console.print(f"stop: smartbatch stop --name {name} --address {gcs}  (or Ctrl-C)")
        # Until Ctrl-C, or until `smartbatch stop` (from anywhere) removed the engine.
        while not done.wait(1.0):
            if read_layout(name) is None:
                err_console.print(f"engine {name!r} was stopped; exiting")
                break
    finally:
        if endpoint is not None:
            from engine.app.serve_http import stop_endpoint

            stop_endpoint(name)
        if read_layout(name) is not None:
            eng.shutdown()
        else:
            eng.stop()
        ray.shutdown()


@app.command()
def stop(name: str = typer.Option(..., "--name", help="the engine to stop, as `smartbatch serve --name` named it"),
         address: str = typer.Option("auto", help="the Ray cluster it runs on (what `smartbatch serve` printed)")
         ) -> None:
    """Stop a named engine for every driver attached to it (their open requests fail, naming the stop)."""
    from engine.app.driver import Engine

    try:
        n = Engine.stop_named(name, address=address)
    except SmartbatchError as exc:
        _fail(exc)
    console.print(f"stopped engine {name!r} ({n} actors)")
