"""A tenant with a space at an end ("acme ") was taken as another tenant than "acme": a budget for acme did not
cover it and its spend was reported apart (a new user's walkthrough, stop 79). Refused now, naming the field and
the name to write; a request rebuilt from a journaled uid (written before the upgrade) keeps its tenant."""

from __future__ import annotations

import pytest

from engine.core._checks import tenant_problem
from engine.core.errors import RequestError
from engine.core.request import Request
from engine.core.trace import TraceError, parse_trace_lines

LINE = {"id": "a", "arrival_s": 0.0, "model": "gpt-5.4-mini", "prompt": "hi"}


@pytest.mark.parametrize("tenant", ["acme ", " acme", "acme\u00a0", "acme\u3000"])
def test_a_tenant_with_a_space_at_an_end_is_refused_naming_the_name_to_write(tenant):
    with pytest.raises(RequestError) as ei:
        Request(**LINE, tenant=tenant)
    said = str(ei.value)
    assert ei.value.field == "tenant" and "begins or ends with a space" in said and "write 'acme'" in said, said
    assert "begins or ends with a space" in (tenant_problem(tenant) or "")  # a CLI flag's, a header's tenant


def test_a_tenant_of_spaces_alone_is_told_to_give_a_name():
    with pytest.raises(RequestError, match="give a name"):
        Request(**LINE, tenant="  ")


def test_a_tenant_with_an_inner_space_is_a_name_as_before():
    assert Request(**LINE, tenant="acme corp").tenant == "acme corp"
    assert tenant_problem("acme corp") is None


def test_a_trace_line_with_such_a_tenant_is_refused_by_its_line():
    with pytest.raises(TraceError, match="tenant.*begins or ends with a space"):
        parse_trace_lines(['{"id": "a", "arrival_s": 0, "model": "gpt-5.4-mini", "prompt": "hi", "tenant": "acme "}',
                           '{"id": "b", "arrival_s": 0, "model": "gpt-5.4-mini", "prompt": "hi", "tenant": "acme"}'])


def test_a_member_journaled_under_such_a_tenant_before_the_upgrade_is_rebuilt_with_its_tenant_and_call_key():
    # A batch member known by its journaled uid alone (a stray): refused, its line went unread and uncounted.
    from actors._batch_strays import stand_in
    from engine.core.provider_api import call_key
    from engine.core.request import validation_context

    uid = "5:acme /r1"
    cj = stand_in(uid, "openai", "gpt-5.4-mini", 0, 3, 0.0, validation_context())
    assert (cj.req.tenant, cj.req.id, cj.req.uid) == ("acme ", "r1", uid)
    assert cj.key == call_key("acme ", "r1", "gpt-5.4-mini", 0)
