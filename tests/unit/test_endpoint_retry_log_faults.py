"""The state directory's log of SDK tries (``_endpoint_retry_log``) against a reader of the directory, a start or
a stop that fails half way, and a hung fsync (stop 74, retrylog).

Before: its keys were an unsalted SHA-256 of the tenant, route and body, so anyone who can read the directory
could confirm a guessed short prompt; a start that failed after the log opened, or a shutdown step that raised,
skipped the log's close (its files left open); and a hung fsync (an NFS server gone) held the stop for good."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import json
import logging
import os
import stat
import threading

import pytest

from engine.app import _endpoint_retry_log as retry_log
from engine.app._endpoint_batches import FilesAndBatches
from engine.app._endpoint_retries import RETRY_COUNT, SdkRetries
from engine.app._endpoint_retry_log import KeptTries, RetryLog
from engine.app._endpoint_retry_secret import SECRET_BYTES, SECRET_FILE, state_secret
from engine.app._endpoint_state import EndpointState
from engine.app._endpoint_videos import VideoRoutes
from engine.app.endpoint import make_app
from tests.unit.test_endpoint import CAT, FakeEngine
from tests.unit.test_endpoint_videos import WAIT_S

KEY = SdkRetries.key("acme", "/v1/chat/completions", {"body": {"model": "gpt-5-mini", "messages": [
    {"role": "user", "content": "yes"}]}, "n": 1})  # a short prompt: a guess is cheap
SDK0, SDK1 = {RETRY_COUNT: "0"}, {RETRY_COUNT: "1"}


class Wall:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def ids():
    it = iter(f"req_{i}" for i in range(1000))
    return lambda: next(it)


def log_lines(root) -> list[dict]:
    return [json.loads(raw) for p in sorted(root.glob("retries-*.jsonl")) for raw in p.read_bytes().splitlines()
            if raw]


def logged_keys(root) -> set[str]:
    return {line.get("h", line.get("k")) for line in log_lines(root)} - {""}


def open_log_files(root) -> list[str]:
    """This process's descriptors open on the log's files under ``root``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with_name = os.path.join("/proc/self/fd", fd)
        try:
            target = os.readlink(with_name)
        except OSError:
            continue
        if target.startswith(str(root)) and os.path.basename(target).startswith("retries-"):
            out.append(target)
    return out


def one_life(root, wall: Wall, fresh, calls) -> KeptTries:
    tries = KeptTries(SdkRetries(clock=wall))
    tries.resume(root, wall)
    calls(tries)
    asyncio.run(tries.close())
    return tries


# -- 1. keyed by a secret of the state directory -------------------------------------------------------------------
def test_the_same_content_is_kept_under_other_keys_in_two_state_dirs_and_its_retry_after_a_restart_takes_it(
        tmp_path):
    wall, fresh = Wall(), ids()
    made: dict[str, str] = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        one_life(tmp_path / name, wall, fresh,
                 lambda t, name=name: made.__setitem__(name, t.request_id("acme", KEY, SDK0, fresh)))
    a, b = logged_keys(tmp_path / "a"), logged_keys(tmp_path / "b")
    assert len(a) == len(b) == 1 and a != b  # a guess hashed alone matches neither
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("retries-*.jsonl"))
    assert KEY.encode() not in raw
    # The same directory across a restart: the same secret, the same key, the retry takes its try's id.
    secret = (tmp_path / "a" / SECRET_FILE).read_bytes()
    wall.now += 5
    got = []
    one_life(tmp_path / "a", wall, fresh, lambda t: got.append(t.request_id("acme", KEY, SDK1, fresh)))
    assert got == [made["a"]]
    assert (tmp_path / "a" / SECRET_FILE).read_bytes() == secret and len(secret) == SECRET_BYTES
    assert stat.S_IMODE((tmp_path / "a" / SECRET_FILE).stat().st_mode) == 0o600


