"""Keys never in what a user sees or a record keeps: a provider's error echoing a credential, and an exception's
words that an engine's failure carries to a result (mask83).

A provider's error answer (a 401 quoting the key, a 500 echoing the request's ``Authorization`` header) is masked
where it enters the engine, the provider's ``_redact``; the words of an exception that reaches the driver through Ray
(a ``RayTaskError``: the actor's traceback and its exception's words) are masked where they enter a result
(``engine.core._logkeys.words``). No Ray: the emulator on loopback, and the driver's recovery driven on a stand-in.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest

from actors.providers.anthropic_http import AnthropicProvider
from actors.providers.openai_http import OpenAIProvider
from engine.app.provider_setup import http_setup
from engine.core._logkeys import redact, url_secrets, words
from engine.core.clock import ScaledClock
from engine.core.provider_api import Secret
from engine.emulator import Emulator
from tests.unit.test_http_providers import CAT, ROUTE, SPEED, http_settings, job_of, req

KEY = "plainkey-NEVERSHOWN-4242"  # no key's shape: masked by value alone
USER, PASSWORD = "proxyuser", "PROXY-NEVERSHOWN-77"  # a proxy's credentials, set in the endpoint's base_url
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRETS = (KEY, PASSWORD, BASIC)


@pytest.fixture
def emu():
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as e:
        yield e


def _with_credentials(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{USER}:{PASSWORD}@{rest}"


def _provider(emu: Emulator, name: str, credentials: bool):
    s = http_settings(emu, http=(name,))
    ep = s.providers.endpoints[name]
    if credentials:  # the key set by settings: the base URL's user part, which the SDK sends as Basic
        ep = ep.model_copy(update={"base_url": _with_credentials(ep.base_url)})
    cat, _ = http_setup(emu.catalog, s, need_keys=False)
    cls = AnthropicProvider if name == "anthropic" else OpenAIProvider
    return cls(name, cat, s, ep, Secret(KEY), ScaledClock(time.time(), SPEED))


# (status, what the answer says), each quoting the key the call was sent with
KEY_ECHOES = {
    "401 quoting the key": (401, f"Incorrect API key provided: {KEY}"),
    "500 echoing the bearer header": (500, f"upstream failed; request headers: Authorization: Bearer {KEY}"),
}


@pytest.mark.parametrize("name", ["openai", "anthropic"])
@pytest.mark.parametrize("echo", list(KEY_ECHOES))
def test_a_providers_error_echoing_its_key_shows_none_of_it(emu, name, echo):
    """A sync call's failed outcome, its words the provider's, holds no key (masked by value: it has no key's
    shape). Passes before and after: the emulator's end-to-end twin of the next test."""
    status, said = KEY_ECHOES[echo]
    emu.faults.script(name, ROUTE[name], [{"status": status, "message": said}])

    async def go():
        p = _provider(emu, name, credentials=False)
        try:
            return await p.call(job_of(req(0, name)))
        finally:
            await p.close()

    out = asyncio.run(go())
    assert not out.ok and f"HTTP {status}" in out.error and "[redacted]" in out.error, out.error
    assert KEY not in out.error, out.error


# What a proxy at a base URL holding credentials may answer (the SDKs send them as ``Authorization: Basic``, in the
# key's place), each quoting them
CREDENTIAL_ECHOES = {
    "the basic header": f"upstream failed; request headers: Authorization: Basic {BASIC}",
    "the basic value alone": f"proxy refused credentials {BASIC!r}",
    "the base url": f"could not reach http://{USER}:{PASSWORD}@10.0.0.7:4000/v1",
}


@pytest.mark.parametrize("name", ["openai", "anthropic"])
@pytest.mark.parametrize("echo", list(CREDENTIAL_ECHOES))
def test_a_providers_error_echoing_its_base_urls_credentials_shows_none_of_them(emu, name, echo):
    """The key set in the settings' base URL: a 500 quoting it, as the SDK raises it, is a failed outcome whose
    words hold none of it. Before, the provider masked its key by value and the key shapes alone: the Basic value
    and the URL's password were shown whole."""
    import httpx2

    p = _provider(emu, name, credentials=True)
    body = {"error": {"message": CREDENTIAL_ECHOES[echo], "type": "api_error"}}
    request = httpx2.Request("POST", f"{p.endpoint.base_url}/x")
    exc = p._sdk.InternalServerError(CREDENTIAL_ECHOES[echo], response=httpx2.Response(500, request=request,
                                                                                        json=body), body=body)
    out = p._error(exc, p._sdk.APIStatusError, p._sdk.APITimeoutError)
    assert not out.ok and f"HTTP 500: {CREDENTIAL_ECHOES[echo][:12]}" in out.error, out.error
    assert not [s for s in SECRETS if s in out.error], out.error


