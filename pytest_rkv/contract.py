"""The Resident KV Claims contract as code: the one module every other part imports.

It holds, and only holds:

* the wire models of RKV API v1 (claims, events, pool, completions, refusals),
* the claim lifecycle state machine (which transitions a conforming runtime may report),
* the obligation catalogue (the single source of truth for markers, reports and docs),
* the substrate catalogue (useful primitives that never count as obligations),
* the vocabulary of test outcomes and evidence labels.

It imports nothing from the rest of pytest_rkv, so a runtime vendor can depend on it alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

API_VERSION = "rkv/1"
# Revision 1.1 adds tenants (bearer tokens), per-tenant budgets, admin-only reset and
# faults, a seq that never restarts, bounded event retention with paging. It is backward
# compatible: a v1 client that sends no token talks to a server with no tenants as before.
API_REVISION = "1.1"
SUITE_VERSION = "0.1.0"


class _Model(BaseModel):
    # Unknown fields are an error on requests (422) but tolerated on responses, so a
    # runtime may add fields without breaking older clients.
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Request(BaseModel):
    # Strict: no coercion ("1", 1.0, true and "yes" are not integers or booleans), no
    # NaN or Infinity, bounded ids and strings, so nothing odd is stored and echoed back.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


# --------------------------------------------------------------------------------------
# Claim lifecycle
# --------------------------------------------------------------------------------------


class ClaimState(str, enum.Enum):
    """Where an accepted claim is in its life. A refused claim never gets a state."""

    ACCEPTED = "accepted"  # identity issued, prefix not yet materialized
    RESIDENT = "resident"  # every block of the predicate is in the device pool
    DEMOTED = "demoted"  # every block is in a slower tier; must be restored before reuse
    FAILED = "failed"  # materialization or restore failed; the claim no longer holds
    HARMED = "harmed"  # a soft claim lost blocks to pressure
    EXPIRED = "expired"  # its TTL ran out
    RELEASED = "released"  # its owner gave it up


TERMINAL_STATES = frozenset(
    {ClaimState.FAILED, ClaimState.HARMED, ClaimState.EXPIRED, ClaimState.RELEASED}
)

# Allowed (from, to) pairs. `None` is "before the claim existed". A reuse is reported as
# resident -> resident: it is an event of the claim but not a change of state.
ALLOWED_TRANSITIONS: frozenset[tuple[ClaimState | None, ClaimState]] = frozenset(
    {
        (None, ClaimState.ACCEPTED),
        (ClaimState.ACCEPTED, ClaimState.RESIDENT),
        (ClaimState.ACCEPTED, ClaimState.FAILED),
        (ClaimState.ACCEPTED, ClaimState.RELEASED),
        (ClaimState.RESIDENT, ClaimState.RESIDENT),
        (ClaimState.RESIDENT, ClaimState.DEMOTED),
        (ClaimState.RESIDENT, ClaimState.HARMED),
        (ClaimState.RESIDENT, ClaimState.EXPIRED),
        (ClaimState.RESIDENT, ClaimState.RELEASED),
        (ClaimState.DEMOTED, ClaimState.RESIDENT),
        (ClaimState.DEMOTED, ClaimState.FAILED),
        (ClaimState.DEMOTED, ClaimState.HARMED),
        (ClaimState.DEMOTED, ClaimState.EXPIRED),
        (ClaimState.DEMOTED, ClaimState.RELEASED),
    }
)


def servable_blocks(prompt_tokens: int, block_size: int) -> int:
    """The last-block rule: how many leading blocks of a prompt of `prompt_tokens` tokens a
    runtime can serve from cache.

    The prompt's last token must be computed (it yields the logits of the first output
    token), and cache is served in whole blocks, so the block holding the last token is
    never served, even when it is full: (n - 1) // B blocks. A prompt that ends exactly on
    a block boundary thus recomputes its whole last block (vLLM; SGLang recomputes its last
    page, its block). A claim of k blocks referenced by such a prompt is reused for
    min(k, servable_blocks(n, B)) blocks, and the rest of what the prompt shares with it is
    the reuse record's `recomputed_tokens`."""
    return max(0, prompt_tokens - 1) // block_size


def transition_allowed(from_state: ClaimState | None, to_state: ClaimState) -> bool:
    return (from_state, to_state) in ALLOWED_TRANSITIONS


