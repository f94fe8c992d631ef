"""Successors of retired models: the catalog's ``successor``, and ``smartbatch trace ... --current-models``.

A trace built with the seeded mix named models the providers had shut down (gpt-image-1, claude-sonnet-4-5,
sora-2, veo-3-fast on 2026-12-06): run against the real APIs, its requests for them were refused.
"""

from __future__ import annotations

import datetime
import json

import pytest
from typer.testing import CliRunner

from engine.app.cli import app
from engine.core.catalog import default_catalog, load_catalog
from engine.core.errors import CatalogError, TraceError
from engine.core.trace import load_trace
from engine.core.tracegen import drawn_models, from_azure, synth

CAT = default_catalog()
DAY = datetime.date(2026, 12, 6)
LATER = datetime.date(2026, 12, 12)  # gpt-5 and gpt-5-mini shut down on the 11th
runner = CliRunner()


def _models(path) -> set[str]:
    return {r.model for r in load_trace(path).requests}


def _gone(models: set[str], day: datetime.date) -> set[str]:
    return {m for m in models if (d := CAT.find_model(m)[1].shutdown) is not None and d <= day}


@pytest.mark.parametrize("provider, model, successor", [
    ("openai", "gpt-5-mini", "gpt-5.4-mini"), ("openai", "gpt-5", "gpt-5.4"), ("openai", "gpt-image-1", "gpt-image-2"),
    ("anthropic", "claude-sonnet-4-5", "claude-sonnet-5-5"), ("google", "veo-3", "veo-3.1-generate-001"),
    ("google", "veo-3-fast", "veo-3.1-fast-generate-001"), ("openai", "sora-2", None), ("openai", "sora-2-pro", None)])
def test_each_retired_model_names_its_successor_of_the_same_kind_or_none(provider, model, successor):
    spec = CAT.model(provider, model)
    assert spec.shutdown is not None and spec.successor == successor
    if successor is not None:
        assert CAT.model(provider, successor).kind == spec.kind and CAT.model(provider, successor).shutdown is None
    # written as the successor from its shutdown day on, as itself the day before
    assert CAT.current(provider, model, spec.shutdown) == (successor or model)
    assert CAT.current(provider, model, spec.shutdown - datetime.timedelta(days=1)) == model


