"""GPU lanes of ``smart``: gather compatible jobs (one warm-up for a batch) until the batch is full or the latest
start that still meets the earliest deadline, while the lane's recent arrivals promise company worth the wait."""

from __future__ import annotations

import math

from engine.core.cost import gpu_share_price, gpu_unit_seconds
from engine.core.grouping import Decision, Group
from engine.core.latency import Z99, gpu_batch_seconds

__all__ = ["GpuLane"]


class GpuLane:
    """Mixed into ``Smart``; reads its ``params`` (the value of time, ``gpu_margin_s``, ``gpu_max_wait_s``)."""

    def _gpu_not_worth(self, group: Group, company: float, horizon_s: float) -> str | None:
        """Why waiting ``horizon_s`` for ``company`` more jobs (expected) is not worth it (None when it is):
        what they would save by joining these members, rather than each going alone, under the thresholds or
        under what the members' wait is worth."""
        p = self.params
        gb = group.provider.gpu_batching
        n = len(group)
        m = min(company, gb.max_batch - n)
        if m <= 0:
            return "no company expected (the lane has had no recent arrivals)"
        unit = gpu_unit_seconds(group.spec, group.members[0].params)

        def share(b: int) -> float:
            return gpu_share_price(group.provider, unit, b)

        j = math.ceil(m)  # whole jobs, weighted by how likely the expected count makes them
        gain = (n * share(n) + j * share(1) - (n + j) * share(n + j)) * (m / j)
        if gain < p.min_batch_saving_usd:
            return f"company would save ${gain:.4f} expected, under min_batch_saving_usd ${p.min_batch_saving_usd:g}"
        if gain < p.min_saving_rel * (n + m) * share(1):
            return f"company would save {gain / ((n + m) * share(1)):.0%} of the price alone, under min_saving_rel"
        price = horizon_s / 3600 * sum(p.wait_usd_per_hour.get(k, 0.0) * c for k, c in group.by_priority.items())
        if price >= gain:
            return f"its wait is worth ${price:.4f}, company would save ${gain:.4f} expected"
        return None

    def _decide_gpu(self, group: Group, now: float) -> Decision:
        p = self.params
        gb = group.provider.gpu_batching
        assert gb is not None
        n = len(group)
        if n >= gb.max_batch:
            return Decision("dispatch", mode="gpu_batch", take=gb.max_batch, recommendation="process_as_batch",
                            reason=f"GPU batch full at {gb.max_batch}: one warm-up for {gb.max_batch} jobs")
        full = [group.members[0]] * gb.max_batch
        sigma = group.provider.sync_latency.sigma
        run_full = gpu_batch_seconds(group.provider, group.spec, full) * math.exp(Z99 * sigma)
        flush_at = group.earliest_deadline_at - run_full - p.gpu_margin_s
        if p.gpu_max_wait_s is not None:
            flush_at = min(flush_at, group.oldest_arrival_s + p.gpu_max_wait_s)
        if group.closed:  # a member expects no company (``Request.gather``): only the rest of its submission
            flush_at = min(flush_at, group.oldest_arrival_s + p.closed_gather_s)
            if now < flush_at:
                return Decision.wait(flush_at, f"gathering the rest of a submission ({n}/{gb.max_batch})")
        elif now < flush_at:
            # Value of time, as for batch lanes: gather only while the company the lane's recent arrivals
            # promise is worth the wait. A rate is known over its time constant, so the promise is judged (and
            # judged again) one horizon at a time: a lane gone quiet stops holding its jobs.
            horizon = min(flush_at - now, group.rates.tau_s if group.rates is not None else 0.0)
            why_not = self._gpu_not_worth(group, group.arrival_rate(now) * horizon, horizon)
            if why_not is not None:
                return Decision("dispatch", mode="gpu_batch", recommendation="process_individually" if n == 1
                                else "process_as_batch", reason=f"GPU now, {n} job(s): {why_not}")
            return Decision.wait(now + horizon, f"gathering GPU jobs ({n}/{gb.max_batch})")
        if n == 1:
            return Decision("dispatch", mode="gpu_batch", recommendation="process_individually",
                            reason="no compatible job arrived before the latest safe start")
        alone = gb.setup_s * n
        return Decision("dispatch", mode="gpu_batch", recommendation="process_as_batch" if n >= 2 else
                        "consider_batch", reason=f"GPU batch of {n} at the latest safe start: saves "
                                                 f"{alone - gb.setup_s:.0f}s of warm-up")
