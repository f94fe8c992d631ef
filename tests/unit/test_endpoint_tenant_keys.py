"""Keys bound to tenants (``make_app(tenant_keys=...)``, ``smartbatch serve --http-tenant-key TENANT=VAR``): a
tenant key acts for its tenant alone, as an OpenAI project key acts for its project. Before, the tenant was the
caller's word (``X-Smartbatch-Tenant``): anyone holding the endpoint's one key named any tenant, read its files,
batches and videos, and spent against its budgets."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import urllib.parse

import anthropic
import openai
import pytest

from engine.app import endpoint
from engine.app.endpoint import make_app
from engine.core.errors import ConfigError
from tests.unit.test_endpoint import CAT, FakeEngine, batch_line, chat, serving, upload, wait_done
from tests.unit.test_endpoint_msgbatches import ClaudeEngine, ask, ended

ADMIN, ACME_KEY, GLOBEX_KEY = "sk-operator", "sk-acme-1", "sk-globex-1"
KEYS = {hashlib.sha256(k.encode()).hexdigest(): t for k, t in ((ACME_KEY, "acme"), (GLOBEX_KEY, "globex"))}
TENANT = endpoint.HEADER_TENANT


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _status(url: str, *headers: tuple[str, str]) -> int:
    """The status of a GET of ``url`` with ``headers``, a name given twice sent twice (a dict cannot)."""
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    try:
        conn.putrequest("GET", where.path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        with conn.getresponse() as got:
            got.read()
            return got.status
    finally:
        conn.close()


def test_a_tenant_key_acts_for_its_tenant_alone_with_the_openai_sdk():
    eng = FakeEngine()
    with serving(make_app(eng, catalog=CAT, api_key_sha256=_sha(ADMIN), tenant_keys=KEYS)) as url, \
            contextlib.ExitStack() as clients:
        def client(key: str, tenant: str | None = None) -> openai.OpenAI:  # sends Authorization: Bearer <key>
            return clients.enter_context(openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=10,
                                                       default_headers={TENANT: tenant} if tenant else None))

        acme, globex = client(ACME_KEY), client(GLOBEX_KEY)
        # Without the header, a tenant key's call is its tenant's: the request, the file and the batch.
        chat(acme, extra_headers={endpoint.HEADER_REQUEST_ID: "q-acme"}).parse()
        assert eng.seen["q-acme"]["tenant"] == "acme"
        f = upload(acme, [batch_line("a", "acme's secret prompt")])
        done = wait_done(acme, acme.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                   completion_window="24h").id)
        mine = {f.id, done.output_file_id}
        assert mine <= {x.id for x in acme.files.list()}
        assert mine <= {x.id for x in client(ACME_KEY, "acme").files.list()}  # naming its own tenant is fine
        assert mine <= {x.id for x in client(ADMIN, "acme").files.list()}  # the operator's key names any tenant
        assert not mine & {x.id for x in client(ADMIN).files.list()}  # and without the header is 'default'
        # Naming another tenant with a tenant key is a 403 that names the header and the key's tenant.
        for call in (lambda c: c.files.list(), lambda c: c.files.content(f.id), lambda c: chat(c)):
            with pytest.raises(openai.PermissionDeniedError) as caught:
                call(client(ACME_KEY, "globex"))
            err = caught.value.body
            assert err["param"] == TENANT and err["code"] == "permission_denied", err
            assert "'globex'" in err["message"] and "tenant 'acme'" in err["message"], err
        line = f"{done.id}/a"  # the batch's line, as the endpoint submits it
        assert eng.seen[line]["tenant"] == "acme"
        assert eng.submitted == ["q-acme", line]  # nothing refused reached the engine
        # Another tenant's key sees nothing of acme's, and cannot name acme either.
        assert not mine & {x.id for x in globex.files.list()}
        with pytest.raises(openai.NotFoundError):
            globex.files.content(f.id)
        with pytest.raises(openai.PermissionDeniedError):
            client(GLOBEX_KEY, "acme").files.content(f.id)
        # The header given twice cannot slip another tenant past the check (routes read the first one).
        for pair in (["acme", "globex"], ["globex", "acme"]):
            assert _status(url + "/files", ("Authorization", f"Bearer {ACME_KEY}"), *((TENANT, t) for t in pair)) == 403
        # A key that is none of them is a 401, as before.
        with pytest.raises(openai.AuthenticationError) as bad:
            client("sk-acme-2").files.list()
        assert bad.value.code == "invalid_api_key" and "--http-tenant-key" in bad.value.message


def test_a_tenant_key_acts_for_its_tenant_alone_with_the_anthropic_sdk():
    """No operator key, tenant keys only: a call without one of them is a 401. The Anthropic SDK sends its
    ``api_key`` as ``x-api-key`` and its ``auth_token`` as ``Authorization: Bearer``: both are taken."""
    eng = ClaudeEngine()
    try:
        with serving(make_app(eng, catalog=CAT, cancel_wait_s=5.0, tenant_keys=KEYS)) as url, \
                contextlib.ExitStack() as clients:
            def client(tenant: str | None = None, **auth) -> anthropic.Anthropic:
                return clients.enter_context(anthropic.Anthropic(
                    base_url=url.removesuffix("/v1"), max_retries=0, timeout=10,
                    default_headers={TENANT: tenant} if tenant else None, **auth))

            acme, globex = client(api_key=ACME_KEY), client(api_key=GLOBEX_KEY)
            made = ended(acme, acme.messages.batches.create(requests=[ask("a", "acme's secret")]).id)
            assert [b.id for b in client(auth_token=ACME_KEY).messages.batches.list()] == [made.id]
            assert made.id not in {b.id for b in globex.messages.batches.list()}
            with pytest.raises(anthropic.NotFoundError):
                globex.messages.batches.retrieve(made.id)
            for other in (client("globex", api_key=ACME_KEY), client("globex", auth_token=ACME_KEY)):
                with pytest.raises(anthropic.PermissionDeniedError) as caught:
                    other.messages.batches.list()
                err = caught.value.body["error"]
                assert err["type"] == "permission_error" and TENANT in err["message"], err
                assert "tenant 'acme'" in err["message"], err
            for wrong in (client(api_key=ADMIN), client(auth_token="sk-nobody")):
                with pytest.raises(anthropic.AuthenticationError):
                    wrong.messages.batches.list()
            assert _status(url + "/messages/batches", ("anthropic-version", "2023-06-01")) == 401  # no key at all
            assert eng.submitted == [f"{made.id}/a"] and eng.seen[f"{made.id}/a"]["tenant"] == "acme"
    finally:
        eng.release()


@pytest.mark.parametrize(("keys", "admin", "says"), [
    ({_sha(ADMIN): "acme"}, _sha(ADMIN), "also api_key_sha256"),
    ({_sha(ACME_KEY): " acme"}, None, "space"),
    ({_sha(ACME_KEY): "東京"}, None, "Latin-1"),
    ({_sha(ACME_KEY): ""}, None, "tenant ''"),
    ({"not-hex": "acme"}, None, "hex SHA-256"),
    ({_sha(ACME_KEY)[:32]: "acme"}, None, "hex SHA-256"),
], ids=["the-operators-key", "space-at-an-end", "not-latin-1", "empty", "not-hex", "short-digest"])
def test_a_bad_tenant_key_entry_is_refused_naming_it(keys, admin, says):
    with pytest.raises(ConfigError, match="tenant_keys") as caught:
        make_app(FakeEngine(), catalog=CAT, api_key_sha256=admin, tenant_keys=keys)
    assert says in str(caught.value)
    assert not any(d in str(caught.value) for d in keys)  # a digest stands for a key: not quoted


def test_the_served_endpoint_takes_the_keys_serve_gives_it(monkeypatch):
    """``start_endpoint`` (what ``smartbatch serve`` calls) hands the digests to the replica, which builds the app
    from them; a bad entry is refused before Serve starts, not in the replica's log. No Ray here."""
    from engine.app import serve_http
    from engine.app.driver import Engine

    eng = FakeEngine()
    monkeypatch.setattr(Engine, "connect", classmethod(lambda cls, name: eng))
    with pytest.raises(ConfigError, match="tenant_keys"):
        serve_http.start_endpoint("prod", port=0, tenant_keys={"not-hex": "acme"})
    replica = serve_http._builder("prod", _sha(ADMIN), None, KEYS)  # as Serve calls it, in the replica
    with serving(replica()) as url, openai.OpenAI(base_url=url, api_key=ACME_KEY, max_retries=0, timeout=10) as acme:
        chat(acme, extra_headers={endpoint.HEADER_REQUEST_ID: "q-served"}).parse()
        assert eng.seen["q-served"]["tenant"] == "acme"
        with pytest.raises(openai.PermissionDeniedError):
            chat(acme, extra_headers={TENANT: "globex"})