class EventType(str, enum.Enum):
    """Every event a conforming runtime reports on `GET /v1/kv/events`."""

    # claim lifecycle (claim_id set, from/to state set)
    CLAIM_ACCEPTED = "claim.accepted"
    CLAIM_MATERIALIZED = "claim.materialized"
    CLAIM_MATERIALIZATION_FAILED = "claim.materialization_failed"
    CLAIM_REUSED = "claim.reused"
    CLAIM_DEMOTED = "claim.demoted"
    CLAIM_RESTORED = "claim.restored"
    CLAIM_RESTORE_FAILED = "claim.restore_failed"
    CLAIM_HARMED = "claim.harmed"
    CLAIM_EXPIRED = "claim.expired"
    CLAIM_RELEASED = "claim.released"
    # claim-time refusal: no identity was ever issued (claim_id is null)
    CLAIM_REFUSED = "claim.refused"
    # request outcomes (request_id set)
    REQUEST_REFUSED = "request.refused"  # blocking_claims names who blocked it
    REQUEST_COMPLETED = "request.completed"
    # block-level substrate (no claim): ordinary caching and eviction
    BLOCKS_STORED = "blocks.stored"
    BLOCKS_EVICTED = "blocks.evicted"
    # the runtime dropped every claim and cached block; seq goes on counting (v1.1)
    RUNTIME_RESET = "runtime.reset"


# Which state change each lifecycle event reports. Used both by the reference runtime
# (to emit) and by the suites (to check a runtime's trace).
EVENT_TRANSITIONS: dict[EventType, tuple[frozenset[ClaimState | None], ClaimState]] = {
    EventType.CLAIM_ACCEPTED: (frozenset({None}), ClaimState.ACCEPTED),
    EventType.CLAIM_MATERIALIZED: (frozenset({ClaimState.ACCEPTED}), ClaimState.RESIDENT),
    EventType.CLAIM_MATERIALIZATION_FAILED: (frozenset({ClaimState.ACCEPTED}), ClaimState.FAILED),
    EventType.CLAIM_REUSED: (frozenset({ClaimState.RESIDENT}), ClaimState.RESIDENT),
    EventType.CLAIM_DEMOTED: (frozenset({ClaimState.RESIDENT}), ClaimState.DEMOTED),
    EventType.CLAIM_RESTORED: (frozenset({ClaimState.DEMOTED}), ClaimState.RESIDENT),
    EventType.CLAIM_RESTORE_FAILED: (frozenset({ClaimState.DEMOTED}), ClaimState.FAILED),
    EventType.CLAIM_HARMED: (
        frozenset({ClaimState.RESIDENT, ClaimState.DEMOTED}),
        ClaimState.HARMED,
    ),
    EventType.CLAIM_EXPIRED: (
        frozenset({ClaimState.RESIDENT, ClaimState.DEMOTED}),
        ClaimState.EXPIRED,
    ),
    EventType.CLAIM_RELEASED: (
        frozenset({ClaimState.ACCEPTED, ClaimState.RESIDENT, ClaimState.DEMOTED}),
        ClaimState.RELEASED,
    ),
}


# --------------------------------------------------------------------------------------
# Wire models (RKV API v1)
# --------------------------------------------------------------------------------------

Strength = Literal["hard", "soft"]
Tier = Literal["device", "host"]


class ClaimRequest(_Request):
    """Body of `POST /v1/kv/claims`."""

    prompt_token_ids: Annotated[list[TokenId], Field(min_length=1)]
    strength: Strength = "hard"
    ttl_s: Annotated[float, Field(gt=0, le=1e7, allow_inf_nan=False)] | None = None
    demotable: bool = False
    client_id: Name | None = None
    tenant: Name | None = None


class Claim(_Model):
    """An accepted claim, as `POST`/`GET`/`DELETE /v1/kv/claims[/{id}]` return it."""

    claim_id: str
    state: ClaimState
    strength: Strength
    # The materialization predicate: the first `blocks` full blocks of the prompt, i.e.
    # `tokens` = blocks * block_size tokens, identified by the hash of the last block.
    blocks: int
    tokens: int
    prefix_hash: str
    resident_blocks: int  # how many of `blocks` are in the device pool right now
    tier: Tier
    demotable: bool
    ttl_s: float | None = None
    expires_at: float | None = None
    client_id: str | None = None
    tenant: str | None = None
    reason: str | None = None  # why it left its last state (failure, harm, ...)
    worker: str | None = None  # routed runtimes: the worker holding it


