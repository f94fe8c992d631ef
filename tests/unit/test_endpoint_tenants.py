"""Tenants sharing one endpoint (``X-Smartbatch-Tenant``): each sees only the files, batches, Message Batches and
videos it made, as OpenAI scopes them to the project that made them. Before, every caller listed, read, cancelled
and deleted every tenant's objects: a ``for f in client.files.list(): client.files.delete(f.id)`` of one
application emptied the others' files, and any tenant read another's batch output (a helper's hunt)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from engine.app import endpoint
from engine.app.endpoint import make_app
from engine.emulator import Emulator
from tests.unit.test_endpoint import CAT, FakeEngine, batch_line, serving, upload, wait_done
from tests.unit.test_endpoint_msgbatches import ClaudeEngine, ask, claude_endpoint, ended
from tests.unit.test_endpoint_videos import SPEED, WAIT_S, VideoEngine, until_ended

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning",
                                        "ignore:The Sora API is scheduled:DeprecationWarning")
ACME, GLOBEX = {endpoint.HEADER_TENANT: "acme"}, {endpoint.HEADER_TENANT: "globex"}


def as_tenant(client, headers: dict):
    """The same SDK client, every call sent as the tenant of ``headers`` ({}: no header, tenant 'default')."""
    return client.with_options(default_headers=headers)


def refused(call, *args, **kw) -> None:
    """``call`` answers another tenant's object as one that does not exist: a 404, as for an unknown id."""
    with pytest.raises((openai.NotFoundError, anthropic.NotFoundError)):
        call(*args, **kw)


def test_files_and_batches_are_seen_only_by_the_tenant_that_made_them(tmp_path):
    eng = FakeEngine()
    with serving(make_app(eng, catalog=CAT, state_dir=tmp_path)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        acme, globex, anyone = as_tenant(client, ACME), as_tenant(client, GLOBEX), as_tenant(client, {})
        f = upload(acme, [batch_line("a", "acme's secret prompt")])
        done = wait_done(acme, acme.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                   completion_window="24h").id)
        held = acme.batches.create(input_file_id=upload(acme, [batch_line("x-slow", "more")]).id,
                                   endpoint="/v1/chat/completions", completion_window="24h")
        acme_files = {f.id, done.output_file_id}
        for other in (globex, anyone):
            assert not acme_files & {x.id for x in other.files.list()}
            assert not {done.id, held.id} & {b.id for b in other.batches.list()}
            for fid in acme_files:
                refused(other.files.retrieve, fid)
                refused(other.files.content, fid)
                refused(other.files.delete, fid)
            for bid in (done.id, held.id):
                refused(other.batches.retrieve, bid)
                refused(other.get, f"/batches/{bid}/smartbatch_report", cast_to=object)
            refused(other.batches.cancel, held.id)
            # a batch of another tenant's file would read its prompts back in its own output
            with pytest.raises(openai.NotFoundError) as caught:
                other.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            assert caught.value.body["param"] == "input_file_id"
        assert acme.batches.retrieve(held.id).status == "in_progress"  # no other tenant's cancel reached it
        assert acme_files <= {x.id for x in acme.files.list()}
        assert {done.id, held.id} <= {b.id for b in acme.batches.list()}
        (line,) = map(json.loads, acme.files.content(done.output_file_id).text.splitlines())
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: acme's secret prompt"
        eng.release()
        wait_done(acme, held.id)
    # Kept so on disk: a restarted endpoint knows whose each file is.
    with serving(make_app(FakeEngine(), catalog=CAT, state_dir=tmp_path)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        assert acme_files <= {x.id for x in as_tenant(client, ACME).files.list()}
        assert not acme_files & {x.id for x in as_tenant(client, GLOBEX).files.list()}
        refused(as_tenant(client, GLOBEX).files.content, f.id)
        refused(as_tenant(client, GLOBEX).batches.retrieve, done.id)


def test_message_batches_are_seen_only_by_the_tenant_that_made_them():
    with claude_endpoint(ClaudeEngine()) as (_, client):
        acme, globex, anyone = (client.with_options(default_headers=h) for h in (ACME, GLOBEX, {}))
        done = ended(acme, acme.messages.batches.create(requests=[ask("a", "acme's secret")]).id)
        held = acme.messages.batches.create(requests=[ask("x-slow")])
        for other in (globex, anyone):
            assert not {done.id, held.id} & {b.id for b in other.messages.batches.list()}
            for bid in (done.id, held.id):
                refused(other.messages.batches.retrieve, bid)
                refused(other.messages.batches.cancel, bid)
                refused(other.messages.batches.delete, bid)
            refused(lambda: list(other.messages.batches.results(done.id)))
        (got,) = acme.messages.batches.results(done.id)
        assert got.result.message.content[0].text == "echo: acme's secret"
        assert acme.messages.batches.retrieve(held.id).processing_status == "in_progress"
        assert [b.id for b in acme.messages.batches.list()] == [held.id, done.id]


def test_videos_are_seen_only_by_the_tenant_that_made_them():
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = VideoEngine(emu)
        try:
            with serving(make_app(eng, catalog=CAT)) as url, \
                    openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S) as client:
                acme, globex, anyone = as_tenant(client, ACME), as_tenant(client, GLOBEX), as_tenant(client, {})
                made = acme.videos.create(model="sora-2", prompt="acme's secret heron", seconds="4")
                until_ended(acme, made.id)
                for other in (globex, anyone):
                    assert made.id not in {v.id for v in other.videos.list()}
                    for call in (other.videos.retrieve, other.videos.download_content, other.videos.delete):
                        refused(call, made.id)
                assert [v.id for v in acme.videos.list()] == [made.id]
                assert acme.videos.retrieve(made.id).status == "completed"
                assert acme.videos.download_content(made.id).content
        finally:
            eng.close()


