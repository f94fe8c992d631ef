"""``Engine.start`` names a bad argument of its own before anything starts (a helper's tour: ``speedup=nan``
gave a pydantic error about a catalog field, ``metrics_port=-1`` a Ray task error, ``num_shards=2.5`` a
TypeError, ``offset_s=nan`` and ``seed="x"`` started an engine whose every request then failed, and a bad
``budget_usd`` was refused only after an embedded Ray had started)."""

from __future__ import annotations

import math

import pytest

from engine import Engine
from engine.core.errors import ConfigError


@pytest.mark.parametrize("kw, named", [
    ({"speedup": math.nan}, "speedup=nan"),
    ({"speedup": 0}, "speedup=0"),
    ({"offset_s": math.nan}, "offset_s=nan"),
    ({"seed": "x"}, "seed='x'"),
    ({"seed": -1}, "seed=-1"),
    ({"num_shards": 2.5}, "num_shards=2.5"),
    ({"micro_batch": 0}, "micro_batch=0"),
    ({"flush_ms": math.inf}, "flush_ms=inf"),
    ({"metrics_port": -1}, "metrics_port=-1"),
    ({"metrics_port": True}, "metrics_port=True"),
    ({"overload": "drop"}, "overload='drop'"),
    ({"budget_usd": -5.0}, "budget_usd"),
    # A new user's tour (stop 75): "" ran the engine under a random name, which nothing named; a list of
    # parameters raised AttributeError from inside the policy.
    ({"name": ""}, "name=''"),
    ({"name": 5}, "name=5"),
    ({"policy_params": [1]}, "policy 'smart': params must be a mapping of its parameters .*got list"),
])
def test_a_bad_start_argument_is_named_before_anything_starts(kw, named, monkeypatch):
    import engine.app.driver as driver

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for an engine whose arguments are bad")

    monkeypatch.setattr(driver, "init_ray", no_ray)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        Engine.start(**kw)


class _AttachedRay:
    """A process already attached to a Ray cluster at ``gcs`` (``ray.init`` called by the user's script)."""

    def __init__(self, gcs: str) -> None:
        self.gcs_address = gcs


