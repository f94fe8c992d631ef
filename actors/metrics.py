"""Prometheus metrics of a running engine (prefix ``smartbatch_``), kept in the hub actor's own registry and
served on one port from there."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.result import Result

__all__ = ["EngineMetrics"]

_SECONDS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("smartbatch_requests", "Requests resolved, by outcome", ["outcome"], registry=r)
        self.cost = Counter("smartbatch_cost_usd", "Billed cost in USD", ["provider", "mode"], registry=r)
        self.saving = Counter("smartbatch_saving_usd", "List price minus billed cost, USD", ["provider"],
                              registry=r)
        self.hits = Counter("smartbatch_cache_hits", "Requests served without a provider call", ["kind"],
                            registry=r)
        self.batch_size = Histogram("smartbatch_batch_size", "Requests per dispatch", ["provider", "mode"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384),
                                    registry=r)
        self.queue = Gauge("smartbatch_queue_depth", "Requests in flight at a provider's dispatcher", ["provider"],
                           registry=r)
        self.dispatch_s = Histogram("smartbatch_dispatch_seconds", "Engine seconds from arrival to dispatch",
                                    ["provider"], buckets=_SECONDS, registry=r)
        self.e2e_s = Histogram("smartbatch_end_to_end_seconds", "Engine seconds from arrival to result",
                               ["provider"], buckets=_SECONDS, registry=r)
        self.port: int | None = None

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve /metrics; port 0 picks a free port. Returns the port."""
        if self.port is None:
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
            self.port = server.server_port
        return self.port

    def observe_results(self, results: list[Result], list_prices: list[float] | None) -> None:
        for k, res in enumerate(results):
            self.requests.labels(res.status).inc()
            prov = res.provider or "unknown"
            if res.cost_usd:
                self.cost.labels(prov, res.mode or "none").inc(res.cost_usd)
            if list_prices and res.status in ("ok", "reused"):
                self.saving.labels(prov).inc(max(list_prices[k] - res.cost_usd, 0.0))
            if res.hit:
                self.hits.labels(res.hit).inc()
            if res.done_s is not None:
                self.e2e_s.labels(prov).observe(max(res.done_s - res.arrival_s, 0.0))

    def observe_dispatch(self, provider: str, mode: str, waits: list[float], in_flight: int) -> None:
        self.batch_size.labels(provider, mode).observe(len(waits))
        for w in waits:
            self.dispatch_s.labels(provider).observe(max(w, 0.0))
        self.queue.labels(provider).set(in_flight)
