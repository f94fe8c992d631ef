"""The OpenAI-compatible endpoint on Ray Serve: one deployment whose replica attaches to a named engine
(``Engine.connect``) and serves ``engine.app.endpoint.make_app`` over Serve's HTTP proxy.

Ray Serve is Ray's own HTTP layer: on a cluster the proxy runs where Serve puts it and the replica beside the
engine, with no extra process to deploy. One replica: files and batches live in its memory, and with a state
directory on disk too (see ``engine.app._endpoint_batches``).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path

from engine.core.errors import ConfigError

__all__ = ["app_name", "port_in_use", "start_endpoint", "stop_endpoint"]


def app_name(engine: str) -> str:
    return f"smartbatch-{engine}"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot take the endpoint (the OS's reason), or None if it can. Serve's proxy binds with
    SO_REUSEPORT, so on a port another proxy (another engine's, on another local Ray) listens on it would not
    fail but share the port, the kernel splitting connections between the two engines. This bind, without
    SO_REUSEPORT, fails instead."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _builder(engine: str, api_key_sha256: str | None, state_dir: str | None, tenant_keys: dict[str, str]):
    def build():  # runs in the replica, which is already on the engine's Ray
        from engine.app.driver import Engine
        from engine.app.endpoint import make_app

        eng = Engine.connect(engine)
        return make_app(eng, catalog=eng.catalog, api_key_sha256=api_key_sha256, tenant_keys=tenant_keys,
                        state_dir=None if state_dir is None else Path(state_dir))
    return build


def start_endpoint(engine: str, *, host: str = "127.0.0.1", port: int = 8000,
                   api_key_sha256: str | None = None, state_dir: Path | None = None,
                   tenant_keys: Mapping[str, str] | None = None) -> str:
    """Serve the endpoint of engine ``engine`` on ``host:port`` (port 0: a free one); returns its base URL
    (``.../v1``), what an OpenAI SDK takes as ``base_url``. Ray must be initialised on the engine's cluster. A
    port something already listens on is refused (``ConfigError``), see ``port_in_use``. ``api_key_sha256``:
    callers must send the key with that digest (only the digest reaches the replica); ``tenant_keys``: the digest
    of a key -> the one tenant it acts for (``make_app``; checked here, before Serve starts). ``state_dir``: where
    the replica keeps files and batches (``make_app``), a path on the machine it runs on (the head node's)."""
    from engine.app._endpoint_keys import EndpointKeys

    EndpointKeys(api_key_sha256, tenant_keys)  # a bad entry is refused here, not in the replica's log
    if port and (why := port_in_use(host, port)) is not None:
        raise ConfigError(f"port {port}: {host}:{port} is in use ({why}); stop what listens there, or pass "
                          "another port (0: a free one)")
    from ray import serve

    # Serve runs one HTTP proxy a cluster, on the port it was first started with, and this app takes route "/":
    # a second engine's endpoint had its port ignored, then failed on the route with Serve's traceback (a helper's
    # hunt). Named here, with the fix.
    others = sorted(a for a in serve.status().applications if a != app_name(engine))
    if others:
        raise ConfigError(f"this Ray cluster already serves {', '.join(others)}, and Ray Serve gives one HTTP "
                          "endpoint a cluster: stop that engine's endpoint, or serve this engine on a Ray of its "
                          "own (leave out --address)")
    port = port or _free_port(host)
    serve.start(http_options={"host": host, "port": port})
    built = _builder(engine, api_key_sha256, None if state_dir is None else str(state_dir), dict(tenant_keys or {}))
    options: dict = {"num_cpus": 0}
    if state_dir is not None:  # on the head node, whose disk holds the directory, after any restart too
        options["resources"] = {"node:__internal_head__": 0.001}
    dep = serve.deployment(serve.ingress(built)(), name=app_name(engine), ray_actor_options=options,
                           max_ongoing_requests=1000)
    serve.run(dep.bind(), name=app_name(engine), route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    return f"http://{shown}:{port}/v1"


def stop_endpoint(engine: str, shutdown_serve: bool = True) -> None:
    """Remove the engine's endpoint, and Serve itself when nothing else runs on it (``shutdown_serve``; a caller
    whose own Ray goes down next passes False: Serve goes with it, without a graceful shutdown that Ray's
    teardown would cut, and report, midway)."""
    from ray import serve

    try:
        serve.delete(app_name(engine))
        if shutdown_serve and not serve.status().applications:
            serve.shutdown()
    except Exception:  # Serve is already down (its controller went with the cluster): nothing to remove
        pass
