"""What a stop keeps on disk of a Redis ledger's outbox, and how the next engine takes it back
(``actors._budget_kept``). Without Ray or Redis: ``ray.get`` and the budget controller are stand-ins that say what
a controller's ``leave``, ``take_kept`` and ``kept_waiting`` would (Redis away unless told)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from actors import _budget_kept as kept
from engine.core.budgets import BudgetSettings
from engine.core.settings import JournalSettings, Settings

_RECORDS = {"s\x1fa0\x1f1.5": ("a0", 1.5, None)}


class _Ray:
    @staticmethod
    def get(value, timeout=None):
        if isinstance(value, BaseException):
            raise value
        return value


class _Method:
    def __init__(self, fn):
        self.remote = fn


class _Budget:
    """``leave`` says what waits for Redis; ``take_kept`` records what it is given and answers ``unjournaled``."""

    def __init__(self, left: dict | None = None, unjournaled: int = 0):
        self.given: list[dict] = []
        self.sent: set[str] = set()  # the items Redis took (none: it is away)
        self.leave = _Method(lambda wait: dict(left or {}))
        self.take_kept = _Method(lambda records: (self.given.append(records), unjournaled)[1])
        self.kept_waiting = _Method(lambda keys: [k for k in keys if k not in self.sent])


def _settings(tmp_path) -> Settings:
    return Settings(budgets=BudgetSettings(redis_url="redis://:s3cret@127.0.0.1:6390/0", redis_prefix="kept"),
                    journal=JournalSettings(ledger_dir=tmp_path / "ledgers", ledger_wait_s=0.0))


def _left() -> dict:
    return {"settlements": 1, "charges": 0, "unsettled_usd": 1.5, "redis_url": "redis://:***@127.0.0.1:6390/0",
            "error": "ConnectionError: refused", "records": dict(_RECORDS)}


def _files(settings) -> list[str]:
    d = kept.kept_dir(settings)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_a_kept_file_holds_spend_readable_by_its_owner_alone_and_no_password(tmp_path):
    settings = _settings(tmp_path)
    left = kept.keep_left(_Ray, _Budget(_left()), settings, "e1")
    path = kept.kept_dir(settings) / os.path.basename(left["kept_in"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # (before: the umask's, 0644: any user read the spend)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert b"s3cret" not in path.read_bytes()


def test_a_taken_back_file_stays_on_disk_until_the_engine_that_took_it_stops(tmp_path):
    """Taken back, its items live in the engine's memory and Ray's store (which goes with a local Ray): the file
    is deleted only once the stop kept what is still unsent. Before, it went at once: a crash of the engine that
    took it lost their spend."""
    settings = _settings(tmp_path)
    kept.keep_left(_Ray, _Budget(_left()), settings, "e1")
    first = _Budget()
    claims = kept.take_back_kept(_Ray, first, settings)
    assert first.given == [_RECORDS] and claims.taken == 1
    (name,) = _files(settings)
    assert ".taking-" in name
    second = _Budget()
    assert kept.take_back_kept(_Ray, second, settings).taken == 0 and second.given == []  # its taker runs
    claims.finish(None)  # the stop: Redis took everything
    assert _files(settings) == []


def test_the_file_of_an_engine_that_died_while_it_held_it_is_taken_back_by_the_next(tmp_path):
    settings = _settings(tmp_path)
    kept.keep_left(_Ray, _Budget(_left()), settings, "e1")
    (f,) = kept.kept_dir(settings).glob("*.outbox")
    # An engine took it (renamed it its own) and died before it could send it or give it back: no lock holds it.
    taken = f.with_name(f.name + ".taking-0123abcd")
    os.rename(f, taken)
    after = _Budget()
    claims = kept.take_back_kept(_Ray, after, settings)  # (before: left as it was, its spend never counted)
    assert after.given == [_RECORDS] and claims.taken == 1
    claims.finish(_left() | {"kept_in": "elsewhere"})  # the stop kept what was left in a newer file
    assert _files(settings) == []


@pytest.mark.parametrize("left", [{"error": "not asked: GetTimeoutError"}, {**_left(), "kept_in": None}])
def test_a_stop_that_did_not_keep_what_was_left_gives_the_files_it_took_back(tmp_path, left):
    settings = _settings(tmp_path)
    kept.keep_left(_Ray, _Budget(_left()), settings, "e1")
    claims = kept.take_back_kept(_Ray, _Budget(), settings)
    claims.finish(left)
    (name,) = _files(settings)
    assert name.endswith(".outbox")
    again = _Budget()
    claims = kept.take_back_kept(_Ray, again, settings)
    assert claims.taken == 1 and again.given == [_RECORDS]
    claims.finish(None)


def test_a_file_not_all_journaled_or_not_taken_is_given_back_at_once(tmp_path):
    settings = _settings(tmp_path)
    kept.keep_left(_Ray, _Budget(_left()), settings, "e1")
    assert kept.take_back_kept(_Ray, _Budget(unjournaled=1), settings).taken == 0
    failing = _Budget()
    failing.take_kept = _Method(lambda records: TimeoutError("busy"))
    assert kept.take_back_kept(_Ray, failing, settings).taken == 0
    assert [n.endswith(".outbox") for n in _files(settings)] == [True]
    claims = kept.take_back_kept(_Ray, _Budget(), settings)
    assert claims.taken == 1
    claims.finish(None)


def test_an_unreadable_file_is_set_aside_once_not_read_at_every_start(tmp_path):
    settings = _settings(tmp_path)
    d = kept.kept_dir(settings)
    d.mkdir(parents=True)
    (d / "1-ab.outbox").write_bytes(b"not a pickle")
    assert kept.take_back_kept(_Ray, _Budget(), settings).taken == 0
    assert _files(settings) == ["1-ab.unreadable"]


def test_engines_starting_together_take_each_file_once(tmp_path):
    settings = _settings(tmp_path)
    for k in range(20):
        kept.keep_left(_Ray, _Budget({**_left(), "records": {f"c\x1f{k}": (k, 0.0)}}), settings, "e1")
    budgets = [_Budget() for _ in range(4)]
    claims = [None] * 4
    go = threading.Barrier(4)

    def start(k: int) -> None:
        go.wait()
        claims[k] = kept.take_back_kept(_Ray, budgets[k], settings)
    threads = [threading.Thread(target=start, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    given = [k for b in budgets for r in b.given for k in r]
    assert sorted(given) == sorted(f"c\x1f{k}" for k in range(20))  # each once
    for c in claims:
        c.finish(None)
    assert _files(settings) == []



def test_one_ledger_spelt_two_ways_keeps_its_files_in_one_place(tmp_path):
    """Redis's defaults written out or left out name the same ledger: before, an engine started with
    ``redis://h`` never found what one stopped with ``redis://h:6379/0`` kept (its spend never counted)."""
    def home(url: str) -> object:
        return kept.kept_dir(Settings(budgets=BudgetSettings(redis_url=url, redis_prefix="p"),
                                      journal=JournalSettings(ledger_dir=tmp_path)))
    assert home("redis://H") == home("redis://h:6379/0") == home("redis://:pw@h:6379/") == home("redis://h:6379?db=0")
    assert home("redis://h/1") == home("redis://h:6379?db=1") != home("redis://h")
    assert home("rediss://h") != home("redis://h") and home("redis://h:6380") != home("redis://h")


