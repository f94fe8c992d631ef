"""Two drivers of one engine on Ray agree whose a response id is (``actors._hub_owners``): each kept its own
record, and the second driver let tenant globex continue a conversation the first driver had answered to acme."""

import secrets

import pytest

from engine import Engine
from engine.core.catalog import default_catalog
from engine.core.errors import RequestError
from engine.core.result import Result


def _responses_catalog():
    """OpenAI alone (the one provider called: an engine starts no dispatcher of the others), with gpt-5-mini called
    through its Responses API (a catalog overlay's ``api``)."""
    cat = default_catalog()
    openai = cat.providers["openai"]
    spec = openai.models["gpt-5-mini"].model_copy(update={"api": "responses"})
    return cat.model_copy(update={"providers": {"openai": openai.model_copy(
        update={"models": {**openai.models, "gpt-5-mini": spec}})}})


def _turn(rid: str, tenant: str, previous: str) -> dict:
    return {"id": rid, "tenant": tenant, "model": "gpt-5-mini", "priority": "urgent", "deadline_s": 30,
            "body": {"input": "What did I tell you?", "previous_response_id": previous}}


def test_a_second_driver_refuses_an_id_the_engine_answered_to_another_tenant(ray_session):
    name = f"owners-{secrets.token_hex(3)}"
    with Engine.start(catalog=_responses_catalog(), name=name, speedup=100) as first:
        second = Engine.connect(name)
        try:
            # A called answer, as a dispatcher hands it to the hub (the simulated providers carry no raw body).
            raw = {"object": "response", "id": "resp_live", "status": "completed", "output": []}
            ray_session.get(first._h["hubs"][0].push.remote(
                [Result(id="told", tenant="acme", status="ok", raw=raw, real=True, output="ok")]))
            with pytest.raises(RequestError, match="body.previous_response_id"):
                second.submit(_turn("g1", "globex", "resp_live"))
            assert second.owner_asks == 1
            own = second.submit(_turn("a1", "acme", "resp_live"))  # known now: no second ask
            assert own.result(timeout=60).status == "ok" and second.owner_asks == 1
        finally:
            second.stop()
