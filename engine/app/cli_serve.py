"""``smartbatch serve`` (a named engine that other drivers attach to, optionally behind an OpenAI-compatible HTTP
endpoint) and ``smartbatch stop``."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from engine.app._batch_ended import brief  # an exception's words, masked for the terminal (rvkeys82)
from engine.app._driver_shared import check_answers, init_ray
from engine.app._endpoint_rescue import prepare_endpoint, stopped_cleanly
from engine.app._ray_stop import exit_now, own_ray_processes, stop_or_lose_ray
from engine.app._serve_claim import NameClaim, port_holder, served_address, wait_released
from engine.app._start_args import check_name
from engine.app.cli_common import _fail, _providers, _settings, app, console, err_console
from engine.app.provider_setup import is_variable_name, speedup_problem
from engine.core._budget_check import check_budget_limits
from engine.core.errors import ConfigError, SmartbatchError
from engine.core.provider_api import Secret

# How long a stop waits for the engine's endpoint and actors to go before it gives up on them (they are then
# stopped with Ray itself, or left to the cluster's supervision). Bounded: a Ray call has no timeout of its own.
_GRACEFUL_S = 30.0
_DRAIN_SLACK_S = 15.0


def _check_http_port(host: str, port: int | None) -> None:
    from engine.app.serve_http import port_in_use

    why = port_in_use(host, port) if port else None
    if why is None:
        return
    info = port_holder(port)
    addr = f" --address {info['address']}" if info.get("address") else ""
    holder = (f"; engine {info.get('name')!r} serves its endpoint there (pid {info.get('pid')}): stop it "
              f"(smartbatch stop --name {info.get('name')}{addr})" if info else "; stop what listens there")
    raise ConfigError(f"--http-port {port}: {host}:{port} is in use ({why}){holder}, or give another --http-port "
                      "(0: a free one)")


def _exit_with_ray_gone(name: str) -> None:
    """The local Ray went down under the engine (SIGTERM sent to the whole process group stops Ray's processes
    with this one; they block SIGINT, so Ctrl-C never does): its actors are gone, nothing is left to drain, and
    every Ray call would wait a minute for the GCS before failing."""
    err_console.print(f"Ray's processes stopped with this one (a signal sent to the whole process group, e.g. by "
                      f"timeout, systemd or kill -- -PGID), and engine {name!r} with them; to drain the engine "
                      f"first, signal serve's process alone (kill {os.getpid()}) or press Ctrl-C")
    exit_now(0)


@app.command()
def serve(name: str = typer.Option("smartbatch", "--name", help="the engine's name: what drivers pass to "
                                   "Engine.connect, and what `smartbatch stop --name` takes"),
          policy: str = typer.Option("smart", help="registered name or module:Class"),
          address: str | None = typer.Option(None, help="run on this Ray cluster (e.g. auto); default: start a "
                                             "local Ray that other drivers on this machine attach to"),
          speedup: float = typer.Option(1.0, min=0.001, max=1e6, help="engine seconds per real second (1: real time; "
                                        "higher only against simulated or emulated providers)"),
          providers: str | None = typer.Option(None, "--providers", help="sim: every provider simulated; http: "
                                               "real calls to the providers with an endpoint (default: settings)"),
          base_url: list[str] | None = typer.Option(None, "--base-url", help="NAME=URL: where provider NAME is "
                                                    "reached over HTTP (repeatable)"),
          http_port: int | None = typer.Option(None, "--http-port", min=0, max=65535, help="serve the OpenAI-compatible endpoint "
                                               "(/v1/chat/completions, /v1/files, /v1/batches ...) on this port "
                                               "(0: a free one); default: no endpoint"),
          http_host: str = typer.Option("127.0.0.1", "--http-host", help="the endpoint's bind address (0.0.0.0: "
                                        "every interface)"),
          http_key_env: str | None = typer.Option(None, "--http-key-env", help="environment variable holding the "
                                                  "key callers of the endpoint must send (the SDK's api_key), "
                                                  "which may name any tenant; without it or --http-tenant-key, "
                                                  "anyone who reaches the port uses the engine"),
          http_tenant_key: list[str] | None = typer.Option(None, "--http-tenant-key", metavar="TENANT=VAR",
                                                           help="a key, held in environment variable VAR, that "
                                                           "acts for TENANT alone: its calls are that tenant's, "
                                                           "and naming another in X-Smartbatch-Tenant is refused "
                                                           "(repeatable)"),
          state_dir: Path | None = typer.Option(None, "--state-dir", help="keep the endpoint's files, batches, "
                                                 "videos and SDK tries in this directory, so a restarted "
                                                 "endpoint takes them back (default: in memory only)"),
          drain_s: float = typer.Option(600.0, "--drain-s", min=0.0, help="at a stop, how long to wait for the "
                                        "provider batches under way to take their cancel, so what they finished "
                                        "is answered (and kept for the next start with --state-dir) rather than "
                                        "billed unread; 0: cancel them and leave at once"),
          seed: int = typer.Option(0, min=0, help="seed of the simulated draws"),
          shards: int = typer.Option(1, "--shards", min=1, help="actors each of ingest, cache, result hub and "
                                     "groupers (one per core of the cluster spreads the load; docs/benchmarks.md)"),
          catalog: Path | None = typer.Option(None, help="a catalog YAML replacing the packaged one"),
          catalog_overlay: Path | None = typer.Option(None, "--catalog-overlay", help="a YAML merged over the "
                                                      "catalog: adds or overrides providers, models, prices")) -> None:
    """Start a named, detached engine and keep it running (and supervised) until Ctrl-C, SIGTERM or `smartbatch
    stop`. Drivers attach with Engine.connect(NAME, address=...), and share its cache, budgets and idempotency.
    One serve per NAME on a machine: a second one is refused, naming the first."""
    try:  # before its claim and any Ray (Engine.start said it after a Ray had started for nothing)
        check_name(name, "--name ")
    except ConfigError as exc:
        _fail(exc)
    claim = NameClaim(name)  # first: a second serve of this name is refused at once, before any Ray starts
    try:
        _check_http_port(http_host, http_port)
        key_digest = _http_key(http_key_env, http_host, http_port, tenant_specs=http_tenant_key or [])
        tenant_keys = _tenant_keys(http_tenant_key or [], http_port, key_digest, http_key_env)
        state = _state_dir(state_dir, http_port)
        import ray

        from engine.app.driver import Engine

        settings, cat = _settings(catalog, catalog_overlay)
        settings = _providers(settings, providers, base_url)
        if (problem := speedup_problem(cat, settings, speedup)) is not None:  # before a Ray, or a killed one's rescue
            _fail(ConfigError(problem))
        try:  # as early, for the same reason: a limit that is no limit came after both (``_budget_check``)
            check_budget_limits(settings.budgets)
        except ConfigError as exc:
            _fail(exc)
        settings = prepare_endpoint(state, settings, cat, speedup=speedup, address=address)  # (a killed one's)
        init_ray(address or "local", "--address")
        # Ray Serve logs its own start and stop at INFO on this terminal, one line of which ("New http_options ...
        # will not be applied") reads as a problem when there is none; its warnings still show. Its logger is
        # configured when ray.serve is first imported, so after that.
        import ray.serve  # noqa: F401

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        try:
            eng = Engine.start(settings, policy=policy, catalog=cat, speedup=speedup, seed=seed, name=name,
                               detached=True, num_shards=shards)
        except SmartbatchError as exc:
            _fail(exc)
        _serve_until_stopped(eng, claim, policy=policy, speedup=speedup, http_host=http_host, http_port=http_port,
                             key_digest=key_digest, tenant_keys=tenant_keys, state_dir=state, drain_s=drain_s)
    finally:
        claim.release()


def _state_dir(path: Path | None, port: int | None) -> Path | None:
    """``--state-dir`` made absolute (the endpoint's replica runs in a Ray worker, elsewhere), created, and
    checked writable here rather than in the replica, where a failure would only reach the logs."""
    if path is None:
        return None
    if port is None:
        _fail(ConfigError("--state-dir keeps the endpoint's files and batches: pass --http-port too"))
    path = path.expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".smartbatch-write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        _fail(ConfigError(f"--state-dir {path}: not a writable directory ({exc.strerror or exc}); give one "
                          "this user can write"))
    return path


def _http_key(env: str | None, host: str, port: int | None, tenant_specs: list[str] | None = None) -> str | None:
    """The SHA-256 (hex) of the endpoint's key, read from ``env``; a missing or empty variable is refused. No key
    on an address others can reach is said, not refused (a trusted network is the caller's call)."""
    if env is None:
        if port is not None and not tenant_specs and host not in ("127.0.0.1", "localhost", "::1"):
            console.print(Text.assemble(("warning:", "yellow"), f" the endpoint on {host} asks no key: anyone who "
                                        "reaches it spends the engine's provider keys; pass --http-key-env NAME "
                                        "(or a key per tenant, --http-tenant-key TENANT=NAME)"))
        return None
    if not is_variable_name(env):  # not quoted: it may be the key itself (``--http-key-env $KEY``)
        _fail(ConfigError("--http-key-env: give the name of an environment variable (letters, digits and _) that "
                          "holds the key, never the key itself"))
    key = Secret(os.environ.get(env, "").strip())  # never a raw local (``Secret``'s docstring)
    if key.empty():
        _fail(ConfigError(f"--http-key-env {env}: the variable {env} is not set or empty; export the key the "
                          "endpoint's callers will send, or leave the option out"))
    return key.sha256()


def _tenant_keys(specs: list[str], port: int | None, admin: str | None, admin_env: str | None) -> dict[str, str]:
    """``--http-tenant-key TENANT=VAR``, each key read from VAR: its SHA-256 (hex) -> its tenant. Each fault is
    refused here, before any Ray starts, naming the option and the fix, and never quoting a key."""
    from engine.app._endpoint_keys import key_tenant_problem

    if specs and port is None:
        _fail(ConfigError("--http-tenant-key binds keys of the endpoint: pass --http-port too"))
    out: dict[str, str] = {}
    var_of: dict[str, str] = {}
    for spec in specs:
        tenant, eq, var = spec.rpartition("=")  # a variable's name has no '=': a tenant's may
        if not eq or not tenant:  # not quoted: it may be the key alone (``--http-tenant-key $ACME_KEY``)
            _fail(ConfigError(f"--http-tenant-key (the {_ordinal(specs.index(spec) + 1)} given): write TENANT=VAR, "
                              "the tenant and the environment variable holding its key (e.g. --http-tenant-key "
                              "acme=ACME_ENDPOINT_KEY)"))
        if not is_variable_name(var):  # not quoted: it may be the key itself, given in place of its variable
            _fail(ConfigError(f"--http-tenant-key {tenant}=...: what follows '=' must be the name of an environment "
                              "variable (letters, digits and _) that holds the key, never the key itself"))
        if (why := key_tenant_problem(tenant)) is not None:
            _fail(ConfigError(f"--http-tenant-key {spec}: tenant {tenant!r}: {why}; give a name of 1 to 256 "
                              "Latin-1 characters, no control character, no space at either end"))
        key = Secret(os.environ.get(var, "").strip())  # never a raw local: a later spec's refusal raises here
        if key.empty():
            _fail(ConfigError(f"--http-tenant-key {spec}: the variable {var} is not set or empty; export the key "
                              f"of tenant {tenant!r} in it"))
        digest = key.sha256()
        if digest == admin:
            _fail(ConfigError(f"--http-tenant-key {spec}: {var} holds the key of --http-key-env {admin_env}, which "
                              f"acts for every tenant; give tenant {tenant!r} a key of its own"))
        if out.get(digest, tenant) != tenant:
            _fail(ConfigError(f"--http-tenant-key {spec}: {var} holds the same key as {var_of[digest]}, the key "
                              f"of tenant {out[digest]!r}, and a key acts for one tenant: give each tenant its own key"))
        out[digest], var_of[digest] = tenant, var
    return out



def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _serve_until_stopped(eng: Any, claim: NameClaim, *, policy: str, speedup: float, http_host: str,
                         http_port: int | None, key_digest: str | None = None,
                         tenant_keys: dict[str, str] | None = None, state_dir: Path | None = None,
                         drain_s: float = 0.0) -> None:
    import ray

    from actors._peer import read_layout, stopping
    from engine.app._ledger_stop import outlive_stop, stop_left_s

    name = eng.name
    done, leave = threading.Event(), threading.Event()  # a first signal stops; a second leaves the drain
    gcs = ray.get_runtime_context().gcs_address
    endpoint = None
    # Those running now: if one exits before the engine has stopped, Ray is going down under it.
    ray_procs = [p for p in own_ray_processes() if p.poll() is None]
    try:
        if http_port is not None:
            from engine.app.serve_http import start_endpoint

            endpoint = start_endpoint(name, host=http_host, port=http_port, api_key_sha256=key_digest,
                                      tenant_keys=tenant_keys, state_dir=state_dir)
        for sig in (signal.SIGINT, signal.SIGTERM):  # one way out for both: the engine stops, then Ray
            signal.signal(sig, lambda *_: leave.set() if done.is_set() else done.set())
        claim.publish(address=gcs, endpoint=endpoint)
        console.print(f"engine {name!r} is serving (policy {policy}, speed-up x{speedup:g})")
        console.print(f"ray address: {gcs}")
        console.print(f"attach: Engine.connect({name!r}, address={gcs!r})")
        if eng.metrics_urls:
            console.print(f"metrics at {', '.join(eng.metrics_urls)}")
        if endpoint is not None:
            console.print(f"OpenAI-compatible endpoint at {endpoint}")
            console.print(f"Anthropic Messages at {endpoint.removesuffix('/v1')} (the anthropic SDK's base_url, "
                          "Claude models)")
            if tenant_keys:
                console.print(f"tenant keys for {', '.join(sorted(set(tenant_keys.values())))} (each acts for its "
                              "tenant alone)")
        console.print(f"stop: smartbatch stop --name {name} --address {gcs}  (or Ctrl-C)")
        # Until a signal, or until `smartbatch stop` (from anywhere) removed the engine, which a thread watches:
        # this thread only waits, as a signal's handler runs here between two bytecodes, and a Ray call (one can
        # block for a minute while Ray goes down) would hold it off.
        threading.Thread(target=_watch_layout, args=(name, done), name="smartbatch-serve-watch", daemon=True).start()
        while not done.wait(1.0):
            pass
    finally:
        def steps() -> None:
            if drain_s > 0 and read_layout(name) is not None:
                try:
                    drain(eng, drain_s, leave)
                except Exception as exc:  # the stop goes on: its own cancel reaches what is still under way
                    err_console.print(f"could not wait for the engine's provider batches ({brief(exc)}); stopping",
                                      style="yellow")
            if endpoint is not None:
                from engine.app.serve_http import stop_endpoint

                stop_endpoint(name, shutdown_serve=not ray_procs)  # a Ray of its own: Serve goes with it
            if read_layout(name) is not None:
                eng.shutdown()
            else:
                eng.stop()
                if ray_procs and stopping(name):  # this serve's Ray goes with it: not under that stop's feet
                    err_console.print(f"engine {name!r} is being stopped (smartbatch stop): waiting up to "
                                      f"{elsewhere_s:g} s for that stop to end before stopping Ray (it keeps what "
                                      "the budget ledger's Redis has not taken; Ctrl-C to stop Ray now)")
                    outlive_stop(name, elsewhere_s, leave)
            stopped_cleanly(state_dir)

        try:
            # No grace: Ray was started before the engine (above), so its stop never shuts Ray down itself.
            # The drain's own bound, and the seconds its check and its cancel take before the wait (CANCEL_CALL_S).
            # And a stop by name's own, which this serve outlives on a Ray of its own (``outlive_stop``).
            elsewhere_s = stop_left_s(eng.settings)
            limit_s = _GRACEFUL_S + (drain_s + _DRAIN_SLACK_S if drain_s > 0 else 0.0) + (
                elsewhere_s if ray_procs else 0.0)
            outcome = stop_or_lose_ray(steps, ray_procs, timeout_s=limit_s, grace_s=0.0)
            if outcome == "ray-gone":
                claim.release()
                _exit_with_ray_gone(name)
            if outcome == "timeout":
                err_console.print(f"engine {name!r} did not stop within {limit_s:g} s; stopping Ray")
        finally:
            ray.shutdown()


def drain(eng: Any, limit_s: float, leave: threading.Event) -> int:
    """The first step of a stop: when provider batches or calls are under way, cancel the engine's work
    (``Engine.cancel``) and wait up to ``limit_s`` (or until ``leave`` is set) for them to end and what they
    finished (billed) to reach the drivers, the endpoint among them, which keeps it on disk. Stopped at
    once, those members were billed unread, and the endpoint asked their lines again at the next start: 124 of
    300 lines paid twice (stop 48). Returns what was left (0: nothing)."""
    if not eng.wait_cancelled(0.0):  # asked without waiting: nothing under way, nothing to cancel
        return 0
    console.print(f"stopping: the engine's work is cancelled; waiting up to {limit_s:g} s for its provider batches "
                  "to take the cancel, so what they finished is answered and kept (a cancel takes up to 10 minutes "
                  "at OpenAI and Anthropic; Ctrl-C again to leave now: what they finished, before the cancel or "
                  "after, is then billed and not read)")
    left = eng.wind_down(limit_s, leave)
    if left:
        err_console.print("leaving before the provider batches and calls under way have ended: what those batches "
                          "finished, before the cancel or after, is billed and not read (their output is read when "
                          "they end), and the endpoint asks those lines again at the next start", style="yellow")
    else:
        console.print("the cancelled provider batches have ended; what they finished is answered")
    return left


def _watch_layout(name: str, done: threading.Event, every_s: float = 1.0) -> None:
    from actors._peer import read_layout

    misses = 0
    while not done.wait(every_s):
        try:
            gone = read_layout(name) is None
        except Exception as exc:  # Ray does not answer: three times running, there is nothing left to serve
            misses += 1
            gone = misses >= 3
            if gone:
                err_console.print(f"engine {name!r}: its Ray cluster does not answer ({brief(exc)}); exiting")
        else:
            misses = 0
            if gone:
                err_console.print(f"engine {name!r} was stopped; exiting")
        if gone:
            done.set()


@app.command()
def stop(name: str = typer.Option(..., "--name", help="the engine to stop, as `smartbatch serve --name` named it"),
         address: str = typer.Option("auto", help="the Ray cluster it runs on (what `smartbatch serve` printed)"),
         drain_s: float = typer.Option(600.0, "--drain-s", min=0.0, help="as `smartbatch serve --drain-s`: how "
                                       "long to wait for the provider batches and calls under way to end, so "
                                       "what they finished is answered; 0: cancel them and stop at once")
         ) -> None:
    """Stop a named engine for every driver attached to it (their open requests fail, naming the stop). With
    provider batches or calls under way it drains first, as `serve`'s own stop does (Ctrl-C leaves at once)."""
    from engine.app.driver import Engine

    def draining() -> None:
        console.print(f"draining: the engine's work is cancelled; waiting up to {drain_s:g} s for its provider "
                      "batches and calls under way to end, so what they finished is answered (Ctrl-C to stop now: "
                      "what they finished is then billed and not read)")

    other: list[dict] = []

    def waiting(rec: dict) -> None:  # a normal race (two stops, a loop's): said plainly, waited for, exit 0
        from actors._stop_claim import describe

        other.append(rec)
        console.print(f"a stop of engine {name!r} is already under way ({describe(rec)}); waiting for it to end")

    here = served_address(name)  # the serve of this engine on this machine, which `stop` then waits out
    try:
        check_answers(address, "--address")
        n = Engine.stop_named(name, address=address, drain_s=drain_s, draining=draining, flag="--address",
                              waiting=waiting)
    except SmartbatchError as exc:
        _fail(exc)
    if here is not None and (address == here or address == "auto" and not os.environ.get("RAY_ADDRESS")):
        if (pid := wait_released(name, here)) is not None:
            err_console.print(f"serve (pid {pid}) has not exited yet; a new `smartbatch serve --name {name}` is "
                              "refused until it has", style="yellow")
    console.print(f"engine {name!r} stopped, by the stop that was under way" if other and not n else
                  f"stopped engine {name!r} ({n} actors)")