def test_files_kept_before_files_had_a_tenant_go_to_their_batchs_tenant_or_default(tmp_path):
    """A state directory of an earlier version keeps no file's tenant: a batch's output is its batch's (acme's
    batch read its output after the upgrade), an upload the default tenant's."""
    with serving(make_app(FakeEngine(), catalog=CAT, state_dir=tmp_path)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        acme = as_tenant(client, ACME)
        f = upload(acme, [batch_line("a", "one")])
        done = wait_done(acme, acme.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                   completion_window="24h").id)
    for meta in (tmp_path / "files").glob("*.json"):  # as the earlier version wrote them
        rec = json.loads(meta.read_text())
        del rec["tenant"]
        meta.write_text(json.dumps(rec))
    with serving(make_app(FakeEngine(), catalog=CAT, state_dir=tmp_path)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        assert "echo: one" in as_tenant(client, ACME).files.content(done.output_file_id).text
        assert [x.id for x in client.files.list()] == [f.id]


def test_a_list_after_another_tenants_deleted_video_is_refused_as_an_unknown_id():
    """``after`` naming a deleted video resumes the list where it was (the SDK's loop that deletes what it
    lists); named by another tenant, it answered a page where an unknown id is a 400: whether that tenant had
    made, and deleted, a video of that id showed through (a review)."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = VideoEngine(emu)
        try:
            with serving(make_app(eng, catalog=CAT)) as url, \
                    openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S) as client:
                acme, globex = as_tenant(client, ACME), as_tenant(client, GLOBEX)
                gone = acme.videos.create(model="sora-2", prompt="acme's heron", seconds="4")
                kept = globex.videos.create(model="sora-2", prompt="globex's crane", seconds="4")
                for who, vid in ((acme, gone.id), (globex, kept.id)):
                    until_ended(who, vid)
                acme.videos.delete(gone.id)
                assert [v.id for v in acme.videos.list(after=gone.id)] == []  # its own: resumed, as before
                for after in (gone.id, "video_nonesuch"):
                    with pytest.raises(openai.BadRequestError) as caught:
                        globex.videos.list(after=after)
                    assert caught.value.body["param"] == "after"
                    assert caught.value.body["message"] == f"after {after!r} is not an id of this list; pass " \
                                                           "the last id of the previous page"
        finally:
            eng.close()