def test_a_file_taken_back_goes_once_redis_took_its_items_not_at_a_crash_days_later(tmp_path):
    """Held until the stop, a file whose items Redis took an hour after the start was sent again by the next
    engine after a crash of this one days later, past its markers' life: counted twice. It goes once they are in."""
    settings = _settings(tmp_path)
    kept.keep_left(_Ray, _Budget(_left()), settings, "e1")
    budget = _Budget()
    claims = kept.take_back_kept(_Ray, budget, settings)
    claims.drop_sent(_Ray, budget)  # a check: Redis still away
    assert len(_files(settings)) == 1
    budget.sent.update(_RECORDS)  # Redis back: the controller sent them
    claims.drop_sent(_Ray, budget)
    assert _files(settings) == [] and claims.held == []
    claims.finish({"error": "not asked: the engine's actors died"})  # nothing to give back
    assert _files(settings) == []
    busy = _Budget()
    busy.kept_waiting = _Method(lambda keys: TimeoutError("busy"))
    kept.keep_left(_Ray, _Budget(_left()), settings, "e2")
    again = kept.take_back_kept(_Ray, busy, settings)  # not answered: held, asked again at the next check
    assert len(again.held) == 1
    again.finish(None)


def test_redis_answering_at_the_start_leaves_nothing_held(tmp_path):
    settings = _settings(tmp_path)
    kept.keep_left(_Ray, _Budget(_left()), settings, "e1")
    up = _Budget()
    up.sent.update(_RECORDS)
    assert kept.take_back_kept(_Ray, up, settings).held == [] and _files(settings) == []


class _RayErrors(_Ray):
    from ray import exceptions


def _dies_in_leave(then: list) -> _Budget:
    """A controller whose ``leave`` answers each of ``then`` in turn (an error raised), and whose ping says dead
    for good once an ``ActorDiedError`` was raised (else it answers)."""
    from ray.exceptions import ActorDiedError

    b, asked = _Budget(), []

    def leave(wait):
        asked.append(wait)
        return then[min(len(asked), len(then)) - 1]
    b.leave, b.asked = _Method(leave), asked
    b.ping = _Method(lambda: ActorDiedError() if any(isinstance(x, ActorDiedError) for x in then) else "pong")
    return b


def test_a_controller_that_dies_in_the_stop_s_leave_is_asked_again_once_restarted_and_its_outbox_kept(tmp_path):
    """Its death was taken for the answer: nothing kept, the spend waiting for Redis counted by no ledger. Its
    successor reads the outbox back from Ray's store (``tests/integration/test_budget_stop_outbox.py``)."""
    from ray.exceptions import ActorUnavailableError

    settings = _settings(tmp_path)
    budget = _dies_in_leave([ActorUnavailableError("restarting", None), _left()])
    left = kept.keep_left(_RayErrors, budget, settings, "e1")
    assert len(budget.asked) == 2 and left["kept_in"] and len(_files(settings)) == 1, left


def test_a_controller_another_stop_killed_is_not_waited_for(tmp_path):
    """Dead for good (its ping says so): not asked again for the 10 s a restart may take; the other stop kept what
    it held."""
    from ray.exceptions import ActorDiedError

    budget = _dies_in_leave([ActorDiedError()])
    left = kept.keep_left(_RayErrors, budget, _settings(tmp_path), "e1")
    assert len(budget.asked) == 1 and left == {"error": "not asked: ActorDiedError"}, left
