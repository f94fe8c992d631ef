"""A loopback emulator of the providers' HTTP APIs: the test double the engine's HTTP providers run against.

It is a real HTTP server (stdlib ``ThreadingHTTPServer``) on 127.0.0.1 that speaks the OpenAI and Anthropic
wire formats, so the official SDK clients work against it unchanged given a ``base_url``::

    with Emulator(latency_scale=0, speedup=1e4) as emu:
        oai = openai.OpenAI(base_url=emu.base_url("openai"), api_key="k", max_retries=0)
        ant = anthropic.Anthropic(base_url=emu.anthropic_base_url("anthropic"), api_key="k",
                                  default_headers={"X-Api-Key": "k", "Authorization": anthropic.Omit()})
        ...
        emu.bill()          # what it billed, priced by engine.core.cost

Conventions of this test double
-------------------------------
Paths. Every catalog provider is served under its catalog name, with both route families:
``/<provider>/v1/chat/completions``, ``/v1/responses``, ``/v1/images/generations``, ``/v1/videos``,
``/v1/videos/{id}`` (GET, DELETE), ``/v1/videos/{id}/content`` (OpenAI's Videos API, ``_videos``), ``/v1/files``,
``/v1/files/{id}`` (GET, DELETE), ``/v1/files/{id}/content``, ``/v1/batches``, ``/v1/batches/{id}``,
``/v1/batches/{id}/cancel`` (OpenAI format: ``Authorization: Bearer <key>``, ``x-request-id``) and
``/<provider>/v1/messages``, ``/v1/messages/count_tokens`` (the input tokens ``/v1/messages`` bills for the same
body, free), ``/v1/messages/batches``, ``.../{id}``, ``.../{id}/cancel``, ``.../{id}/results`` (Anthropic format:
``x-api-key: <key>`` alone, as Anthropic reads an API key: a call without it, a Bearer header or not, is
Anthropic's 401 ``authentication_error`` "x-api-key header is required"; ``request-id``), and Google's Veo
routes ``/<provider>/v1beta/models/{model}:predictLongRunning``, ``/v1beta/models/{model}/operations/{id}``,
``/v1beta/files/{id}:download`` (``x-goog-api-key: <key>`` or ``?key=``; Google's error object; ``_veo``), and
Google's native Batch API with inline requests, for the image models the catalog batches there
(``/v1beta/models/{model}:batchGenerateContent``, ``/v1beta/batches``, ``/v1beta/batches/{id}``,
``/v1beta/batches/{id}:cancel``; ``_gemini_batch``).
A missing key is a 401 in the family's error shape; any non-empty key passes and is never kept or echoed.
Prices, cache rules and batch timings come from the provider's catalog entry, whatever the wire format.
Control: ``GET /_emulator/bill``, ``GET /_emulator/calls``, ``GET /_emulator/counts``, ``POST /_emulator/faults``
(``FaultPlan.configure``). Records are bounded (``keep_records``: the latest call records, billed items and
Idempotency-Key answers, each answer at least an emulator hour); the bill's totals and the counts cover every call.

Fields. A top-level body field a route does not take is a 400 in its API's words (``_fields``): chat completions'
"Unrecognized request argument supplied: foo", the other OpenAI routes' "Unknown parameter: 'foo'.", Anthropic's
"foo: Extra inputs are not permitted". Each route's fields are the installed SDKs' typed params
(``engine.core._sdk_fields``), and the emulator plays OpenAI's own API for every provider without a ``compat``.

Tokens. Prompt tokens = ``ceil(chars / 4)`` of the prompt text: the system prompt the provider adds for tool
use (the catalog's ``tool_prompt``, Anthropic's, as text of its tokens, when tools are given), tool definitions
(canonical JSON, if any), then system / instructions, then every message's text (text blocks of block lists), concatenated in that
order, each input image standing in that order as text of its tokens by the model's ``image_input`` rule
(``engine.core.body_tokens``). This is the engine's own estimate (``chars_per_token = 4``).

Output. Natural length N = the last ``[[emulator:output_tokens=N]]`` in the last user message, else
``default_output_tokens``; output tokens = min(the cap asked, N), the cap being ``max_completion_tokens`` /
``max_tokens`` (chat), ``max_output_tokens`` (Responses), ``max_tokens`` (Anthropic, required) or the
model's maximum. The text is exactly ``4 * output_tokens`` characters: ``[emulator <sha256(prompt)[:16]>]``
then filler (``filler_text``), so it counts back to the same tokens and differs between prompts.
finish_reason ``length``/``stop`` (Anthropic stop_reason ``max_tokens``/``end_turn``). A ``tool_choice`` that
forces a call (``"required"`` or a named function; Anthropic ``{"type": "any"}`` or a named tool) adds one call
of that tool (else the first listed) after the text (finish_reason ``tool_calls``, stop_reason ``tool_use``; a
Responses ``function_call`` item). At Anthropic the forced call is the whole answer, as the API gives it (no text
before a forced call); a custom tool needs an object ``input_schema``, and each ``tool_use`` needs its
``tool_result`` in the next turn (400s as the API's, ``_anthropic_tools``).

Structured outputs (``_schema``). A forced call's arguments and the answer to a ``json_schema`` format (chat's
``response_format``, Responses' ``text.format``, Anthropic's ``output_config.format``) are compact JSON valid against
the schema: required properties only, an enum's first value, numbers inside their bounds, one array item (or
``minItems``), the non-null branch of a nullable, ``$ref`` resolved; the first free-form string starts with the
prompt's digest. A ``json_schema`` answer with a free-form string is ``4 * output_tokens`` characters as the lorem
text is; without one, as long as its JSON (output tokens ``ceil(chars / 4)``). The arguments are the shortest
instance, billed as output beside the text; past the cap the JSON is cut there.

Prompt cache, per model, on the catalog's terms for it (``ProviderSpec.cache_of``: its provider's ``prompt_cache`` and its own):
automatic providers cache every prefix of every prompt for ``ttl_s``; a call reads the longest warm prefix,
rounded down to ``block_tokens``, if it reaches the minimum (``usage.prompt_tokens_details.cached_tokens``).
Explicit providers cache only prefixes ending at a ``cache_control: {"type": "ephemeral"}`` block (tools,
system blocks, message blocks): a call reads the longest warm one (refreshing it) and writes up to its last
breakpoint beyond that if that prefix reaches the minimum (``cache_read_input_tokens`` /
``cache_creation_input_tokens``; ``input_tokens`` is the rest).

Flex tier. ``service_tier: "flex"`` on chat completions or Responses, for a model of the catalog's ``flex`` block: the
call reads and writes the prompt cache as a standard one, takes ``flex.slowdown`` times as long, is billed at flex
prices (mode ``flex``) and answers ``service_tier: "flex"``; for another model, a 400 naming ``service_tier``.
``refuse_flex`` in the fault plan refuses the next flex calls with 429 "Resource Unavailable", billed nothing.

Billing. Each successful call, each succeeded batch member (once, mode ``batch_api``) and each completed video
job (once, when it completes, at the catalog's per-second price), is priced by
``engine.core.cost.price_text`` (text) or ``engine.core.cost.price_alone`` (images: the image times ``n``, and its
prompt's text tokens once where the catalog prices them). Error answers, injected faults, replays of an
``Idempotency-Key`` and calls cut by ``stop()`` bill nothing; but three faults are answers cut short of calls that
ran, and bill: ``cut_body`` (a sync answer), ``cut_connection`` (a sync call's connection closed unanswered) and
``garble_members`` (a batch member's result line); ``keyless_members`` writes a batch member's result without its
key (billed). A sync call is billed when its answer is ready, even if the
client has given up by then, as real providers do.

Time. Emulator time is a virtual unix time running ``speedup`` times the wall clock; a sync call sleeps its
catalog latency ``/ speedup * latency_scale`` real seconds. Batches advance lazily on every read: member
k of n finishes at ``in_progress_at + turnaround * (k + 1) / n``, the turnaround drawn from the catalog's
``batch_api`` lognormal. Random draws are seeded (``seed``).
"""

from __future__ import annotations

from engine.emulator._app import ROUTE_NAMES, Call
from engine.emulator._bill import Bill, BilledItem
from engine.emulator._emulator import Emulator, serve
from engine.emulator._faults import FaultPlan, FaultSpec
from engine.emulator._text import MARKER, filler_text

__all__ = [
    "MARKER",
    "ROUTE_NAMES",
    "Bill",
    "BilledItem",
    "Call",
    "Emulator",
    "FaultPlan",
    "FaultSpec",
    "filler_text",
    "serve",
]
