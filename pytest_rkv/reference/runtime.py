"""MicroRuntime: the executable specification of RKV API v1.

It serves completions over a `BlockPool` without a model (a request only allocates its
blocks, "computes" them, and returns dummy tokens), and implements every obligation of
the contract: claims with identity and a materialization predicate, hard and soft
strength, a claim budget (write no-admit), active refusal attributed to the blocking
claims, harm events for soft claims, demotion to a host tier with restore-before-reuse,
TTL expiry on an injectable clock, release, claim-scoped restore/materialization failure
injection, and an ordered event log.

Named fault modes (`FAULT_MODES`) break one obligation each, so the suite's own tests can
show that every obligation test fails on a runtime that breaks it.

Every public method takes the runtime lock: the HTTP server calls it from many threads.
Errors are returned as `ApiError`, which carries the HTTP status and the error body.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pytest_rkv.contract import (
    EVENT_TRANSITIONS,
    TERMINAL_STATES,
    Claim,
    ClaimFailure,
    ClaimRequest,
    ClaimReuse,
    ClaimState,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorBody,
    Event,
    EventPage,
    EventType,
    FaultRequest,
    PoolState,
    PromptTokensDetails,
    RkvCompletionRecord,
    RuntimeInfo,
    SUITE_VERSION,
    Usage,
)
from pytest_rkv.reference.pool import BlockPool, block_hashes

# Each mode makes the runtime break (at least) the obligation named beside it.
FAULT_MODES: dict[str, str] = {
    "anonymous_claims": "claim-identity: every claim gets the same id",
    "false_resident": "materialization-predicate: reports resident with one block missing",
    "events_out_of_order": "ordered-lifecycle: each operation's events are numbered backwards",
    "silent_evict_hard": "active-refusal: hard claims are evicted like plain cache, silently",
    "unattributed_refusal": "active-refusal: refuses without naming the blocking claims",
    "no_harm_event": "soft-harm: soft claims lose blocks with no harm event",
    "half_admit": "write-no-admit: over-budget claims are accepted truncated",
    "recompute_as_reuse": "materialization-failure: a failed restore is reported as reuse",
    "reuse_before_restore": "demotion-restore: demoted blocks are reused with no restore event",
    "no_expiry": "expiry: TTLs are ignored",
    "release_leak": "release: released claims keep their blocks pinned",
    "global_reuse_counter": "reuse-attribution: reuse shows only in cached_tokens",
    "reuse_past_last_block": "reuse-attribution: a full-prompt hit counts the recomputed last block as reused",
    "no_request_events": "trace-reconstruction: request outcomes are not logged",
    "queue_blocked_requests": "active-refusal: a request blocked by hard claims waits forever, unanswered",
    "refusal_wrong_status": "active-refusal: refusals are HTTP 503 instead of 409",
    "refusal_without_arithmetic": "active-refusal: refusals leave out free_blocks and evictable_blocks",
    "blame_every_claim": "active-refusal: refusals name every live claim, soft ones too",
    "harm_undercount": "soft-harm: harm events report 1 block lost, whatever was lost",
    "pool_overcount": "materialization-predicate: cached_blocks also counts claimed blocks",
    "stale_prefix_hash": "materialization-predicate: prefix_hash is the first block's hash, not the last's",
    "forget_request_fields": "materialization-predicate: claims do not echo ttl_s and client_id",
    "unknown_claim_ok": "claim-identity: an unknown claim id is answered 200 with a made-up claim",
    "reissue_ids": "release: a new claim gets the id of the last claim that ended",
    "ended_claims_reused": "release: released, expired, harmed and failed claims are still credited with reuse",
    "double_release_event": "ordered-lifecycle: releasing a released claim reports a second release",
    "events_ignore_after": "ordered-lifecycle: GET /v1/kv/events ignores `after`",
    "events_include_after": "ordered-lifecycle: GET /v1/kv/events?after=N includes event N",
    "expire_on_read": "expiry: claims expire only when read with GET",
    "early_expiry": "expiry: claims expire at half their TTL",
    "partial_reuse_full_tokens": "reuse-attribution: a partial-prefix reuse is credited the claim's full tokens",
    "restore_after_reuse": "demotion-restore: the restore event comes after the reuse it served",
    "budget_off_by_one": "write-no-admit: a claim exactly filling the budget is refused",
}


class Parked(Exception):
    """Internal: the `queue_blocked_requests` fault holds a request with no answer."""

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id)
        self.request_id = request_id


def park_forever(request_id: str) -> None:
    """What a runtime that queues a request it can neither admit nor refuse looks like
    from outside: the caller's thread never gets an answer (bounded at an hour, so a
    forgotten server thread cannot outlive every reasonable stop)."""
    threading.Event().wait(3600)
    raise RuntimeError(f"request {request_id} parked for an hour")


class ApiError(Exception):
    def __init__(self, status: int, body: ErrorBody) -> None:
        super().__init__(f"{status} {body.type}: {body.message}")
        self.status = status
        self.body = body


@dataclass
class _Claim:
    claim_id: str
    strength: str
    hashes: list[str]
    demotable: bool
    ttl_s: float | None
    expires_at: float | None
    client_id: str | None
    tenant: str | None
    state: ClaimState = ClaimState.ACCEPTED
    tier: str = "device"
    host_hashes: list[str] = field(default_factory=list)
    reason: str | None = None


class FakeClock:
    """An injectable clock: time moves only when a test advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MicroRuntime:
    RUNTIME = "pytest-rkv-reference"

    def __init__(
        self,
        *,
        num_blocks: int = 80,
        block_size: int = 16,
        claim_budget_blocks: int = 64,
        host_blocks: int = 80,
        clock: Callable[[], float] = time.monotonic,
        faults: frozenset[str] = frozenset(),
        fault_injection: bool = True,
        park: Callable[[str], None] = park_forever,
    ) -> None:
        unknown = set(faults) - set(FAULT_MODES)
        if unknown:
            raise ValueError(
                f"unknown fault mode(s) {sorted(unknown)}; known: {', '.join(FAULT_MODES)}"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.claim_budget_blocks, self.host_blocks = claim_budget_blocks, host_blocks
        self.clock, self.faults, self.fault_injection = clock, frozenset(faults), fault_injection
        self.park = park  # called, outside the lock, for a request the fault leaves unanswered
        self._lock = threading.RLock()
        self.reset()

    # ---------------------------------------------------------------- bookkeeping
    def reset(self) -> None:
        with self._lock:
            self.pool = BlockPool(self.num_blocks, self.block_size)
            self.claims: dict[str, _Claim] = {}
            self._events: list[Event] = []
            self._pending: list[dict] = []
            self._seq = itertools.count(1)
            self._ids = itertools.count(1)
            self._armed: list[FaultRequest] = []

    def _emit(self, type_: EventType, **fields) -> None:
        self._pending.append({"type": type_, **fields})

    def _transition(self, claim: _Claim, type_: EventType, **fields) -> None:
        _, to_state = EVENT_TRANSITIONS[type_]
        self._emit(type_, claim_id=claim.claim_id, from_state=claim.state, to_state=to_state, **fields)
        claim.state = to_state

    def _flush(self) -> None:
        """Number this operation's events. The seq is the order the runtime vouches for."""
        batch = self._pending
        if "events_out_of_order" in self.faults:
            batch = list(reversed(batch))
        now = self.clock()
        for fields in batch:
            if "no_request_events" in self.faults and fields["type"] in (
                EventType.REQUEST_COMPLETED,
                EventType.REQUEST_REFUSED,
            ):
                continue
            self._events.append(Event(seq=next(self._seq), ts=now, **fields))
        self._pending = []

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _live(self) -> list[_Claim]:
        return [c for c in self.claims.values() if c.state not in TERMINAL_STATES]

    def _expire(self, reading: bool = False) -> None:
        if "no_expiry" in self.faults or ("expire_on_read" in self.faults and not reading):
            return
        now = self.clock()
        for claim in self._live():
            deadline = claim.expires_at
            if deadline is not None and "early_expiry" in self.faults:
                deadline -= claim.ttl_s / 2
            if deadline is not None and now >= deadline:
                self.pool.unpin(claim.claim_id)
                claim.host_hashes = []
                claim.reason = f"ttl of {claim.ttl_s}s ran out"
                self._transition(claim, EventType.CLAIM_EXPIRED, cause="ttl")

    def _claim_view(self, claim: _Claim) -> Claim:
        held = len(self.pool.held_by(claim.claim_id)) if claim.tier == "device" else 0
        if "false_resident" in self.faults and claim.state == ClaimState.RESIDENT:
            held = len(claim.hashes)  # the lie: claims full residency
        return Claim(
            claim_id=claim.claim_id,
            state=claim.state,
            strength=claim.strength,
            blocks=len(claim.hashes),
            tokens=len(claim.hashes) * self.block_size,
            prefix_hash=claim.hashes[0 if "stale_prefix_hash" in self.faults else -1],
            resident_blocks=held,
            tier=claim.tier,
            demotable=claim.demotable,
            ttl_s=None if "forget_request_fields" in self.faults else claim.ttl_s,
            expires_at=claim.expires_at,
            client_id=None if "forget_request_fields" in self.faults else claim.client_id,
            tenant=claim.tenant,
            reason=claim.reason,
        )

    def _lookup_claim(self, claim_id: str) -> _Claim:
        claim = self.claims.get(claim_id)
        if claim is None:
            raise ApiError(404, ErrorBody(type="not_found", message=f"no claim {claim_id!r}"))
        return claim

    # ---------------------------------------------------------------- room-making
    def _plan_room(self, needed: int, keep: set[int]) -> dict | None:
        """How to free `needed` blocks without touching `keep`, least harm first:
        free blocks, unclaimed cache (LRU), demotable claims, soft claims. None if only
        evicting a hard claim would do."""
        free = self.pool.num_free()
        unclaimed, soft = self.pool.evictable(exclude=keep)
        if "silent_evict_hard" in self.faults:
            unclaimed += [
                b.block_id
                for b in self.pool.blocks
                if b.hard_holders and b.ref == 0 and b.block_id not in keep
            ]
        plan = {"unclaimed": [], "demote": [], "soft": []}
        room = free
        for b in unclaimed:
            if room >= needed:
                break
            plan["unclaimed"].append(b)
            room += 1
        if room < needed:
            for claim in self._live():
                if room >= needed:
                    break
                if claim.demotable and claim.tier == "device" and "silent_evict_hard" not in self.faults:
                    blocks = [b for b in self.pool.held_by(claim.claim_id) if b not in keep]
                    host_used = sum(len(c.host_hashes) for c in self._live())
                    if blocks and host_used + len(claim.hashes) <= self.host_blocks:
                        plan["demote"].append(claim)
                        room += len(blocks)
        for b in soft:
            if room >= needed:
                break
            if any(b in self.pool.held_by(c.claim_id) for c in plan["demote"]):
                continue
            plan["soft"].append(b)
            room += 1
        return plan if room >= needed else None

    def _make_room(self, plan: dict, request_id: str) -> None:
        evicted = [self.pool.evict(b) for b in plan["unclaimed"] if self.pool.blocks[b].evictable]
        if "silent_evict_hard" in self.faults:
            for b in plan["unclaimed"]:
                block = self.pool.blocks[b]
                if block.hard_holders:
                    block.hard_holders.clear()
                    evicted.append(self.pool.evict(b))
        if evicted:
            self._emit(EventType.BLOCKS_EVICTED, request_id=request_id, blocks=len(evicted), block_hashes=evicted)
        for claim in plan["demote"]:
            claim.host_hashes = list(claim.hashes)
            dropped = self.pool.drop_claim_blocks(claim.claim_id)
            claim.tier = "host"
            self._transition(
                claim, EventType.CLAIM_DEMOTED, cause="pressure", request_id=request_id,
                tier="host", blocks=len(dropped),
            )
        harmed: dict[str, list[str]] = {}
        for b in plan["soft"]:
            block = self.pool.blocks[b]
            holders = set(block.soft_holders)
            block_hash = self.pool.evict(b)
            for claim_id in holders:
                harmed.setdefault(claim_id, []).append(block_hash)
        for claim_id, hashes in harmed.items():
            claim = self.claims[claim_id]
            self.pool.unpin(claim_id)
            if "no_harm_event" in self.faults:
                self._emit(EventType.BLOCKS_EVICTED, request_id=request_id, blocks=len(hashes), block_hashes=hashes)
                continue
            claim.reason = f"lost {len(hashes)} blocks to request {request_id}"
            lost = 1 if "harm_undercount" in self.faults else len(hashes)
            self._transition(
                claim, EventType.CLAIM_HARMED, cause="evicted_by_request",
                request_id=request_id, blocks=lost, block_hashes=hashes[:lost],
            )

    def _refusal(self, needed: int, keep: set[int], request_id: str) -> ApiError:
        blockers = sorted(
            c.claim_id for c in self._live()
            if c.strength == "hard" and c.tier == "device" and set(self.pool.held_by(c.claim_id)) - keep
        )
        unclaimed, soft = self.pool.evictable(exclude=keep)
        claimed = {c: len(self.pool.held_by(c)) for c in blockers}
        if "unattributed_refusal" in self.faults:
            blockers, claimed = [], {}
        if "blame_every_claim" in self.faults:
            blockers = sorted(c.claim_id for c in self._live())
        body = ErrorBody(
            type="active_refusal",
            message=(
                f"request {request_id} needs {needed} blocks; {self.pool.num_free()} free + "
                f"{len(unclaimed) + len(soft)} evictable; the rest is held by hard claims "
                f"{', '.join(blockers) or '(unnamed)'}"
            ),
            request_id=request_id,
            blocking_claims=blockers,
            needed_blocks=needed,
            free_blocks=None if "refusal_without_arithmetic" in self.faults else self.pool.num_free(),
            evictable_blocks=None if "refusal_without_arithmetic" in self.faults else len(unclaimed) + len(soft),
            claimed_blocks=claimed,
        )
        self._emit(EventType.REQUEST_REFUSED, request_id=request_id, cause="hard_claims", blocking_claims=blockers, blocks=needed)
        return ApiError(503 if "refusal_wrong_status" in self.faults else 409, body)

    # ---------------------------------------------------------------- API
    def info(self) -> RuntimeInfo:
        return RuntimeInfo(
            runtime=self.RUNTIME,
            runtime_version=SUITE_VERSION,
            block_size=self.block_size,
            total_blocks=self.num_blocks,
            fault_injection=self.fault_injection,
            demotion=self.host_blocks > 0,
        )

    def create_claim(self, req: ClaimRequest) -> Claim:
        with self._lock:
            try:
                return self._create_claim(req)
            finally:
                self._flush()

    def _create_claim(self, req: ClaimRequest) -> Claim:
        self._expire()
        hashes = block_hashes(list(req.prompt_token_ids), self.block_size)
        request_id = self._new_id("claimreq")
        if not hashes:
            raise ApiError(422, ErrorBody(
                type="invalid_request",
                message=f"a claim must cover at least one full block of {self.block_size} tokens",
                fields=[{"loc": ["prompt_token_ids"], "msg": "shorter than one block"}],
            ))
        held = sum(len(c.hashes) for c in self._live())
        over_budget = held + len(hashes) > self.claim_budget_blocks
        if "budget_off_by_one" in self.faults:
            over_budget = held + len(hashes) >= self.claim_budget_blocks
        if over_budget and "half_admit" in self.faults and held < self.claim_budget_blocks:
            hashes = hashes[: self.claim_budget_blocks - held]
            over_budget = False
        cached = self.pool.lookup(hashes)
        plan = None if over_budget else self._plan_room(len(hashes) - len(cached), keep=set(cached))
        if over_budget or plan is None:
            reason = (
                f"claim budget: {held} of {self.claim_budget_blocks} blocks already claimed, "
                f"{len(hashes)} more requested"
                if over_budget
                else f"capacity: {len(hashes)} blocks cannot be made resident without evicting hard claims"
            )
            self._emit(EventType.CLAIM_REFUSED, request_id=request_id, cause=reason, blocks=len(hashes))
            raise ApiError(409, ErrorBody(type="no_admit", message="claim not admitted", reason=reason, request_id=request_id))

        claim_id = "claim" if "anonymous_claims" in self.faults else self._new_id("claim")
        ended = [c.claim_id for c in self.claims.values() if c.state in TERMINAL_STATES]
        if "reissue_ids" in self.faults and ended:
            claim_id = ended[-1]
        now = self.clock()
        claim = _Claim(
            claim_id=claim_id, strength=req.strength, hashes=hashes, demotable=req.demotable,
            ttl_s=req.ttl_s, expires_at=None if req.ttl_s is None else now + req.ttl_s,
            client_id=req.client_id, tenant=req.tenant,
        )
        self.claims[claim_id] = claim
        self._emit(EventType.CLAIM_ACCEPTED, claim_id=claim_id, from_state=None,
                   to_state=ClaimState.ACCEPTED, request_id=request_id, blocks=len(hashes))
        if self._take_fault("fail_next_materialization", claim_id):
            claim.reason = "materialization failed (injected)"
            self._transition(claim, EventType.CLAIM_MATERIALIZATION_FAILED, cause="injected", request_id=request_id)
            return self._claim_view(claim)

        self._make_room(plan, request_id)
        self.pool.touch(cached)
        new = self.pool.allocate(len(hashes) - len(cached))
        blocks = cached + new
        stored = [h for b, h in zip(new, hashes[len(cached):]) if self.pool.store(b, h)]
        if stored:
            self._emit(EventType.BLOCKS_STORED, request_id=request_id, blocks=len(stored), block_hashes=stored)
        pinned = blocks[:-1] if "false_resident" in self.faults else blocks
        self.pool.pin(pinned, claim_id, hard=req.strength == "hard")
        self.pool.release(blocks)
        self._transition(claim, EventType.CLAIM_MATERIALIZED, request_id=request_id, tier="device", blocks=len(hashes))
        if "false_resident" in self.faults and self.pool.blocks[blocks[-1]].evictable:
            self.pool.evict(blocks[-1])  # the unpinned last block is lost at once
        return self._claim_view(claim)

    def get_claim(self, claim_id: str) -> Claim:
        with self._lock:
            self._expire(reading=True)
            self._flush()
            if "unknown_claim_ok" in self.faults and claim_id not in self.claims:
                return Claim(claim_id=claim_id, state=ClaimState.RELEASED, strength="hard", blocks=1,
                             tokens=self.block_size, prefix_hash="0" * 16, resident_blocks=0,
                             tier="device", demotable=False)
            return self._claim_view(self._lookup_claim(claim_id))

    def release_claim(self, claim_id: str) -> Claim:
        with self._lock:
            try:
                self._expire()
                claim = self._lookup_claim(claim_id)
                if claim.state == ClaimState.RELEASED and "double_release_event" in self.faults:
                    self._emit(EventType.CLAIM_RELEASED, claim_id=claim_id, from_state=claim.state,
                               to_state=claim.state, cause="client")
                if claim.state not in TERMINAL_STATES:
                    if "release_leak" not in self.faults:
                        self.pool.unpin(claim_id)
                    claim.host_hashes = []
                    claim.reason = "released by its owner"
                    self._transition(claim, EventType.CLAIM_RELEASED, cause="client")
                return self._claim_view(claim)
            finally:
                self._flush()

    def list_claims(self) -> list[Claim]:
        with self._lock:
            self._expire()
            self._flush()
            return [self._claim_view(c) for c in self.claims.values()]

    def events(self, after: int = 0) -> EventPage:
        with self._lock:
            self._expire()
            self._flush()
            if "events_ignore_after" in self.faults:
                after = 0
            page = [e for e in self._events if e.seq > after or ("events_include_after" in self.faults and e.seq == after)]
            return EventPage(events=page, last_seq=self._events[-1].seq if self._events else 0)

    def pool_state(self) -> PoolState:
        with self._lock:
            self._expire()
            self._flush()
            claimed = {
                c.claim_id: len(self.pool.held_by(c.claim_id))
                for c in self._live() if c.tier == "device"
            }
            return PoolState(
                block_size=self.block_size,
                total_blocks=self.num_blocks,
                free_blocks=self.pool.num_free(),
                cached_blocks=self.pool.cached_unclaimed() + (
                    sum(len(self.pool.held_by(c.claim_id)) for c in self._live())
                    if "pool_overcount" in self.faults else 0),
                active_blocks=self.pool.active(),
                claimed_blocks=claimed,
                claim_budget_blocks=self.claim_budget_blocks,
                host_total_blocks=self.host_blocks,
                host_used_blocks=sum(len(c.host_hashes) for c in self._live()),
            )

    def inject_fault(self, req: FaultRequest) -> None:
        with self._lock:
            if not self.fault_injection:
                raise ApiError(501, ErrorBody(type="unsupported", message="fault injection is disabled"))
            if req.claim_id is not None:
                self._lookup_claim(req.claim_id)
            self._armed.append(req)

    def _take_fault(self, kind: str, claim_id: str) -> bool:
        for armed in self._armed:
            if armed.kind == kind and armed.claim_id in (None, claim_id):
                self._armed.remove(armed)
                return True
        return False

    def complete(self, req: CompletionRequest) -> Completion:
        try:
            with self._lock:
                try:
                    return self._complete(req)
                finally:
                    self._flush()
        except Parked as parked:
            self.park(parked.request_id)
            raise

    def _complete(self, req: CompletionRequest) -> Completion:
        self._expire()
        request_id = req.request_id or self._new_id("req")
        if req.claim_id is not None:
            self._lookup_claim(req.claim_id)
        prompt = list(req.prompt)
        needed = math.ceil((len(prompt) + req.max_tokens - 1) / self.block_size)
        if needed > self.num_blocks:
            raise ApiError(400, ErrorBody(
                type="capacity", request_id=request_id,
                message=f"request needs {needed} blocks; the pool has {self.num_blocks}",
            ))
        hashes = block_hashes(prompt, self.block_size)
        # Like vLLM, never serve the last prompt token from cache: it must be computed.
        reusable = min(len(hashes), (len(prompt) - 1) // self.block_size)
        hit = self.pool.lookup(hashes[:reusable])

        # Demoted claims this prompt extends past the device hit: restore them first.
        restoring = [
            c for c in self._live()
            if c.tier == "host" and len(c.hashes) > len(hit) and c.hashes == hashes[: len(c.hashes)]
            and len(c.hashes) <= reusable
        ]
        plan = self._plan_room(needed - len(hit), keep=set(hit))
        if plan is None:
            if "queue_blocked_requests" in self.faults:
                raise Parked(request_id)
            raise self._refusal(needed - len(hit), set(hit), request_id)
        self._make_room(plan, request_id)

        # Restore (or fail to restore) demoted claims, longest first; a restored claim's
        # blocks count as served from cache, a failed one's are recomputed.
        restored: set[str] = set()
        failures: list[ClaimFailure] = []
        for claim in sorted(restoring, key=lambda c: -len(c.hashes)):
            failed = self._take_fault("fail_next_restore", claim.claim_id)
            if failed and "recompute_as_reuse" not in self.faults:
                claim.host_hashes, claim.tier = [], "device"
                claim.reason = "restore failed (injected); prefix recomputed"
                self._transition(claim, EventType.CLAIM_RESTORE_FAILED, cause="injected",
                                 request_id=request_id, tier="host")
                failures.append(ClaimFailure(claim_id=claim.claim_id, reason=claim.reason))
            else:
                restored.add(claim.claim_id)

        self.pool.touch(hit)
        new = self.pool.allocate(needed - len(hit))
        blocks = hit + new
        stored = [h for b, h in zip(new, hashes[len(hit):]) if self.pool.store(b, h)]
        if stored:
            self._emit(EventType.BLOCKS_STORED, request_id=request_id, blocks=len(stored), block_hashes=stored)
        served = len(hit)
        for claim_id in restored:
            claim = self.claims[claim_id]
            claim.host_hashes, claim.tier = [], "device"
            self.pool.pin(blocks[: len(claim.hashes)], claim_id, hard=claim.strength == "hard")
            if "reuse_before_restore" in self.faults or "restore_after_reuse" in self.faults:
                claim.state = ClaimState.RESIDENT  # the lie: no restore event (yet)
            else:
                self._transition(claim, EventType.CLAIM_RESTORED, request_id=request_id,
                                 tier="device", blocks=len(claim.hashes))
            served = max(served, len(claim.hashes))

        # Attribute reuse to every live claim whose prefix this request was served from.
        reuse: list[ClaimReuse] = []
        candidates = list(self.claims.values()) if "ended_claims_reused" in self.faults else self._live()
        for claim in candidates:
            if claim.state != ClaimState.RESIDENT and claim.state not in TERMINAL_STATES:
                continue
            in_prompt = 0  # blocks of the claim the whole prompt contains
            for a, b in zip(claim.hashes, hashes):
                if a != b:
                    break
                in_prompt += 1
            shared = min(in_prompt, served)
            recomputed = in_prompt - shared  # the last-block rule: `reusable` stopped it
            if "reuse_past_last_block" in self.faults:
                shared, recomputed = in_prompt, 0
            if shared:
                credit = len(claim.hashes) if "partial_reuse_full_tokens" in self.faults else shared
                reuse.append(ClaimReuse(claim_id=claim.claim_id, tokens=credit * self.block_size,
                                        restored=claim.claim_id in restored,
                                        recomputed_tokens=recomputed * self.block_size))
                if claim.state == ClaimState.RESIDENT:
                    self._transition(claim, EventType.CLAIM_REUSED, request_id=request_id, blocks=shared)
        if "restore_after_reuse" in self.faults:
            for claim_id in restored:
                self._emit(EventType.CLAIM_RESTORED, claim_id=claim_id, from_state=ClaimState.DEMOTED,
                           to_state=ClaimState.RESIDENT, request_id=request_id, tier="device",
                           blocks=len(self.claims[claim_id].hashes))
        if "global_reuse_counter" in self.faults:
            reuse = []

        cached_tokens = served * self.block_size
        self.pool.release(blocks)
        self._emit(EventType.REQUEST_COMPLETED, request_id=request_id, blocks=needed,
                   cause="completed", blocking_claims=[])
        out = [(sum(prompt) + i) % 500 for i in range(req.max_tokens)]
        return Completion(
            id=f"cmpl-{request_id}",
            model=req.model or "rkv-reference",
            choices=[CompletionChoice(token_ids=out, text="")],
            usage=Usage(
                prompt_tokens=len(prompt),
                completion_tokens=req.max_tokens,
                total_tokens=len(prompt) + req.max_tokens,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            ),
            rkv=RkvCompletionRecord(request_id=request_id, reuse=reuse, failures=failures),
        )
