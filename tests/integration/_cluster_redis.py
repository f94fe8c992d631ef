"""A real local Redis Cluster for the tests: three masters on 127.0.0.1, no persistence, with no replicas (the
``redis_cluster`` fixture) or one each and a short ``cluster-node-timeout`` (``redis_cluster_replicas``: a master
lost is failed over in a second or two); both fixtures in tests/integration/conftest.py, torn down after."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time

READY_S = 20.0  # the bound on each wait: a node's start, the cluster's agreement
MANUAL_FAILOVER_S = 6.0  # past Redis's own 5 s bound on a manual failover, after which it gives it up


def _drain(out) -> None:
    """Read a node's output to its end, so a full pipe never blocks it."""
    try:
        for _ in out:
            pass
    except ValueError:  # closed by ``stop`` after its bounded wait
        pass


def _info(raw) -> dict[str, str]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _ephemeral() -> range:
    """The ports the kernel hands out to ``bind(0)`` and to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
        return range(lo, hi + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def _candidates() -> range | list[int]:
    """Ports for the nodes: above Ray's worker ports (10002-19999) and, with their bus ports, outside the kernel's
    ephemeral range. A port found free there and bound a moment later could be taken meanwhile by whatever the
    other xdist worker runs (its Ray picks its ports by ``bind(0)`` then binds them, as does ``redis_server``), and
    a node taking a port Ray had just picked could fail that Ray's start (a review)."""
    eph = _ephemeral()
    ports = [p for p in range(20000, 55000) if p not in eph and p + 10000 not in eph]
    return ports or range(20000, 55000)  # a machine whose ephemeral range leaves none: as before


def _free_ports(n: int) -> list[int]:
    """``n`` ports free on 127.0.0.1, each with its cluster bus port (port + 10000, Redis's rule before 7.0's
    ``cluster-port``, so Redis 6 runs the tests too) free as well, none another's bus port."""
    import random

    rng, out, pool = random.Random(), [], _candidates()
    while len(out) < n:
        port = rng.choice(pool)
        if {port, port + 10000} & {q + d for q in out for d in (0, 10000)}:
            continue
        socks = []
        try:
            for p in (port, port + 10000):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        out.append(port)
    return out