def test_a_chain_of_successors_is_followed_to_a_model_still_served(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("providers:\n  openai:\n    models:\n      gpt-5.4-mini: {shutdown: 2026-12-20, "
                       "successor: gpt-6-luna}\n")
    cat = load_catalog(None, overlay)
    assert cat.current("openai", "gpt-5-mini", datetime.date(2026, 12, 19)) == "gpt-5.4-mini"
    assert cat.current("openai", "gpt-5-mini", datetime.date(2026, 12, 20)) == "gpt-6-luna"


@pytest.mark.parametrize("line, said", [
    ("gpt-5: {successor: gpt-55}", "successor 'gpt-55' is not a text model of this provider"),
    ("gpt-image-1: {successor: gpt-5.4}", "successor 'gpt-5.4' is not a image model of this provider"),
    ("gpt-5.4: {successor: gpt-5}", "successors loop (gpt-5 -> gpt-5.4 -> gpt-5)"),
])
def test_a_successor_of_another_provider_or_kind_or_a_loop_is_refused_naming_the_field(tmp_path, line, said):
    overlay = tmp_path / "o.yaml"
    overlay.write_text(f"providers:\n  openai:\n    models:\n      {line}\n")
    with pytest.raises(CatalogError, match="providers.openai") as exc:
        load_catalog(None, overlay)
    assert said in str(exc.value)
    overlay.write_text("providers:\n  openai:\n    models:\n      gpt-5: {successor: claude-sonnet-5-5}\n")
    with pytest.raises(CatalogError, match="not a text model of this provider; name one of: gpt-5-mini"):
        load_catalog(None, overlay)  # Anthropic's model: a row keeps its provider, so it is no successor here


def test_the_builders_write_the_mix_as_before_unless_given_a_day():
    assert synth(300, seed=5) == synth(300, seed=5, today=None)
    old = synth(3000, seed=1)
    assert _gone({r.model for r in old}, DAY)  # the mix names retired models (the benchmarks run on it)
    new = synth(3000, seed=1, today=LATER)
    assert not _gone({r.model for r in new}, LATER)
    assert {"gpt-5.4", "gpt-5.4-mini", "claude-sonnet-5-5", "gpt-image-2",
            "veo-3.1-fast-generate-001"} <= {r.model for r in new}
    assert len(new) == len(old) == 3000  # (a successor's own draws, e.g. Veo 3.1's three resolutions, move the rest)
    # Veo 3.1 makes 1080p and 4k at 8 s only: the lengths drawn are the nearest it makes at the resolution
    spec = CAT.model("google", "veo-3.1-fast-generate-001")
    for r in new:
        if r.model == "veo-3.1-fast-generate-001":
            allowed = (spec.durations_at or {}).get(r.params["resolution"], spec.durations_s)
            assert r.params["duration_s"] in allowed


def test_from_azure_writes_the_successors_of_the_text_mix(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{i:02d}.0000000,{100 + i},{20 + i}\n" for i in range(60)))
    before = from_azure(csv, seed=2)
    after = from_azure(csv, seed=2, today=LATER)
    assert [r.model for r in after] == [CAT.current(r.provider, r.model, LATER) for r in before]
    assert {"gpt-5-mini", "gpt-5"} <= {r.model for r in before} and not _gone({r.model for r in after}, LATER)
    assert {r.model for r in from_azure(csv, model="gpt-5", today=LATER)} == {"gpt-5.4"}


def test_the_cli_says_which_written_models_are_shut_down_and_the_flag_writes_their_successors(tmp_path):
    out = tmp_path / "t.jsonl"
    r = runner.invoke(app, ["trace", "synth", "--n", "3000", "--seed", "1", "--today", "2026-12-06", "--out", str(out)])
    assert r.exit_code == 0, r.output
    gone = sorted(_gone(_models(out), DAY))
    assert gone == ["claude-sonnet-4-5", "sora-2", "veo-3-fast"]
    said = " ".join(r.output.split())  # the console wraps long lines
    assert ("the trace names models shut down by 2026-12-06: claude-sonnet-4-5 (2026-11-30), sora-2 (2026-09-24), "
            "veo-3-fast (2026-06-30);") in said and "--current-models" in said

    r = runner.invoke(app, ["trace", "synth", "--n", "3000", "--seed", "1", "--today", "2026-12-12",
                            "--current-models", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert not _gone(_models(out), LATER)
    said = " ".join(r.output.split())
    assert ("models shut down by 2026-12-12 written as their successors: claude-sonnet-4-5 -> claude-sonnet-5-5, "
            "gpt-5 -> gpt-5.4, gpt-5-mini -> gpt-5.4-mini") in said and "the trace names" not in said
    assert "veo-3-fast -> veo-3.1-fast-generate-001; left out of the draws, having none: sora-2" in said


def test_the_cli_flag_reaches_the_real_data_builders(tmp_path):
    csv, jsonl, out = tmp_path / "a.csv", tmp_path / "m.jsonl", tmp_path / "t.jsonl"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{i:02d}.0000000,{100 + i},{20 + i}\n" for i in range(60)))
    jsonl.write_text("".join(json.dumps({"timestamp": i * 10, "input_length": 600, "output_length": 30,
                                         "hash_ids": [i, i + 1]}) + "\n" for i in range(60)))
    for cmd, src in (("from-azure", csv), ("from-mooncake", jsonl)):
        r = runner.invoke(app, ["trace", cmd, str(src), "--out", str(out), "--today", "2026-12-12"])
        assert r.exit_code == 0 and "--current-models" in r.output and _gone(_models(out), LATER), r.output
        r = runner.invoke(app, ["trace", cmd, str(src), "--out", str(out), "--today", "2026-12-12", "--current-models"])
        assert r.exit_code == 0 and not _gone(_models(out), LATER), r.output
    r = runner.invoke(app, ["trace", "synth", "--n", "5", "--out", str(out), "--today", "6 Dec"])
    assert r.exit_code != 0 and "--today" in r.output


def test_the_media_mixes_draw_only_models_with_a_successor_or_still_served():
    # sora-2 has no successor: under a day it is left out of synth's draws, not written as a model refused
    assert ("openai", "sora-2") in drawn_models(media=True) and ("openai", "sora-2") not in drawn_models()
    reqs = synth(3000, seed=1, today=DAY)
    assert "sora-2" not in {r.model for r in reqs} and "sora-2" in {r.model for r in synth(3000, seed=1)}


def test_a_catalog_whose_every_video_model_is_retired_with_no_successor_is_refused_naming_the_flag(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("providers:\n  google:\n    models:\n      veo-3-fast: {successor: null}\n"
                       "  modal-h100:\n    models:\n      wan-2.1-t2v: {shutdown: 2026-01-01}\n")
    cat = load_catalog(None, overlay)
    synth(3000, seed=1, catalog=cat)  # written as drawn without a day
    with pytest.raises(TraceError, match="--current-models.*no successor: name one in a catalog overlay"):
        synth(3000, seed=1, catalog=cat, today=DAY)


@pytest.mark.parametrize("current", [False, True])
def test_the_cli_names_the_written_models_that_shut_down_within_30_days_and_the_day_that_moves_them(tmp_path,
                                                                                                    current):
    """A new user's tour (stop 81): `trace synth --current-models` on 2026-12-07, the README's way to a trace for
    the real APIs, wrote 494 of 2,000 requests for gpt-5 and gpt-5-mini, which shut down four days later, without a
    word (the run's start names them, at the provider's own address only, and only once the trace is made)."""
    out = tmp_path / "t.jsonl"
    r = runner.invoke(app, ["trace", "synth", "--n", "2000", "--seed", "1", "--today", "2026-12-07", "--out", str(out),
                            *(["--current-models"] if current else [])])
    assert r.exit_code == 0, r.output
    assert {"gpt-5", "gpt-5-mini"} <= _models(out)
    said = " ".join(r.output.split())
    assert ("the trace names models that shut down within 30 days: gpt-5 (2026-12-11, in 4 days; successor: gpt-5.4), "
            "gpt-5-mini (2026-12-11, in 4 days; successor: gpt-5.4-mini); from that day their providers refuse them. "
            "--current-models --today 2026-12-11 writes their successors") in said, said


def test_a_model_with_no_successor_shutting_down_within_30_days_is_not_offered_a_today_that_moves_it(tmp_path):
    """Review of stop 81's line: gpt-4o-mini (shut down 2027-01-14, no successor) in a trace built on 2026-12-20 was
    told "--current-models --today 2027-01-14 writes their successors"; that build writes gpt-4o-mini still and
    says it has no successor. The line now names it as having none, with the overlay that gives it one."""
    csv = tmp_path / "a.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,12,3\n2023-11-16 18:15:47.1,20,3\n")
    out = tmp_path / "t.jsonl"
    r = runner.invoke(app, ["trace", "from-azure", str(csv), "--model", "openai/gpt-4o-mini", "--today", "2026-12-20",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert ("gpt-4o-mini (2027-01-14, in 25 days; no successor); from that day their providers refuse them. name a "
            "successor in a catalog overlay for one that has none") in said, said
    assert "--today" not in said, said
    r = runner.invoke(app, ["trace", "from-azure", str(csv), "--model", "openai/gpt-4o-mini", "--today", "2027-01-14",
                            "--current-models", "--out", str(out)])
    assert r.exit_code == 0 and _models(out) == {"gpt-4o-mini"}  # the --today it was offered moves nothing