def test_the_secret_is_0600_even_opened_up_and_never_logged_nor_written_in_the_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    wall, fresh = Wall(), ids()
    tries = one_life(tmp_path, wall, fresh, lambda t: t.answered(KEY, t.request_id("acme", KEY, SDK0, fresh)))
    path = tmp_path / SECRET_FILE
    secret = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)  # a copy, a hand: read again, it is made 0600 again (logged)
    wall.now += 5
    one_life(tmp_path, wall, fresh, lambda t: None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == secret
    path.write_bytes(secret[:5])  # cut: set aside, a new one made (logged)
    one_life(tmp_path, wall, fresh, lambda t: None)
    assert (tmp_path / (SECRET_FILE + ".bad")).read_bytes() == secret[:5] and len(path.read_bytes()) == SECRET_BYTES
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "0600 again" in said and "set aside" in said
    for text in (secret.hex(), repr(secret), repr(secret[:5]), secret[:5].hex()):
        assert text not in said and text not in repr(tries) and text not in repr(tries.log)
    assert secret not in b"".join(p.read_bytes() for p in tmp_path.glob("retries-*.jsonl"))


def test_a_log_of_the_unkeyed_format_is_read_and_written_again_keyed(tmp_path, caplog):
    """The files an endpoint of stop 73 left: their tries are taken by their retries after the upgrade, and the
    plain hashes are gone from the disk at once (an idle endpoint never empties its files)."""
    caplog.set_level(logging.INFO)
    wall = Wall()
    window = int(wall.now // 120) % 2
    (tmp_path / f"retries-{window}.jsonl").write_bytes(
        f'{{"e":"try","t":"acme","k":"{KEY}","id":"req_old","at":{wall.now - 30}}}\n'
        f'{{"e":"answered","t":"","k":"{KEY}","id":"req_old","at":{wall.now - 29}}}\n'
        f'{{"e":"alive","t":"","k":"","id":"","at":{wall.now - 20}}}\n'.encode())
    got = []
    one_life(tmp_path, wall, ids(), lambda t: got.append(t.request_id("acme", KEY, SDK1, ids())))
    assert got == ["req_old"]
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("retries-*.jsonl"))
    assert KEY.encode() not in raw and b'"k"' not in raw
    assert sum("unkeyed hashes" in r.getMessage() for r in caplog.records) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no secret lost: there was none


# -- 2. closed on every way out of the endpoint's lifespan ----------------------------------------------------------
async def _a_life(app) -> None:
    async with app.router.lifespan_context(app):
        assert open_log_files(app.state.smartbatch.state.root)  # open while it serves


def test_a_start_that_fails_after_the_log_opened_closes_it_and_the_state_directory(tmp_path, monkeypatch):
    async def broken(self) -> None:
        raise RuntimeError("a record the start chokes on")

    monkeypatch.setattr(FilesAndBatches, "resume", broken)
    app = make_app(FakeEngine(), catalog=CAT, state_dir=tmp_path)
    with pytest.raises(RuntimeError, match="chokes on"):
        asyncio.run(_a_life(app))
    assert open_log_files(tmp_path) == []
    assert [line["e"] for line in log_lines(tmp_path)] == ["alive"]  # the close's own line
    monkeypatch.undo()
    asyncio.run(_a_life(make_app(FakeEngine(), catalog=CAT, state_dir=tmp_path)))  # the directory is free again


def test_a_shutdown_step_that_raises_still_closes_the_log_and_the_state_directory(tmp_path, monkeypatch):
    async def broken(self) -> None:
        raise RuntimeError("a video task that would not stop")

    monkeypatch.setattr(VideoRoutes, "shutdown", broken)
    with pytest.raises(RuntimeError, match="would not stop"):
        asyncio.run(_a_life(make_app(FakeEngine(), catalog=CAT, state_dir=tmp_path)))
    assert open_log_files(tmp_path) == []
    monkeypatch.undo()
    asyncio.run(_a_life(make_app(FakeEngine(), catalog=CAT, state_dir=tmp_path)))


# -- 3. a hung fsync does not hold the stop ------------------------------------------------------------------------
def test_a_hung_fsync_holds_the_close_no_longer_than_its_bound_and_the_files_close_once_it_returns(tmp_path,
                                                                                                 monkeypatch,
                                                                                                 caplog):
    caplog.set_level(logging.ERROR)
    entered, release = threading.Event(), threading.Event()
    real = os.fsync

    def hung(fd: int) -> None:  # an NFS server gone: the call returns when the test says
        entered.set()
        assert release.wait(WAIT_S)
        real(fd)

    async def go() -> RetryLog:
        log = RetryLog(tmp_path, Wall(), close_wait_s=0.2)
        log.open()
        monkeypatch.setattr(retry_log.os, "fsync", hung)
        try:
            log.note("try", "acme", "k", "req_0")  # its fsync goes to the worker, and hangs there
            assert await asyncio.to_thread(entered.wait, WAIT_S)
            await asyncio.wait_for(log.close(), WAIT_S)  # on the code before: never returned
            assert open_log_files(tmp_path), "closed under the fsync, or before it returned"
        finally:
            release.set()
        return log

    log = asyncio.run(go())
    said = [r.getMessage() for r in caplog.records if "has not returned" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "retries-") in said[0]
    log._worker.join(WAIT_S)  # once the fsync returns the worker closes the files and ends
    assert not log._worker.is_alive() and open_log_files(tmp_path) == []


# -- 4. found by a review of the above (revlog) ----------------------------------------------------------------------
def test_a_state_dir_on_a_filesystem_without_hard_links_still_keeps_the_tries_for_their_retries(tmp_path,
                                                                                               monkeypatch):
    """An SMB share or a FUSE mount answers ``link`` with EPERM: the secret could not be made, so the log was off
    and a retry after a restart paid again (where stop 73's log kept it); the batches' inputs there are copied."""
    def no_links(src, dst, **_) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", no_links)
    wall, fresh = Wall(), ids()
    made = []
    tries = one_life(tmp_path, wall, fresh, lambda t: made.append(t.request_id("acme", KEY, SDK0, fresh)))
    assert tries.log.write_errors == 0 and len((tmp_path / SECRET_FILE).read_bytes()) == SECRET_BYTES
    assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".tmp-*"))
    wall.now += 5
    got = []
    one_life(tmp_path, wall, fresh, lambda t: got.append(t.request_id("acme", KEY, SDK1, fresh)))
    assert got == made


