"""Defects a helper's tour of the README and docs found, each pinned by the test that failed before its fix."""

from __future__ import annotations

import asyncio
import os

from actors._file_journal import FileJournal, engine_dirs
from engine.core.settings import Settings


def test_a_journaled_batch_of_a_simulated_provider_is_not_a_batch_to_take_back(tmp_path):
    """`smartbatch run traces/conv.jsonl --providers http ...` (the README's trace: Gemini stays simulated) with
    SMARTBATCH_JOURNAL__DIR set, killed and run again: the start refused with "google is not called over HTTP in
    this run (its endpoint, or the catalog, changed since): give it its endpoint again", every time, though google
    never had one; the only way on was to remove the directory and pay again for what the killed run's real
    batches finished. A batch the simulator ran billed nothing: there is nothing to read back."""
    from actors._types import Job
    from actors.providers.simulated import _Handle
    from engine.app._batch_rescue import pending, rescue
    from engine.core.catalog import default_catalog
    from engine.core.request import Request

    job = Job(0, Request.model_validate({"id": "g0", "arrival_s": 0.0, "model": "gemini-2.5-flash",
                                         "input_tokens": 10, "output_tokens": 5}), "fp")

    async def go():
        j = FileJournal(tmp_path, "e@1")
        await j.put("batches:google", "k", ("batch", [job], 0.0, 0, _Handle([], None), None))
        os.close(j._lock)
    asyncio.run(go())
    got = rescue(tmp_path, Settings(), default_catalog(), {}, say=lambda m: None)
    assert got.results == {} and got.batches == 0  # nothing read, nothing billed twice
    assert pending(tmp_path) == (0, 0, 0) and not engine_dirs(tmp_path)


def _req(**d):
    from engine.core.request import Request, validation_context

    return Request.model_validate({"id": "q", "arrival_s": 0.0, "deadline_s": 600, **d}, context=validation_context())


def test_a_body_that_names_its_model_is_the_same_request_to_the_cache():
    """The README's three ways in share one cache, but a driver's chat request (``model`` beside ``messages``) and
    the same call through the endpoint or a batch file (``model`` inside the body, as OpenAI's are) had two
    fingerprints: the second was sent and paid again (the emulator billed the same body twice). ``body.model``
    must equal ``model``, which the key holds already, and the engine sets it on the wire."""
    from engine.core.features import fingerprint, near_class

    msgs = [{"role": "user", "content": "Hello there"}]
    driver = _req(model="gpt-5-mini", messages=msgs, seed=5)
    endpoint = _req(model="gpt-5-mini", body={"model": "gpt-5-mini", "messages": msgs, "seed": 5})
    assert fingerprint(driver) == fingerprint(endpoint)
    assert near_class(driver, "t") == near_class(endpoint, "t")
    assert fingerprint(_req(model="gpt-5-mini", prompt="Hi")) == fingerprint(
        _req(model="gpt-5-mini", prompt="Hi", body={"model": "gpt-5-mini"}))
    # Still apart: another model, another setting.
    assert fingerprint(_req(model="gpt-4o-mini", body={"model": "gpt-4o-mini", "messages": msgs,
                                                       "seed": 5})) != fingerprint(endpoint)
    assert fingerprint(_req(model="gpt-5-mini", messages=msgs, seed=7)) != fingerprint(driver)


def test_a_journal_dir_that_cannot_be_a_directory_is_a_config_error_naming_the_setting(tmp_path):
    """SMARTBATCH_JOURNAL__DIR naming a file (or a place that cannot be written) with real providers: `smartbatch
    run` said "FileExistsError: ... (unexpected, so a bug in smartbatch ...)" and exited 1."""
    import pytest

    from engine.app._driver_resume import take_back
    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError

    a_file = tmp_path / "jobs.txt"
    a_file.write_text("not a directory")
    settings = Settings(providers={"mode": "http"}, journal={"dir": str(a_file)})
    with pytest.raises(ConfigError, match="journal.dir") as err:
        take_back(settings, default_catalog(), {}, speedup=1.0)
    assert "SMARTBATCH_JOURNAL__DIR" in str(err.value)
    assert a_file.read_text() == "not a directory"


def test_a_clean_simulated_run_on_a_journal_dir_does_not_block_a_later_real_run_on_it(tmp_path, monkeypatch):
    """SMARTBATCH_JOURNAL__DIR exported, a `smartbatch run` with simulated providers ends cleanly and leaves its
    dispatchers' journal (take-back is off without real providers); the next run with --providers http on the
    same directory refused to start: "4 provider batch(es) of the earlier run could not be read ('_Handle' object
    has no attribute 'id')", a simulated batch read as a real one at the now real openai."""
    from actors._types import Job
    from actors.providers.simulated import _Handle
    from engine.app._batch_rescue import rescue
    from engine.core.catalog import default_catalog
    from engine.core.request import Request

    job = Job(0, Request.model_validate({"id": "r0", "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": 10,
                                         "output_tokens": 5}), "fp")

    async def go():
        j = FileJournal(tmp_path, "e@1")
        await j.put("batches:openai", "k", ("batch", [job], 0.0, 0, _Handle([], None), None))
        await j.delete("batches:openai", ["k"])  # ended: archived
        os.close(j._lock)
    asyncio.run(go())
    from engine.app.provider_setup import http_setup

    monkeypatch.setenv("OPENAI_API_KEY", "x")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "x")
    settings = Settings(providers={"mode": "http"})
    plan, keys = http_setup(default_catalog(), settings)
    got = rescue(tmp_path, settings, plan, keys, say=lambda m: None)
    assert got.results == {} and got.batches == 0 and not engine_dirs(tmp_path)
