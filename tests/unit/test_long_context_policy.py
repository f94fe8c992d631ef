"""Gemini 2.5 Pro past 200k prompt tokens bills the whole call at $2.50 / $15 a million (the catalog's
``long_context``): the smart policy's list prices and the fair queue's weighed such a prompt at $1.25 / $10."""

from __future__ import annotations

import pytest

from engine.core.catalog import default_catalog
from engine.core.draws import Draws
from engine.core.grouping import Group
from engine.core.request import Request
from engine.core.settings import Settings
from engine.runtime.providers import SimProvider, Work
from policies._text import text_consts

CAT = default_catalog()
PROV = CAT.providers["google"]
SPEC = PROV.models["gemini-2.5-pro"]


def req(i: int, inputs: int) -> Request:
    return Request.model_validate({"id": f"g{i}", "arrival_s": 0.0, "provider": "google", "model": "gemini-2.5-pro",
                                   "input_tokens": inputs, "output_tokens": 1_000, "deadline_s": 86400.0})


def test_the_fair_queue_weighs_a_long_prompt_at_its_tier():
    sim = SimProvider(PROV, CAT, Settings(), Draws(0, 4, 0, 60.0), draw=False)
    sim.enqueue(Work("sync", "x", [req(0, 300_000)], [0], [0]))
    (q,) = [q for q in sim.queues.values() if len(q)]
    assert q.peek(0.0)[2].cost_usd == pytest.approx(300_000 * 2.50e-6 + 1_000 * 15e-6)


def test_the_policys_list_price_of_a_group_takes_each_member_at_its_tier():
    g = Group(("batch", (), 0), PROV, SPEC)
    for i, n in enumerate((300_000, 100_000, 250_000)):
        g.add(req(i, n))
    c = text_consts(PROV, SPEC)
    tokens = g.input_tokens, g.output_tokens, g.long_input_tokens, g.long_output_tokens
    want = 550_000 * 2.50e-6 + 2_000 * 15e-6 + 100_000 * 1.25e-6 + 1_000 * 10e-6
    assert c.list_usd(*tokens) == pytest.approx(want)
    g.take(1)  # the aggregates follow the members out
    assert (g.long_input_tokens, g.long_output_tokens) == (250_000, 1_000)
    assert c.list_usd(100_000, 1_000) == pytest.approx(100_000 * 1.25e-6 + 1_000 * 10e-6)