def test_a_lost_secret_beside_a_keyed_log_is_said_once_not_lost_in_silence(tmp_path, caplog):
    """A secret deleted, or left out of a copy of the directory (it is 0600): a new one was made and every try
    kept went unanswered by its retry, paid again, with no word of why (a cut one was said)."""
    caplog.set_level(logging.INFO)
    wall, fresh = Wall(), ids()
    one_life(tmp_path, wall, fresh, lambda t: t.request_id("acme", KEY, SDK0, fresh))
    wall.now += 5
    one_life(tmp_path, wall, fresh, lambda t: None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a plain restart says nothing
    (tmp_path / SECRET_FILE).unlink()
    wall.now += 5
    one_life(tmp_path, wall, fresh, lambda t: None)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1 and SECRET_FILE in said[0] and "not taken by their retries" in said[0]
    one_life(tmp_path, wall, fresh, lambda t: None)  # said once: the next start has the new secret
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_a_call_makes_its_key_once_and_a_call_of_no_sdk_none_and_the_keys_are_hmacs_of_the_secret(tmp_path,
                                                                                                   monkeypatch):
    """Each SDK call keyed its content again at its answer, and a call of no SDK (curl, a client of its own)
    twice for nothing: two HMACs of 3.4 us on the loop per call for one, or none (``bench_retry_log.py``)."""
    made = []
    real = RetryLog.keyed

    def counted(self, key: str) -> str:
        made.append(key)
        return real(self, key)

    monkeypatch.setattr(RetryLog, "keyed", counted)
    wall, fresh = Wall(), ids()
    keys = [SdkRetries.key("acme", "/v1/chat/completions", {"body": {"i": i}}) for i in range(4)]

    def calls(t: KeptTries) -> None:
        for key in keys[:2]:  # an SDK's first try answered, then one refused
            t.answered(key, t.request_id("acme", key, SDK0, fresh))
        t.refused(keys[1], t.request_id("acme", keys[1], SDK1, fresh))
        for key in keys[2:]:  # no retry count: not an SDK's, remembered by nothing
            t.answered(key, t.request_id("acme", key, {}, fresh))
            t.refused(key, t.request_id("acme", key, {}, fresh))

    tries = one_life(tmp_path, wall, fresh, calls)
    assert made == [keys[0], keys[1], keys[1]]
    secret = (tmp_path / SECRET_FILE).read_bytes()
    want = {hmac.new(secret, k.encode(), hashlib.sha256).hexdigest() for k in keys[:2]}
    assert logged_keys(tmp_path) == want and {tries.log.keyed(k) for k in keys[:2]} == want
    kinds = [(line["e"], line["h"]) for line in log_lines(tmp_path) if line["e"] != "alive"]
    k0, k1 = (tries.log.keyed(k) for k in keys[:2])
    assert kinds == [("try", k0), ("answered", k0), ("try", k1), ("answered", k1), ("try", k1), ("refused", k1)]


def test_the_temporary_files_of_the_state_dirs_root_are_swept_by_its_lock_holder_not_by_a_maker_of_the_secret(
        tmp_path):
    """A kill in the rewrite of a log of stop 73 (``write_atomic``) or in the ledger id's write left its temporary
    file in the root for good (only files/, batches/ and videos/ were swept); and each maker of the secret swept
    the root's ``.tmp-retries-secret-*``, another maker's file under way among them, whose link then failed."""
    (tmp_path / ".tmp-retries-secret-other").write_bytes(b"another maker's, not yet linked")
    state_secret(tmp_path)
    assert (tmp_path / ".tmp-retries-secret-other").exists()
    (tmp_path / ".tmp-abc123").write_bytes(b'{"e":"try"}\n' * 1000)  # a rewrite cut by a kill
    EndpointState(tmp_path).close()
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_close_of_a_file_that_reports_an_error_ends_the_stop_at_once_and_closes_the_other(tmp_path, monkeypatch,
                                                                                          caplog):
    """``close`` reports a write-back's EIO (the descriptor is released all the same): raised in the log's thread,
    it ended the thread before the other file's close and the stop's wake-up, so the stop waited its whole bound
    and then said an fsync had not returned, when none hung."""
    caplog.set_level(logging.ERROR)
    real = os.close

    async def go() -> RetryLog:
        log = RetryLog(tmp_path, Wall(), close_wait_s=5.0)
        log.open()
        first = log._fds[0]

        def eio(fd: int) -> None:
            real(fd)
            if fd == first:
                raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(retry_log.os, "close", eio)
        log.note("try", "acme", "k", "req_0")
        await log.close()
        log._worker.join(WAIT_S)
        return log

    log = asyncio.run(asyncio.wait_for(go(), 4.0))  # on the code before: the close waited its bound, 5 s
    monkeypatch.undo()
    assert not log._worker.is_alive() and open_log_files(tmp_path) == [] and log.write_errors == 1
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "has not returned" in m] and any("Input/output error" in m for m in said)


def test_a_state_dir_whose_directory_cannot_be_fsynced_still_keeps_the_tries(tmp_path, monkeypatch):
    """Some mounts (SMB on older kernels) answer a directory's fsync with EINVAL: the secret's name could not be
    made durable, the log was off, and a retry after a restart paid again. A file's fsync still counts."""
    real = os.fsync

    def no_dir_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", no_dir_fsync)
    wall, fresh = Wall(), ids()
    made = []
    tries = one_life(tmp_path, wall, fresh, lambda t: made.append(t.request_id("acme", KEY, SDK0, fresh)))
    assert tries.log.write_errors == 0
    wall.now += 5
    got = []
    one_life(tmp_path, wall, fresh, lambda t: got.append(t.request_id("acme", KEY, SDK1, fresh)))
    assert got == made
