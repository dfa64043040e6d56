"""Reading an event trace: is it well ordered, and what happened in it?

Both functions look at the events alone (no API responses), which is the point of the
trace-reconstruction obligation: a reviewer holding only `events.jsonl` must reach the
same conclusions as the test that watched the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pytest_rkv.contract import EVENT_TRANSITIONS, ClaimState, ErrorBody, Event, EventType


def order_problems(events: Iterable[Event]) -> list[str]:
    """Every way the trace breaks ordered-lifecycle rules; empty when it is well ordered.

    Rules: seq strictly increases in the order served; each lifecycle event's from-state
    is the claim's state after its previous event; each (event type, from, to) is allowed
    by the state machine; a claim starts with `claim.accepted`.
    """
    problems: list[str] = []
    last_seq: int | None = None
    state: dict[str, ClaimState] = {}
    for e in events:
        if last_seq is not None and e.seq <= last_seq:
            problems.append(f"seq {e.seq} ({e.type.value}) does not follow seq {last_seq}")
        last_seq = e.seq
        rule = EVENT_TRANSITIONS.get(e.type)
        if rule is None:
            continue
        if not e.claim_id:
            problems.append(f"seq {e.seq}: {e.type.value} names no claim")
            continue
        allowed_from, to_state = rule
        current = state.get(e.claim_id)
        if e.from_state != current:
            problems.append(
                f"seq {e.seq}: {e.type.value} of {e.claim_id} says from "
                f"{_name(e.from_state)} but the claim was {_name(current)}"
            )
        if current not in allowed_from or e.to_state != to_state:
            problems.append(
                f"seq {e.seq}: {e.type.value} of {e.claim_id} is not a lifecycle step "
                f"({_name(current)} -> {_name(e.to_state)})"
            )
        if e.to_state is not None:
            state[e.claim_id] = e.to_state
    return problems


# The contents every event must carry, whoever checks (docs/SPEC.md, "Event fields").
# Events a request causes name it; claim.accepted and the materialization that follows
# name the claim's own request (the same id on both).
NAMES_REQUEST = frozenset({
    EventType.CLAIM_ACCEPTED, EventType.CLAIM_MATERIALIZED, EventType.CLAIM_MATERIALIZATION_FAILED,
    EventType.CLAIM_REUSED, EventType.CLAIM_RESTORED, EventType.CLAIM_RESTORE_FAILED,
    EventType.REQUEST_REFUSED, EventType.REQUEST_COMPLETED,
})
# The tier a claim is on after the event; a failed restore names the tier it failed from.
TIER_OF = {EventType.CLAIM_MATERIALIZED: "device", EventType.CLAIM_RESTORED: "device",
           EventType.CLAIM_DEMOTED: "host", EventType.CLAIM_RESTORE_FAILED: "host"}


@dataclass
class Ledger:
    """What a test itself did, to hold event contents against: the claims it was granted
    (id -> blocks) and the active refusals it was answered (request id -> error body)."""

    claims: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, ErrorBody] = field(default_factory=dict)


def content_problems(events: Iterable[Event], ledger: Ledger | None = None) -> list[str]:
    """Every event whose fields disagree with its type, with the rest of the trace, or
    with what the test knows it did; empty when every field is as the contract says."""
    ledger = ledger or Ledger()
    problems: list[str] = []
    claim_request: dict[str, str | None] = {}  # claim id -> the request on its claim.accepted
    for e in events:
        where = f"seq {e.seq}: {e.type.value}" + (f" of {e.claim_id}" if e.claim_id else "")
        if e.block_hashes and e.blocks != len(e.block_hashes):
            problems.append(f"{where} says {e.blocks} blocks but lists {len(e.block_hashes)} block hashes")
        if e.type in TIER_OF and e.tier != TIER_OF[e.type]:
            problems.append(f"{where} reports tier {e.tier!r}; expected {TIER_OF[e.type]!r}")
        if e.type in NAMES_REQUEST and not e.request_id:
            problems.append(f"{where} names no request")
        if e.type == EventType.CLAIM_REFUSED and e.claim_id is not None:
            problems.append(f"{where}: a refused claim was never issued an id")
        if e.type == EventType.CLAIM_ACCEPTED and e.claim_id:
            claim_request[e.claim_id] = e.request_id
        if e.type in (EventType.CLAIM_MATERIALIZED, EventType.CLAIM_MATERIALIZATION_FAILED) \
                and e.claim_id in claim_request and e.request_id != claim_request[e.claim_id]:
            problems.append(f"{where} names request {e.request_id!r}, the claim's own request was "
                            f"{claim_request[e.claim_id]!r}")
        granted = ledger.claims.get(e.claim_id or "")
        if granted is not None:
            if e.type in (EventType.CLAIM_ACCEPTED, EventType.CLAIM_MATERIALIZED, EventType.CLAIM_RESTORED) \
                    and e.blocks != granted:
                problems.append(f"{where} says {e.blocks} blocks; the claim covers {granted}")
            if e.type == EventType.CLAIM_REUSED and not 1 <= e.blocks <= granted:
                problems.append(f"{where} credits {e.blocks} blocks; the claim covers {granted}")
        refusal = ledger.refusals.get(e.request_id or "")
        if e.type == EventType.REQUEST_REFUSED and refusal is not None:
            if e.blocks != refusal.needed_blocks or sorted(e.blocking_claims) != sorted(refusal.blocking_claims):
                problems.append(
                    f"{where} says {e.blocks} blocks needed, blocked by {sorted(e.blocking_claims)}; the "
                    f"refusal said {refusal.needed_blocks}, blocked by {sorted(refusal.blocking_claims)}"
                )
    return problems


def _name(s: ClaimState | None) -> str:
    return s.value if s is not None else "(none)"


@dataclass
class ClaimStory:
    claim_id: str
    states: list[str] = field(default_factory=list)
    outcomes: set[str] = field(default_factory=set)
    harmed_by: set[str] = field(default_factory=set)
    reused_by: set[str] = field(default_factory=set)
    blocked: set[str] = field(default_factory=set)


@dataclass
class RequestStory:
    request_id: str
    outcomes: set[str] = field(default_factory=set)
    blocking_claims: set[str] = field(default_factory=set)


@dataclass
class Reconstruction:
    claims: dict[str, ClaimStory] = field(default_factory=dict)
    requests: dict[str, RequestStory] = field(default_factory=dict)
    refused_claim_requests: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)  # events whose type and states disagree

    def outcomes(self) -> set[str]:
        found: set[str] = set()
        for story in [*self.claims.values(), *self.requests.values()]:
            found |= story.outcomes
        if self.refused_claim_requests:
            found.add("write_no_admit")
        return found


def reconstruct(events: Iterable[Event]) -> Reconstruction:
    """Name the litmus outcomes the trace shows, per claim and per request.

    * accepted_hard_claims - a claim accepted and materialized (and maybe reused)
    * materialization_failure - materialization or restore failed
    * demotion - demoted (and restored before any reuse)
    * soft_priority - a soft claim harmed, with the displacing request
    * expiry / release - the claim ended by TTL / by its owner
    * active_refusal - a request refused, with the blocking claims
    * ordinary_eviction - a request displaced unclaimed cache (no claim harmed)
    * write_no_admit - a claim refused at claim time
    """
    out = Reconstruction()

    def claim(cid: str) -> ClaimStory:
        return out.claims.setdefault(cid, ClaimStory(cid))

    def request(rid: str) -> RequestStory:
        return out.requests.setdefault(rid, RequestStory(rid))

    for e in events:
        t = e.type
        if t == EventType.CLAIM_REFUSED:
            out.refused_claim_requests.add(e.request_id or f"seq-{e.seq}")
            continue
        if t == EventType.REQUEST_REFUSED and e.request_id:
            story = request(e.request_id)
            story.outcomes.add("active_refusal")
            story.blocking_claims |= set(e.blocking_claims)
            for cid in e.blocking_claims:
                claim(cid).blocked.add(e.request_id)
            continue
        if t == EventType.BLOCKS_EVICTED and e.request_id:
            request(e.request_id).outcomes.add("ordinary_eviction")
            continue
        if t == EventType.REQUEST_COMPLETED and e.request_id:
            request(e.request_id).outcomes.add("completed")
            continue
        if not e.claim_id or t not in EVENT_TRANSITIONS:
            continue
        story = claim(e.claim_id)
        # The states are read too: an event whose from/to contradicts its type (or the
        # claim's state so far) tells a different story than its type, so it is named.
        allowed_from, to_state = EVENT_TRANSITIONS[t]
        current = ClaimState(story.states[-1]) if story.states else None
        if e.to_state != to_state or e.from_state != current or current not in allowed_from:
            out.problems.append(
                f"seq {e.seq}: {t.value} of {e.claim_id} says {_name(e.from_state)} -> {_name(e.to_state)}, "
                f"the claim was {_name(current)} and the event means -> {to_state.value}"
            )
        story.states.append(to_state.value)
        if t == EventType.CLAIM_MATERIALIZED:
            story.outcomes.add("accepted_hard_claims")
        elif t in (EventType.CLAIM_MATERIALIZATION_FAILED, EventType.CLAIM_RESTORE_FAILED):
            story.outcomes.add("materialization_failure")
        elif t == EventType.CLAIM_DEMOTED:
            story.outcomes.add("demotion")
        elif t == EventType.CLAIM_HARMED:
            story.outcomes.add("soft_priority")
            if e.request_id:
                story.harmed_by.add(e.request_id)
        elif t == EventType.CLAIM_EXPIRED:
            story.outcomes.add("expiry")
        elif t == EventType.CLAIM_RELEASED:
            story.outcomes.add("release")
        elif t == EventType.CLAIM_REUSED and e.request_id:
            story.reused_by.add(e.request_id)
    return out