class Event(_Model):
    """One entry of `GET /v1/kv/events`: `seq` strictly increases across the stream."""

    seq: int
    ts: float
    type: EventType
    claim_id: str | None = None
    from_state: ClaimState | None = None
    to_state: ClaimState | None = None
    cause: str | None = None
    request_id: str | None = None
    blocking_claims: list[str] = Field(default_factory=list)
    tier: Tier | None = None
    blocks: int = 0
    block_hashes: list[str] = Field(default_factory=list)
    worker: str | None = None  # routed runtimes: the worker it happened on


EVENT_PAGE_LIMIT = 1000  # most events one GET /v1/kv/events returns (its `limit` is 1..this)
# v1.1: what a tenant sees in place of another tenant's claim or request ids (refusal
# counts, harm, demotion and eviction events).
OTHER_TENANTS = "(another tenant)"


class ClaimList(_Model):
    """`GET /v1/kv/claims`: the caller's claims, live and recently ended, each as
    `GET /v1/kv/claims/{id}` shows it."""

    claims: list[Claim]


class EventPage(_Model):
    """`GET /v1/kv/events?after=SEQ&limit=N`: at most `limit` events with seq > after.

    `last_seq` is the seq of the last event on this page (or `after` when it is empty):
    pass it as the next `after`. `more` says another page is waiting. The runtime keeps a
    bounded window of events; `oldest_seq` is the first seq still available (0 when none),
    so a poller whose `after` is below `oldest_seq - 1` knows it missed events."""

    events: list[Event]
    last_seq: int
    more: bool = False
    oldest_seq: int = 0


class PoolState(_Model):
    """`GET /v1/kv/pool`: block accounting of the device pool (and host tier, if any)."""

    block_size: int
    total_blocks: int
    free_blocks: int  # hold nothing
    cached_blocks: int  # hold reusable KV, referenced by no request and no hard claim
    active_blocks: int  # referenced by running requests
    claimed_blocks: dict[str, int]  # claim id -> device blocks it holds
    claim_budget_blocks: int
    host_total_blocks: int = 0
    host_used_blocks: int = 0
    # v1.1: what one tenant's claims may hold together (None: no per-tenant bound). With
    # tenants, `claimed_blocks` lists only the caller's own claims.
    tenant_budget_blocks: int | None = None