def test_a_base_urls_credentials_are_the_secrets_an_http_client_makes_of_them():
    assert url_secrets(None) == [] and url_secrets("http://127.0.0.1:8000/v1") == []
    assert url_secrets(f"https://{USER}:{PASSWORD}@proxy/v1") == [PASSWORD, BASIC]
    assert url_secrets("https://sk-as-user@proxy/v1") == ["sk-as-user", base64.b64encode(b"sk-as-user:").decode()]
    escaped = url_secrets("https://u:p%2Fw@proxy/v1")  # as written, and as sent (unescaped)
    assert escaped[:2] == ["p%2Fw", "p/w"] and escaped[2] == base64.b64encode(b"u:p/w").decode()
    assert redact(f"auth {BASIC} for {PASSWORD}", url_secrets(f"http://{USER}:{PASSWORD}@h")) == \
        "auth [redacted] for [redacted]"


class _Raising(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words")


def test_an_exceptions_words_are_masked_for_a_user():
    ray_like = RuntimeError("ray::Ingest.submit() (pid=1)\n  File x, line 2\nValueError: upstream said "
                            "Authorization: Bearer abc-token-123 at https://u:pw-9@h/v1?key=AIza" + "x" * 35)
    said = words(ray_like)
    assert "abc-token-123" not in said and "pw-9" not in said and "AIza" not in said
    assert said.startswith("ray::Ingest.submit() (pid=1)") and said.count("[redacted]") == 2
    assert words(_Raising()) == "<_Raising: its words could not be read>"


class _Readmitting:
    """A stand-in for the driver's re-admission (``engine.app._driver_readmit``): what it failed, and why."""

    def __init__(self) -> None:
        self.failed: list[tuple[list[str], str]] = []
        self._waited: dict[str, float] = {}
        self._died_with: dict[str, int] = {}

    def _forget_waits(self, uids: Any) -> None:
        pass

    def _fail_ids(self, uids: list[str], error: str) -> None:
        self.failed.append((uids, error))


def test_a_request_failed_on_ingests_error_carries_none_of_its_keys():
    """Ingest's error reaches the driver as Ray's ``RayTaskError``: the actor's traceback and its exception's words,
    which quote what the actor was given. Failed after its last try, a request's error quoted them whole before."""
    from engine.app._driver_readmit import READMIT_TRIES, Readmitting

    exc = RuntimeError(f"ray::Ingest.submit()\nConnectionError: redis://:{PASSWORD}@10.0.0.9:6379/0 refused; "
                       f"x-api-key: {KEY}")
    d = _Readmitting()
    assert Readmitting._one_more_try(d, ["r1"], READMIT_TRIES - 1, exc) is None
    (uids, error), = d.failed
    assert uids == ["r1"] and error.startswith(f"ingest failed {READMIT_TRIES} times: ray::Ingest.submit()")
    assert KEY not in error and PASSWORD not in error, error


class _Asking:
    """A stand-in grouper for ``Parking._ask``: its budget actor's call raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.catalog, self.reserve_model_max, self._claim_prefix = CAT, False, "g0"
        self._claims, self._unsure_claims = iter(range(10)), []

        async def call(*args: Any) -> Any:
            raise exc

        self.budget = type("Budget", (), {"call": staticmethod(call)})()


def test_a_verdict_on_the_budget_actors_failure_carries_none_of_its_keys():
    """The budget actor's failure reaches a grouper as Ray's ``RayTaskError``; the verdict's detail, which the
    request's result quotes when it ends unreserved, quoted its words whole before (a Redis URL's password)."""
    from actors._grouper_park import Parking
    from actors._types import BatchJob, Job

    exc = RuntimeError(f"ray::BudgetController.reserve_many()\nConnectionError: redis://:{PASSWORD}@10.0.0.9/0; "
                       f"Authorization: Bearer {KEY}")
    j = Job(0, req(0), "fp-0")
    verdicts = asyncio.run(Parking._ask(_Asking(exc), [(BatchJob("b", "sync", None, False, "t", "t", [j]), j)],
                                        0.0, []))
    (_, v), = verdicts
    assert not v.ok and v.reason == "budget_unavailable"
    assert v.detail.startswith("the budget actor failed (RuntimeError: ray::BudgetController.reserve_many()")
    assert KEY not in v.detail and PASSWORD not in v.detail, v.detail


class _Failing:
    """A stand-in engine whose results' stream raises ``exc`` (the engine went away, Ray's error in hand)."""

    gone = None

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def as_completed(self, futs: Any) -> Any:
        raise self.exc
        yield  # (an async generator, as the engine's)


def test_an_endpoints_batch_or_video_failed_on_the_engines_error_carries_none_of_its_keys():
    """What the endpoint writes when the engine gave no result (a batch's error lines, a video's failed state:
    a caller reads them, the state directory keeps them) quoted the exception's words whole before."""
    from types import SimpleNamespace

    from engine.app._endpoint_batches import FilesAndBatches
    from engine.app._endpoint_videos import VideoRoutes

    exc = RuntimeError(f"ray::Hub.pull()\nValueError: upstream said x-api-key: {KEY} via "
                       f"https://{USER}:{PASSWORD}@proxy/v1")
    finished: list[str] = []
    batches = SimpleNamespace(engine=_Failing(exc), state=None, _finish=lambda job, why: finished.append(why))
    asyncio.run(FilesAndBatches._collect(batches, SimpleNamespace(futures={}, status="in_progress")))
    video = SimpleNamespace(req=req(0), result=None, completed_at=None)
    videos = SimpleNamespace(engine=_Failing(exc), state=None, _now=lambda: 0.0)
    asyncio.run(VideoRoutes._collect(videos, video, []))
    said = [*finished, video.result.error]
    assert all(s.startswith("the engine gave no result: RuntimeError: ray::Hub.pull()") for s in said), said
    assert not [s for s in said if KEY in s or PASSWORD in s], said