class LocalCluster:
    """Three ``redis-server --cluster-enabled yes`` joined by ``redis-cli --cluster create``, with ``replicas``
    replicas each. ``url``: the first node's (a cluster client finds the others from it); ``urls``: each node's."""

    def __init__(self, tmp_dir, replicas: int = 0, node_timeout_ms: int = 15000) -> None:
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = _free_ports(3 * (1 + replicas))
        self.dir = tmp_dir
        self.procs: list[subprocess.Popen] = []
        self._drains: dict[int, threading.Thread] = {}
        self.urls = [f"redis://127.0.0.1:{p}/0" for p in self.ports]
        self.url = self.urls[0]

    def start(self) -> None:
        for port in self.ports:
            self.procs.append(self._spawn(port))
        create = subprocess.run(
            [shutil.which("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"], capture_output=True, text=True, timeout=READY_S)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-500:]} {create.stderr[-500:]}")
        self.wait_agreed()

    def _spawn(self, port: int) -> subprocess.Popen:
        """Start the node of ``port`` (its ``nodes-<port>.conf`` kept: one started again rejoins as it was, a
        master failed over meanwhile as a replica of its successor), waited for, its output drained."""
        proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--loglevel", "notice",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             # A replica's full sync starts at once: by default a master waits 5 s for more replicas to join it, and
             # each master started again after a failover (or demoted) held its test that long.
             "--repl-diskless-sync-delay", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in proc.stdout:  # its own "ready" line: an event, not a guessed delay
            seen.append(line)
            if "Ready to accept connections" in line:
                break
        else:
            proc.wait(10)
            raise RuntimeError(f"redis-server (cluster node) did not start on {port}: {''.join(seen[-5:])}")
        drain = threading.Thread(target=_drain, args=(proc.stdout,), daemon=True)
        drain.start()
        self._drains[port] = drain
        return proc

    def revive(self, port: int) -> None:
        """Start again the node of ``port`` that a test killed, and wait until the cluster agrees again with every
        replica's link up: the next test finds three masters with a replica each."""
        i = self.ports.index(port)
        old = self.procs[i]
        old.wait(10)
        self._drains[port].join(10)  # it ends at the pipe's end, when the node died
        old.stdout.close()
        self.procs[i] = self._spawn(port)
        self.wait_agreed()

    def wait_agreed(self) -> None:
        """Until every node says the cluster is ok, knows every node and serves all 16384 slots, and three are
        masters, each with its replicas online on both ends (a master started again after its failover says it is
        one until the cluster tells it otherwise; a replica whose link is up may not be online at its master yet,
        and ``ROLE`` leaves it out) (bounded)."""
        import redis

        clients = [redis.Redis(port=p, socket_timeout=2.0) for p in self.ports]
        try:
            end = time.monotonic() + READY_S
            while True:
                infos = [_info(c.execute_command("CLUSTER", "INFO")) for c in clients]
                links = [c.info("replication") for c in clients]
                masters = [r for r in links if r.get("role") == "master"]
                if all(str(i.get("cluster_state")) == "ok" and int(i.get("cluster_known_nodes", 0)) == len(self.ports)
                       and int(i.get("cluster_slots_ok", 0)) == 16384 for i in infos) and len(masters) == 3 and all(
                        r.get("master_link_status") == "up" for r in links if r not in masters) and all(
                        sum(r.get(f"slave{k}", {}).get("state") == "online" for k in range(self.replicas))
                        == self.replicas for r in masters):
                    return
                if time.monotonic() > end:
                    raise RuntimeError(f"the local Redis Cluster did not agree within {READY_S} s: {infos}")
                time.sleep(0.05)  # polling the servers' own state, bounded above: nothing to wait on instead
        finally:
            for c in clients:
                c.close()

    def node_of(self, key: str) -> int:
        """The port of the node that serves ``key``'s slot."""
        from redis.crc import key_slot

        return self.node_of_slot(key_slot(key.encode()))

    def ids(self) -> dict[int, str]:
        """Each node's id, by port."""
        import redis

        out = {}
        for p in self.ports:
            with redis.Redis(port=p, socket_timeout=2.0) as c:
                out[p] = c.execute_command("CLUSTER", "MYID").decode()
        return out

    def begin_move(self, slot: int, to: int) -> int:
        """Start moving ``slot`` to the node at ``to`` as ``redis-cli --cluster reshard`` does (SETSLOT IMPORTING on
        it, then MIGRATING on the node serving it); returns that node's port. No key moves yet (``move_keys``)."""
        import redis

        frm, ids = self.node_of_slot(slot), self.ids()
        with redis.Redis(port=to, socket_timeout=2.0) as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[frm])
        with redis.Redis(port=frm, socket_timeout=2.0) as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to])
        return frm

    def slot_keys(self, port: int, slot: int) -> list[str]:
        """The keys of ``slot`` the node at ``port`` holds."""
        import redis

        with redis.Redis(port=port, socket_timeout=2.0) as c:
            return sorted(k.decode() for k in c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100_000))

    def move_keys(self, frm: int, to: int, keys: list[str]) -> None:
        """``MIGRATE`` ``keys`` from the node at ``frm`` to the one at ``to``, with ``REPLACE`` (as ``redis-cli
        --cluster reshard --cluster-replace``): a key written on ``to`` meanwhile is overwritten, not a failure."""
        import redis

        if keys:
            with redis.Redis(port=frm, socket_timeout=5.0) as c:
                c.execute_command("MIGRATE", "127.0.0.1", to, "", 0, 5000, "REPLACE", "KEYS", *keys)

    def end_move(self, slot: int, frm: int, to: int) -> None:
        """Move the keys of ``slot`` left on ``frm`` and give the slot to ``to`` on every node (SETSLOT NODE: the
        importing node first, then the one it left, then the others, as redis-cli does)."""
        import redis

        self.move_keys(frm, to, self.slot_keys(frm, slot))
        ids = self.ids()
        for p in (to, frm, *(q for q in self.ports if q not in (frm, to))):
            with redis.Redis(port=p, socket_timeout=2.0) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to])

    def node_of_slot(self, slot: int) -> int:
        """The port of the node that serves ``slot``."""
        import redis

        with redis.Redis(port=self.ports[0], socket_timeout=2.0) as c:
            for lo, hi, (_, port, *_), *_ in c.execute_command("CLUSTER", "SLOTS"):
                if lo <= slot <= hi:
                    return int(port)
        raise AssertionError(f"no node serves slot {slot}")

    def keys(self, pattern: str = "*") -> dict[int, list[str]]:
        """Every node's keys matching ``pattern``, by port."""
        import redis

        out = {}
        for p in self.ports:
            with redis.Redis(port=p, socket_timeout=2.0) as c:
                out[p] = sorted(k.decode() for k in c.scan_iter(match=pattern, count=1000))
        return out

    def replica_of(self, port: int) -> int:
        """The port of the replica of the master at ``port``."""
        import redis

        with redis.Redis(port=port, socket_timeout=2.0) as c:
            role = c.execute_command("ROLE")
        assert role[0] in (b"master", "master") and role[2], f"the node at {port} is no master with a replica: {role}"
        return int(role[2][0][1])

    def signal(self, port: int, sig: int) -> None:
        """Send ``sig`` to the node at ``port`` (SIGSTOP, SIGCONT; SIGKILL: a crash, waited for)."""
        proc = self.procs[self.ports.index(port)]
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(10)

    def manual_failover(self, port: int) -> None:
        """``CLUSTER FAILOVER`` on the replica at ``port``, asked again if Redis aborts it: a manual failover that has
        not caught up with its master in 5 s (Redis's fixed bound) is dropped, which a loaded machine saw once
        (the node never promoted); an operator would ask again. Then ``wait_master``."""
        import redis

        with redis.Redis(port=port, socket_timeout=2.0) as c:
            for _ in range(3):
                c.execute_command("CLUSTER", "FAILOVER")
                end = time.monotonic() + MANUAL_FAILOVER_S
                while c.execute_command("ROLE")[0] not in (b"master", "master") and time.monotonic() < end:
                    time.sleep(0.02)  # polling the server's own state, bounded above: nothing to wait on instead
                if c.execute_command("ROLE")[0] in (b"master", "master"):
                    break
        self.wait_master(port)

    def wait_master(self, port: int, dead: int | None = None) -> None:
        """Until the node at ``port`` is a master and every node but ``dead`` says the cluster is ok (bounded)."""
        import redis

        with redis.Redis(port=port, socket_timeout=2.0) as c:
            end = time.monotonic() + READY_S
            while c.execute_command("ROLE")[0] not in (b"master", "master"):
                if time.monotonic() > end:
                    raise RuntimeError(f"the node at {port} was not promoted within {READY_S} s")
                time.sleep(0.02)  # polling the server's own state, bounded above: nothing to wait on instead
        live = [p for p in self.ports if p != dead]
        end = time.monotonic() + READY_S
        while True:
            states = []
            for p in live:
                with redis.Redis(port=p, socket_timeout=2.0) as c:
                    states.append(_info(c.execute_command("CLUSTER", "INFO")).get("cluster_state"))
            if all(s == "ok" for s in states):
                return
            if time.monotonic() > end:
                raise RuntimeError(f"the cluster was not ok again within {READY_S} s: {states}")
            time.sleep(0.02)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:  # a node a test stopped (SIGSTOP) takes SIGTERM only once it runs again
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:  # a node that never became ready has no drain: waited for all the same
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for drain in self._drains.values():
            drain.join(10)
        for proc in self.procs:
            proc.stdout.close()
        self.procs.clear()
        self._drains.clear()