class CompletionRequest(_Request):
    """Body of `POST /v1/completions` (an OpenAI-compatible subset, token ids only)."""

    model: Name | None = None
    prompt: Annotated[list[TokenId], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = 1
    claim_id: Name | None = None
    request_id: Name | None = None


class ClaimReuse(_Model):
    claim_id: str
    tokens: int  # the claim's tokens this request was served from cache
    restored: bool
    worker: str | None = None  # routed runtimes: where the reuse was served
    # The claim's tokens the prompt contained but the runtime computed again under the
    # last-block rule (`servable_blocks`): a block, when the prompt ends inside or at the
    # end of the claimed prefix, else 0. Said outright so that "288 of a 320-token claim"
    # never reads as a lost block.
    recomputed_tokens: int = 0


class ClaimFailure(_Model):
    claim_id: str
    reason: str


class PromptTokensDetails(_Model):
    cached_tokens: int


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class RkvCompletionRecord(_Model):
    request_id: str
    reuse: list[ClaimReuse] = Field(default_factory=list)
    failures: list[ClaimFailure] = Field(default_factory=list)


class CompletionChoice(_Model):
    index: int = 0
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: str = "length"


class Completion(_Model):
    id: str
    object: str = "text_completion"
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    rkv: RkvCompletionRecord | None = None


class ErrorBody(_Model):
    """The `error` object of every non-2xx RKV API response."""

    type: Literal[
        "no_admit",  # a claim refused at claim time (409)
        "active_refusal",  # a request that would evict a hard claim (409)
        "not_found",  # unknown claim id (404)
        "invalid_request",  # validation failure (422), see `fields`
        "unsupported",  # the runtime does not offer this route or fault (501)
        "capacity",  # larger than the whole pool, no claim involved (400)
        "unauthorized",  # no or unknown bearer token where tenants are configured (401)
        "forbidden",  # a token that may not do this, e.g. a tenant on an admin route (403)
        "bad_request",  # not HTTP the server can parse (400)
        "method_not_allowed",  # the route exists, the method does not (405)
        "timeout",  # headers or body not received in time (408)
        "too_large",  # body, URL or headers over the server's limits (413, 414, 431)
        "internal",  # a bug in the server (500); the reference server never means to send it
    ]
    message: str
    reason: str | None = None
    request_id: str | None = None
    blocking_claims: list[str] = Field(default_factory=list)
    # block arithmetic of a refusal: needed > free + evictable, because claimed is held
    needed_blocks: int | None = None
    free_blocks: int | None = None
    evictable_blocks: int | None = None
    claimed_blocks: dict[str, int] = Field(default_factory=dict)
    fields: list[dict] = Field(default_factory=list)


class ErrorResponse(_Model):
    error: ErrorBody


FaultKind = Literal["fail_next_materialization", "fail_next_restore"]


class FaultRequest(_Request):
    """Body of `POST /v1/kv/faults` (opt-in test route)."""

    kind: FaultKind
    claim_id: Name | None = None


class RuntimeInfo(_Model):
    """`GET /v1/kv/info`: who answers, and what it offers."""

    api_version: str = API_VERSION
    runtime: str
    runtime_version: str
    block_size: int
    total_blocks: int
    fault_injection: bool = False
    demotion: bool = False
    routed: bool = False
    # v1.1: callers are tenants identified by bearer tokens; claims are tenant-scoped.
    tenancy: bool = False


# --------------------------------------------------------------------------------------
# Obligations and substrates
# --------------------------------------------------------------------------------------

LITMUS_CASES = (
    "ordinary_eviction",
    "soft_priority",
    "write_no_admit",
    "accepted_hard_claims",
    "materialization_failure",
    "demotion",
    "expiry",
    "active_refusal",
    "trace_reconstruction",
    "tenant_isolation",
)


@dataclass(frozen=True)
class Obligation:
    id: str
    title: str
    statement: str  # one RFC 2119 sentence
    litmus: tuple[str, ...]
    substrates: tuple[str, ...]  # primitives whose presence makes a miss "approximation"
    routed_only: bool = False


@dataclass(frozen=True)
class Substrate:
    id: str
    statement: str


SUBSTRATES: tuple[Substrate, ...] = (
    Substrate("prefix_reuse", "A repeated prompt prefix is served from cache (cached_tokens > 0)."),
    Substrate("eviction_observable", "Losing cached blocks to pressure shows in events or in cached_tokens."),
    Substrate("block_events", "The runtime publishes block-level cache events with sequence numbers."),
    Substrate("host_tier", "Blocks displaced from the device pool are kept in a host tier and served again "
                           "from it (host-tier stores in block events; more cached tokens than the device kept)."),
)

OBLIGATIONS: tuple[Obligation, ...] = (
    Obligation(
        "claim-identity",
        "Claim identity",
        "An accepted claim MUST receive a unique identifier that every later event, reuse "
        "record and refusal concerning it carries.",
        ("accepted_hard_claims",),
        ("prefix_reuse",),
    ),
    Obligation(
        "materialization-predicate",
        "Materialization predicate",
        "A claim MUST state which prompt blocks it covers and MUST report itself resident "
        "only while every one of those blocks is resident or restorable.",
        ("accepted_hard_claims",),
        ("prefix_reuse", "block_events"),
    ),
    Obligation(
        "ordered-lifecycle",
        "Ordered lifecycle events",
        "Lifecycle events MUST carry strictly increasing sequence numbers and each claim's "
        "transitions MUST follow the lifecycle state machine.",
        ("accepted_hard_claims", "trace_reconstruction"),
        ("block_events",),
    ),
    Obligation(
        "active-refusal",
        "Active refusal with attribution",
        "An active request that fits only by evicting a hard claim MUST be refused visibly, "
        "naming the blocking claims and the block arithmetic, and the claim MUST stay resident.",
        ("active_refusal", "ordinary_eviction"),
        ("eviction_observable",),
    ),
    Obligation(
        "soft-harm",
        "Soft-claim priority and harm attribution",
        "A soft claim MUST outlive unclaimed cache under pressure, and when it does lose blocks the "
        "runtime MUST report a harm event naming the claim and the displacing request.",
        ("soft_priority",),
        ("eviction_observable",),
    ),
    Obligation(
        "write-no-admit",
        "Write no-admit",
        "A claim the runtime cannot hold MUST be refused at claim time with a reason and MUST "
        "leave no partial claim, pinned block or identity behind.",
        ("write_no_admit",),
        ("prefix_reuse",),
    ),
    Obligation(
        "materialization-failure",
        "Claim-scoped materialization and restore failure",
        "A failed materialization or restore MUST be reported as an event of that claim ordered "
        "before the affected request's outcome, and a recompute MUST NOT be reported as reuse.",
        ("materialization_failure",),
        ("prefix_reuse",),
    ),
    Obligation(
        "demotion-restore",
        "Demotion and restore-before-reuse",
        "A demoted claim MUST be reported as demoted and MUST be restored, with a restore event, "
        "before any request reuses it.",
        ("demotion",),
        ("prefix_reuse", "eviction_observable", "host_tier"),
    ),
    Obligation(
        "expiry",
        "Expiry",
        "A claim whose TTL has run out MUST be reported expired and MUST stop protecting its blocks.",
        ("expiry",),
        (),
    ),
    Obligation(
        "release",
        "Release",
        "A released claim MUST be reported released and MUST stop protecting its blocks at once.",
        ("accepted_hard_claims",),
        (),
    ),
    Obligation(
        "reuse-attribution",
        "Reuse attribution",
        "A request served from a claim's blocks MUST carry a reuse record naming the claim and "
        "the reused tokens, not only a global or per-request counter.",
        ("accepted_hard_claims",),
        ("prefix_reuse",),
    ),
    Obligation(
        "trace-reconstruction",
        "Trace-level outcome reconstruction",
        "The event log alone MUST be enough to tell which litmus outcome happened to each claim "
        "and request.",
        ("trace_reconstruction",),
        ("block_events",),
    ),
    Obligation(
        "claim-isolation",
        "Claim isolation between tenants",
        "A runtime that declares tenancy MUST NOT let one tenant read, release, see the events or "
        "block hashes of, or reuse another tenant's claim, and MUST bound the blocks one tenant's "
        "claims may hold below the global claim budget.",
        ("tenant_isolation",),
        (),
    ),
    Obligation(
        "placement",
        "Placement attribution",
        "A routed runtime MUST report which worker holds a claim and MUST attribute routed reuse "
        "to the claim and the worker.",
        ("accepted_hard_claims",),
        (),
        routed_only=True,
    ),
)

OBLIGATIONS_BY_ID: dict[str, Obligation] = {o.id: o for o in OBLIGATIONS}

# What any claim support must show, whatever else it leaves out: identity, the predicate,
# ordered events, and the canonical probe's refusal. An adapter may bound its scope (leave
# out obligations it declares unsupported, e.g. demotion where the platform has no host
# tier), but never these.
CORE_OBLIGATIONS: tuple[str, ...] = (
    "claim-identity", "materialization-predicate", "ordered-lifecycle", "active-refusal",
)
SUBSTRATES_BY_ID: dict[str, Substrate] = {s.id: s for s in SUBSTRATES}


# --------------------------------------------------------------------------------------
# Outcomes and labels
# --------------------------------------------------------------------------------------


class TestOutcome(str, enum.Enum):
    """What one obligation or substrate test established about a backend."""

    __test__ = False  # not a pytest test class

    PASSED = "passed"
    FAILED = "failed"  # the backend demonstrably broke the obligation
    UNSUPPORTED = "unsupported"  # the backend said, explicitly, it does not offer this
    UNTESTABLE = "untestable"  # the backend cannot be probed for this (e.g. no fault route)
    NOT_APPLICABLE = "not_applicable"  # e.g. placement on a single-engine runtime
    ERROR = "error"  # harness error, timeout, crash, silent skip: evidence is void
    NOT_RUN = "not_run"  # the catalogue has it, the run did not execute it


class Label(str, enum.Enum):
    NATIVE = "native conformance"
    ADAPTER = "adapter-scoped evidence"
    APPROXIMATION = "approximation substrate"
    REJECTED = "rejected mapping"
    UNKNOWN = "unknown evidence"


Depth = Literal["native", "adapter", "patch", "none"]

# What an unsupported signal may say about itself (see drivers.base.Unsupported).
UnsupportedScope = Literal["feature", "probe"]
