"""``smart``'s settings (``policies.smart.SmartParams``): what each knob trades, in its description."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from engine.core.scheduling import Scheduling
from engine.core.settings import TurnaroundLearning
from engine.core.similarity import GUARDS, Guards
from policies.base import PolicyParams

__all__ = ["SmartParams"]


class SmartParams(PolicyParams):
    reuse_exact: bool = True
    reuse_in_flight: bool = True
    reuse_near: bool = True
    near_threshold: float = Field(default=0.92, ge=0.5, le=1.0)
    in_flight_margin_s: float | None = Field(default=60.0, ge=0, description=(
        "a request sent by a sync call (a hosted image or video) may wait for an identical request in flight "
        "that is due after it, until twice its own call's p99 plus this many seconds before its deadline, then "
        "goes on its own; None: it follows only requests due no later than it"))
    near_guards: tuple[str, ...] = Field(default=GUARDS, description="guards that refuse a near-duplicate "
                                         f"match above the threshold; any of {list(GUARDS)}")
    batch_gather_s: float = Field(default=4 * 3600.0, ge=0, description="longest wait to gather a batch-API batch")
    chain_cache: bool = Field(default=True, description="where the prompt cache stacks with the batch API, "
                              "flush at least every median turnaround + cache TTL (docs/policies.md)")
    gather_p_loss: float = Field(default=0.01, ge=0, le=1,
                                 description="gather only while P(batch done before hedge) drops by at most this")
    shared_gather_p_loss: float = Field(default=0.03, ge=0, le=1, description=(
        "gather_p_loss of a group in the shared band (members with a prefix the provider's cache also serves in "
        "batches, and time to the earliest deadline past the band cap): a longer gather puts more turns of a "
        "conversation in one batch, where they read one prefix write (docs/policies.md)"))
    hedge_margin_s: float = Field(default=15.0, ge=0, description="spare seconds after the sync fallback")
    hedge_retry: bool = Field(default=False, description=(
        "the hedge lead also leaves time for one failed attempt of the slowest member and its retry (another "
        "sync p99), as the release of an in-flight follower does"))
    closed_gather_s: float = Field(default=5.0, ge=0, description=(
        "a group holding a request that expects no company (``Request.gather`` false: a batch file's lines) "
        "gathers this long at most, for the rest of its submission, which reaches a grouper in parts (the "
        "driver's micro-batches): 0 sends each part in a provider batch of its own"))
    min_on_time_p: float = Field(default=0.02, ge=0, le=1,
                                 description="try the batch API only when P(done before hedge) >= this")
    min_batch_saving_usd: float = Field(default=0.001, ge=0, description=(
        "value of time: hold requests for a batch only when it is expected to save at least this much in all "
        "(its members now, plus those the lane's recent arrivals bring before it is sent); else send at once"))
    min_saving_rel: float = Field(default=0.02, ge=0, le=1, description=(
        "value of time: ... and at least this share of the members' list price (P(on time) x the discount)"))
    wait_usd_per_hour: dict[Literal["urgent", "normal", "background"], float] = Field(
        default_factory=dict, description="value of time: what an hour of waiting costs, per request and "
        "priority; a batch must be expected to save more than its members' expected wait costs")
    band_p: float = Field(default=0.8, ge=0, le=1, description=(
        "requests with a cacheable prefix whose deadlines pass the turnaround quantile at this P share one "
        "deadline band: a batch of them is hedged rarely, so a later deadline buys only gathering time, and one "
        "group keeps a conversation's turns (whose priorities differ) in the same batches, sharing one prefix "
        "write; 1 keeps every factor-of-two band apart"))
    conversation_groups: bool = Field(default=True, description=(
        "a request with a cacheable prefix gathers with those that start with the same cacheable run (the turns "
        "of one conversation), from its first turn, instead of with its whole lane: more of a conversation's "
        "turns then share one batch and one prefix write; the lane's conversations due about together still "
        "share one provider batch (ride_s) (docs/policies.md); false: one group per lane"))
    ride_s: float = Field(default=120.0, ge=0, description=(
        "with conversation_groups: a conversation's batch takes along the lane's other groups due to be sent "
        "within this many seconds (none due before it, none that would bring its hedge forward by more than "
        "this), so the lane sends one provider batch where it would send one per conversation (providers "
        "rate-limit batch creation and polling); 0: each batches alone"))
    second_batch: bool = Field(default=True, description=(
        "cancel a late batch at the checkpoint that gives its members the best chance over two batches (the "
        "first, then a fresh one with what time is left) instead of waiting for the last safe moment: a batch "
        "that is late by then is likely to stay late, and a second draw of the turnaround is often on time; "
        "false: one batch, cancelled at the last moment for sync"))
    confident_p: float = Field(default=0.9, ge=0, le=1,
                               description="P at or above which a batch is 'process_as_batch', else 'consider'")
    gpu_margin_s: float = Field(default=60.0, ge=0, description="spare seconds before a GPU batch's deadline")
    gpu_max_wait_s: float | None = Field(default=None, gt=0, description="cap on gathering GPU jobs (None: "
                                                                        "deadline-driven)")
    warm_margin_s: float | None = Field(default=10.0, ge=0, description=(
        "a request the batch lane would take is sent at once when its prompt prefix is believed warm at the "
        "provider for at least this many seconds more and reading it costs less than the batch expected "
        "(policies/_text.py); None: never"))
    pull_warm: bool = Field(default=True, description=(
        "a call that leaves a conversation's prefix warm sends at once the turns of it waiting for a batch that "
        "read it for less than the batch is expected to cost them (warm_margin_s, policies/_text.py)"))
    fallback_marks: bool = Field(default=True, description=(
        "at an explicit prompt cache (Anthropic's), a call also marks its prefix for a write when another request of "
        "its conversation waits in a batch more likely late than not whose fallback call comes within the cache's TTL "
        "(an urgent turn's try): that call then reads the write (docs/policies.md); false: only a prefix sent within "
        "the TTL is marked"))
    flex: bool = Field(default=True, description=(
        "send a text request at once at the provider's flex tier (batch prices, a sync call's prompt cache, an "
        "answer in seconds to minutes) where its model takes the tier and its deadline leaves room for a slow "
        "flex call and then a standard one (a refused flex call is sent standard at once; policies/_text.py)"))
    flex_now_s: float | None = Field(default=None, gt=0, description=(
        "with flex: a request due within this many seconds goes at the flex tier at arrival; one due later may "
        "ride a batch first (sharing its prefix with its conversation's turns), hedged in time for a flex call, "
        "and goes flex wherever smart would otherwise call sync; None: the provider's median batch turnaround "
        "(a batch would more likely than not be late); a large value sends all that fits flex at arrival"))
    block_tokens: int = Field(default=512, ge=1, description="tokens per prefix block in the traces")
    scheduling: Scheduling = Field(default=Scheduling(), description="order of ready work at a rate-limited "
                                   "provider: deadline promotion, fair share across tenants, score weights")
    turnaround: TurnaroundLearning = Field(default=TurnaroundLearning(), description=(
        "learn each provider's batch turnaround (per model and hour of day) from the batches the engine "
        "follows, and decide with it instead of the catalog's; {enabled: false} keeps the catalog's"))

    @field_validator("near_guards")
    @classmethod
    def _known_guards(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        Guards.of(v)  # raises with the list of known guards
        return v