def test_a_videos_content_address_holds_no_base_url_credentials(emu):
    """A made video's result names its content address, under the provider's base URL: with the credentials of a
    base URL that holds some, it put them in the result (the journal, the endpoint's state, a caller's answer
    keep it). The address is now the bare one, and a fetch takes it, and an earlier record's with them, as its
    provider's (rvmask83)."""
    import openai

    p = _provider(emu, "openai", credentials=True)
    job = job_of(req(0, "openai"))
    out = p._videos._made(job, openai.types.Video.model_construct(id="video_1"), False)
    bare = http_settings(emu, http=("openai",)).providers.endpoints["openai"].base_url.rstrip("/")
    assert out.ok and out.output == f"{bare}/videos/video_1/content", out.output
    assert USER not in out.output and PASSWORD not in out.output

    async def fetch(*urls: str):
        try:
            return [await p.video_content(url, "video") for url in urls]
        finally:
            await p.close()

    for code, body, _ in asyncio.run(fetch(out.output, f"{str(p.client.base_url).rstrip('/')}/videos/video_1/content")):
        # the emulator refuses the Basic credentials (a 401): the address was taken as its provider's
        assert code == 401 and not [s for s in SECRETS if s in str(body)], (code, body)


class _Client:
    """An SDK client at a base URL holding credentials, whose every call raises ``exc`` (a proxy's answer)."""

    def __init__(self, exc: BaseException) -> None:
        from types import SimpleNamespace

        self.base_url = _with_credentials("http://10.0.0.7:4000/v1/")
        self.timeout = SimpleNamespace(connect=5.0)
        self.exc = exc
        self.videos = SimpleNamespace(download_content=self._raise)

    async def _raise(self, *a: Any, **kw: Any) -> Any:
        raise self.exc

    post = _raise


