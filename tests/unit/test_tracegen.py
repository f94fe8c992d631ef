import csv
import json
from collections import Counter

import pytest

from engine.core.errors import TraceError
from engine.core.trace import load_trace, write_trace
from engine.core.tracegen import from_azure, from_mooncake, synth


@pytest.mark.parametrize("name", ["azure_llm_2023_conv.csv", "azure_llm_2023_code.csv"])
def test_from_azure_keeps_tokens_and_arrivals(real_data, name):
    path = real_data / name
    rows = list(csv.DictReader(path.read_text().splitlines()))
    reqs = from_azure(path, seed=3)
    assert len(reqs) == len(rows)
    assert [r.input_tokens for r in reqs] == [int(x["ContextTokens"]) for x in rows]
    assert [r.output_tokens for r in reqs] == [int(x["GeneratedTokens"]) for x in rows]
    assert reqs[0].arrival_s == 0 and all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))
    # one hour of data, arrival gaps kept to the microsecond
    assert 3000 < reqs[-1].arrival_s < 3700
    assert from_azure(path, seed=3, limit=50) == reqs[:50]
    prios = Counter(r.priority for r in reqs)
    assert 0.05 < prios["urgent"] / len(reqs) < 0.15 and len({r.model for r in reqs}) == 5


def test_from_mooncake_keeps_hash_ids_as_prefix_blocks(real_data):
    path = real_data / "mooncake_conversation_trace.jsonl"
    raw = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    reqs = from_mooncake(path)
    assert len(reqs) == len(raw)
    by_id = {r.id: r for r in reqs}
    for i in (0, 1, 500, len(raw) - 1):
        r = by_id[f"mooncake_conversation_trace-{i}"]
        assert list(r.prefix_blocks) == raw[i]["hash_ids"]
        assert r.input_tokens == raw[i]["input_length"] and r.arrival_s == raw[i]["timestamp"] / 1000
    # a conversation's requests share a model, so their shared prefix can hit that model's cache
    by_head = {}
    for r in reqs:
        by_head.setdefault(r.prefix_blocks[:2], set()).add(r.model)
    assert all(len(m) == 1 for m in by_head.values())


def test_mooncake_synthetic_trace_and_forced_model(real_data):
    reqs = from_mooncake(real_data / "mooncake_synthetic_trace.jsonl", model="openai/gpt-5-mini", limit=300)
    assert len(reqs) == 300 and {r.model for r in reqs} == {"gpt-5-mini"}


def test_builders_are_seeded(real_data):
    p = real_data / "azure_llm_2023_code.csv"
    assert from_azure(p, seed=1, limit=200) == from_azure(p, seed=1, limit=200)
    assert from_azure(p, seed=1, limit=200) != from_azure(p, seed=2, limit=200)


def test_bad_model_option_is_explained(real_data):
    # A model named alone takes its provider (since stop 64; it was refused, "write it as provider/model").
    assert {r.provider for r in from_azure(real_data / "azure_llm_2023_code.csv", model="gpt-5", limit=3)} == {"openai"}
    with pytest.raises(TraceError, match="gpt-55.*did you mean"):
        from_azure(real_data / "azure_llm_2023_code.csv", model="gpt-55", limit=3)
    with pytest.raises(TraceError, match="openai/gpt-55"):
        from_azure(real_data / "azure_llm_2023_code.csv", model="openai/gpt-55", limit=3)


def test_synth_is_deterministic_and_mixed(tmp_path):
    a, b = synth(2000, seed=7), synth(2000, seed=7)
    assert a == b and a != synth(2000, seed=8)
    kinds = Counter(r.kind for r in a)
    assert set(kinds) == {"text", "image", "video"}
    assert {r.priority for r in a} == {"urgent", "normal", "background"}
    assert {r.reuse for r in a} == {"none", "exact", "near"}
    assert len({r.tenant for r in a}) >= 3
    assert any(r.provider == "modal-h100" for r in a)
    # re-submissions: identical content under a new id
    content = Counter((r.tenant, r.model, r.prompt, tuple(sorted(r.params.items()))) for r in a)
    assert sum(v - 1 for v in content.values()) > 100
    path = tmp_path / "s.jsonl"
    write_trace(a, path)
    assert load_trace(path).requests == sorted(a, key=lambda r: r.arrival_s)


def test_synth_draws_only_video_lengths_the_model_offers():
    """Seed 1 draws a sora-2 campaign of 5 s videos, a length OpenAI refuses: it is drawn as 4 s now."""
    reqs = synth(1000, seed=1)
    sora = {r.params["duration_s"] for r in reqs if r.model == "sora-2"}
    assert sora and sora <= {4, 8, 12}


@pytest.mark.parametrize("n,seed", [(2000, 0), (2000, 1)])
def test_synth_sends_text_to_every_text_provider(n, seed):
    """The demo's workload (2,000 requests, seed 0) drew no Anthropic campaign, so its 'real Anthropic calls'
    never happened. A workload with enough text campaigns now covers every provider of the text mix."""
    from engine.core.tracegen import TEXT_MIX

    reqs = synth(n, seed=seed, duration_s=600.0)
    text = Counter(r.provider for r in reqs if r.kind == "text")
    assert set(text) == {p for p, _, _ in TEXT_MIX}, text


def test_a_file_with_no_json_line_is_named_the_wrong_kind_once_not_per_line(tmp_path):
    """An Azure CSV given to ``from-mooncake`` was 20 "not valid JSON" lines and "... and 19347 more" (a new
    user's tour); it is one error now, naming the builder that reads it. A JSONL file with some bad lines still
    names each of them."""
    csv_file = tmp_path / "conv.csv"
    csv_file.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "2023-11-16 18:15:46,374,44\n" * 30)
    with pytest.raises(TraceError) as got:
        from_mooncake(csv_file)
    assert "trace from-azure" in str(got.value) and str(got.value).count("not valid JSON") == 0
    import gzip

    packed = tmp_path / "trace.jsonl.gz"  # not a CSV: its own reason stays
    packed.write_bytes(gzip.compress(b'{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}\n'))
    with pytest.raises(TraceError, match="gzip-compressed") as got:  # its lines' "not UTF-8" until stop 75
        from_mooncake(packed)
    assert "from-azure" not in str(got.value)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}\nnot json\n')
    with pytest.raises(TraceError, match="not valid JSON") as got:
        from_mooncake(mixed)
    assert "from-azure" not in str(got.value)
