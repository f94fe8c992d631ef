"""The ports of the local Redis Cluster the integration tests start (``tests/integration/_cluster_redis.py``). No
Redis."""

from pathlib import Path

import pytest

from tests.integration._cluster_redis import _free_ports

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def test_the_local_cluster_s_ports_and_bus_ports_are_outside_the_kernel_s_ephemeral_range():
    """Before (a review), they were drawn from 20000-55000, mostly among the ports the kernel hands to ``bind(0)``:
    checked free, then bound a moment later, one could be taken meanwhile by the other xdist worker's Ray or
    ``redis_server``, which picks its ports so (the node, or the other worker's Ray, could then not start)."""
    if not RANGE.exists():
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range (not Linux): the ports are drawn as before")
    lo, hi = map(int, RANGE.read_text().split())
    eph = range(lo, hi + 1)
    if all(p in eph or p + 10000 in eph for p in range(20000, 55000)):
        return  # no room outside it here: the ports are drawn as before
    for _ in range(20):
        ports = _free_ports(3)
        used = [p + d for p in ports for d in (0, 10000)]
        assert len(set(used)) == 6 and not any(p in eph for p in used), ports
        assert all(20000 <= p for p in ports)  # above Ray's worker ports