@pytest.mark.parametrize("echo", list(CREDENTIAL_ECHOES))
@pytest.mark.parametrize("route", ["count_tokens", "video content"])
def test_the_count_and_content_routes_show_no_base_url_credentials(echo, route):
    """The endpoint's count_tokens and video content routes pass a provider's error on to the caller, masked by
    the key alone before: a proxy's 500 echoing its Basic value, or the password of the base URL, was shown to
    the caller whole (rvmask83)."""
    import anthropic
    import httpx2
    import openai

    from actors.providers._anthropic_count import count_at
    from actors.providers._video_content import content_at

    sdk = anthropic if route == "count_tokens" else openai
    body = {"type": "error", "error": {"message": CREDENTIAL_ECHOES[echo], "type": "api_error"}}
    response = httpx2.Response(500, request=httpx2.Request("GET", "http://10.0.0.7:4000/v1/x"), json=body)
    client = _Client(sdk.InternalServerError(CREDENTIAL_ECHOES[echo], response=response, body=body))
    if route == "count_tokens":
        code, said, _ = asyncio.run(count_at(client, sdk, Secret(KEY), {}, 1.0))
    else:
        code, said, _ = asyncio.run(content_at(client, sdk, Secret(KEY), f"{client.base_url}videos/video_1/content",
                                               "video", 1.0))
    assert code == 500 and CREDENTIAL_ECHOES[echo][:12] in str(said), said
    assert not [s for s in SECRETS if s in str(said)], said


class _RayTaskError(Exception):
    """Ray's error of a failed actor call, as the driver meets it: its words the actor's traceback and its
    exception's, ``cause`` the exception."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"ray::BudgetController.budget_specs() (pid=7)\n  File x, line 3\n"
                         f"{type(cause).__name__}: {cause}")
        self.cause = cause


def test_a_budget_change_the_budget_actor_failed_raises_none_of_its_keys():
    """``Engine.set_budget`` (and ``budgets``, ``remove_budget``) raised Ray's error of another's exception to the
    caller as Ray made it: the caller's own logger, which the project does not mask, printed its words whole. A
    ``SmartbatchError`` naming the call now, its words masked; the project's own errors raised as they were
    (rvmask83)."""
    from types import SimpleNamespace

    from engine.app._driver_budgets import LiveBudgeting
    from engine.core.errors import ConfigError, SmartbatchError

    class Driver(LiveBudgeting):
        def __init__(self, cause: BaseException) -> None:
            def get(ref: Any, timeout: float | None = None) -> Any:
                raise _RayTaskError(cause)

            errors = SimpleNamespace(RayTaskError=_RayTaskError, ActorUnavailableError=type("U", (Exception,), {}),
                                     GetTimeoutError=type("T", (Exception,), {}))
            self._ray = SimpleNamespace(exceptions=errors, get=get)
            budget = SimpleNamespace(budget_specs=SimpleNamespace(remote=lambda *a: None))
            self._h, self._running, self.name = {"budget": budget}, True, "prod"

    leak = RuntimeError(f"upstream said Authorization: Bearer {KEY} at redis://:{PASSWORD}@10.0.0.9/0")
    with pytest.raises(SmartbatchError) as caught:
        Driver(leak).set_budget(tenant="acme", budget_duration="1d", max_budget=1.0)
    said = str(caught.value)
    assert said.startswith("engine 'prod': its budget actor failed (budget_specs): ray::BudgetController"), said
    assert "RuntimeError: upstream said" in said and KEY not in said and PASSWORD not in said, said
    ours = ConfigError("budget.model = 'x': not in the catalog")
    with pytest.raises(ConfigError) as caught:
        Driver(ours).set_budget(model="x", max_budget=1.0)
    assert caught.value is ours


def test_a_log_line_cut_short_is_masked_before_the_cut(emu, caplog):
    """A refused batch's upload that could not be deleted logs the SDK's words cut at 200 characters. They were cut,
    then masked by value: a key that no shape names (``KEY``) straddling the cut was no longer the whole key, and
    its first part was logged (fails on the code before: "plainkey-NEVERS" in the line)."""

    async def go():
        p = _provider(emu, "openai", credentials=False)
        async def refuse(file_id):  # the key from the 186th character: its first 15 before the old cut
            raise RuntimeError("x" * 185 + f"{KEY} (the key the call was sent with)")

        p.client.files.delete = refuse
        try:
            with caplog.at_level("WARNING"):
                await p._delete_upload("file-1")
        finally:
            await p.close()

    asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if "could not be deleted" in r.getMessage()]
    assert len(lines) == 1, caplog.records
    assert KEY[:8] not in lines[0], lines[0]