def _attach_to(monkeypatch, gcs: str) -> None:
    """This process as one a script attached to the Ray cluster at ``gcs``; a second ``ray.init`` fails the test."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: _AttachedRay(gcs))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("an attached process must not init Ray again"))


@pytest.mark.parametrize("address, refused", [
    ("bad address", True), ("10.9.9.9:6379", True), ("192.0.2.2:6380", True),
    ("auto", False), ("local", False), ("192.0.2.2:37299", False), ("127.0.0.1:37299", False),
])
def test_an_address_of_another_ray_in_an_attached_process_is_refused_not_ignored(address, refused, monkeypatch):
    """It was ignored: `run --address X` in a process where Ray ran already used that Ray, not X."""

    from engine.app._driver_shared import init_ray

    _attach_to(monkeypatch, "192.0.2.2:37299")
    if refused:
        with pytest.raises(ConfigError, match=r"--address .*already attached to the Ray cluster at 192\.0\.2\.2:37299"):
            init_ray(address, "--address")
    else:
        assert init_ray(address, "--address") is False


_NAMES = {"raycluster-head-svc": "192.0.2.2", "ray-head.example": "192.0.2.2", "other-head": "10.9.9.9"}


@pytest.mark.parametrize("gcs, address, refused", [
    # a name of the cluster's head (a Kubernetes service's, a DNS name), in any case: the same cluster
    ("192.0.2.2:37299", "raycluster-head-svc:37299", False), ("192.0.2.2:37299", "RAY-HEAD.example:37299", False),
    ("192.0.2.2:37299", "[::1]:37299", False), ("[2001:db8::2]:37299", "[2001:DB8::2]:37299", False),
    ("192.0.2.2:37299", "LOCALHOST:37299", False),
    ("192.0.2.2:37299", "other-head:37299", True), ("192.0.2.2:37299", "nowhere.invalid:37299", True),
    ("192.0.2.2:37299", "raycluster-head-svc:6379", True), ("[2001:db8::2]:37299", "[2001:db8::3]:37299", True),
])
def test_an_attached_process_takes_its_own_cluster_by_any_name_of_its_head(gcs, address, refused, monkeypatch):
    """Refused before (a review of stop 70): a host name of the head (``ray.init`` resolves it; Ray reports the
    cluster by IP), an IPv6 address in brackets, a name in capitals. Names resolve here from a table, not DNS."""
    import socket

    from engine.app._driver_shared import init_ray

    def resolve(host, *_a, **_k):
        if host in _NAMES or ":" in host or host[0].isdigit():
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (_NAMES.get(host, host), 0))]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    _attach_to(monkeypatch, gcs)
    if refused:
        with pytest.raises(ConfigError, match=r"--address .*already attached to the Ray cluster at "):
            init_ray(address, "--address")
    else:
        assert init_ray(address, "--address") is False


@pytest.mark.parametrize("attach", ["connect", "stop_named"])
def test_no_serve_of_that_name_here_and_no_ray_names_the_engine_not_rays_words(attach, monkeypatch):
    """`smartbatch status --name prod` with nothing running printed Ray's "Could not find any running Ray instance"
    under `--address auto`, an address the user never typed."""
    import ray

    from engine.app import _driver_shared, _serve_claim

    def no_ray(address, flag="address"):
        raise ConfigError(f"{flag} {address}: no Ray cluster answers there (Could not find any running Ray instance)")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(_serve_claim, "served_address", lambda name: None)
    monkeypatch.setattr(_driver_shared, "init_ray", no_ray)
    with pytest.raises(ConfigError, match=r"^no engine named 'prod' runs on this machine .*smartbatch serve --name "
                                          r"prod.*give --address the address its serve printed"):
        getattr(Engine, attach)("prod", flag="--address")
    with pytest.raises(ConfigError, match=r"^--address 10\.0\.0\.5:6379: no Ray cluster answers there"):
        getattr(Engine, attach)("prod", address="10.0.0.5:6379", flag="--address")  # an address typed: Ray's words


def test_a_ray_found_under_auto_that_cannot_be_joined_keeps_rays_reason(monkeypatch):
    """A review: any failure to join under `--address auto` was said as "no engine named 'prod' runs on this machine
    (... and no Ray cluster at --address auto)", though Ray had found one (another Ray version, or the unanswering
    cluster RAY_ADDRESS names) and said why it could not join: that reason was dropped."""
    import ray

    from engine.app import _driver_shared, _serve_claim

    def other_version(address, flag="address"):
        raise ConfigError(f"{flag} {address}: no Ray cluster answers there (Version mismatch: The cluster was started "
                          "with Ray 2.9.0, this process runs 2.40.0)")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(_serve_claim, "served_address", lambda name: None)
    monkeypatch.setattr(_driver_shared, "init_ray", other_version)
    with pytest.raises(ConfigError, match=r"^--address auto: .*Version mismatch"):
        Engine.connect("prod", flag="--address")


@pytest.mark.parametrize("attach", ["connect", "stop_named"])
def test_a_name_served_nowhere_here_names_the_engines_this_machine_serves(attach, tmp_path, monkeypatch):
    """A new user's tour (stop 81): with `smartbatch serve --name tour81` running, `smartbatch status --name nosuch`
    (a typo) joined the Ray that `--address auto` guessed, another job's test cluster, and said "no engine named
    'nosuch' runs on this Ray cluster (running: drain-220275)": an engine of someone else's, and not the one this
    machine serves. It now names the serves of this machine and the address of each."""
    import tempfile

    import ray

    import actors._peer
    import actors._stop_claim
    import actors.remote
    from engine.app import _driver_shared
    from engine.app._serve_claim import NameClaim

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own claims
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    joined = []
    monkeypatch.setattr(_driver_shared, "init_ray", lambda address, flag="address": joined.append(address) or False)
    monkeypatch.setattr(actors.remote, "attach_actors", lambda name: None)
    monkeypatch.setattr(actors._peer, "running_engines", lambda: ["drain-220275"])
    monkeypatch.setattr(actors._peer, "read_layout", lambda name: None)
    monkeypatch.setattr(actors._stop_claim, "read_stop", lambda name: None)
    claim = NameClaim("tour81")
    try:
        claim.publish(address="192.0.2.2:46561")
        with pytest.raises(ConfigError) as err:
            getattr(Engine, attach)("nosuch", flag="--address")
    finally:
        claim.release()
    assert joined == ["auto"]
    assert "(running: drain-220275)" in str(err.value)
    assert "served on this machine: 'tour81' (--address 192.0.2.2:46561)" in str(err.value)


def test_a_name_whose_serve_here_is_still_starting_is_said_to_be_starting(tmp_path, monkeypatch):
    """Review of stop 81's listing: `smartbatch status --name tour81` while `serve --name tour81` was starting (its
    claim taken, no address yet: it publishes one once its engine is up) joined Ray's guess and said "no engine
    named 'tour81' runs on this Ray cluster", the listing leaving out the one serve of that name, starting here."""
    import tempfile

    import ray

    import actors._peer
    import actors.remote
    from engine.app import _driver_shared
    from engine.app._serve_claim import NameClaim

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    joined = []
    monkeypatch.setattr(_driver_shared, "init_ray", lambda address, flag="address": joined.append(address) or False)
    monkeypatch.setattr(actors.remote, "attach_actors", lambda name: None)
    monkeypatch.setattr(actors._peer, "running_engines", lambda: ["drain-220275"])
    claim, other = NameClaim("tour81"), NameClaim("other")  # tour81's serve has published no address yet
    try:
        other.publish(address="192.0.2.2:46561")
        with pytest.raises(ConfigError) as err:
            Engine.connect("tour81", flag="--address")
    finally:
        claim.release()
        other.release()
    assert joined == ["auto"]
    assert str(err.value).endswith("served on this machine: 'other' (--address 192.0.2.2:46561), 'tour81' (starting)")
