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

Tenants (RKV API v1.1): public methods take the caller's `tenant` (None: not scoped, i.e.
no tenancy, or the admin). A tenant's claims and prompts are salted with its name, so
equal prompts of two tenants share no blocks (vLLM's `cache_salt` does the same); a tenant
sees only its own claims, events and block hashes; another tenant affects it only through
pool arbitration (its hard claims may refuse my request, my request may harm its soft
claims), and then neither learns the other's claim ids or request ids.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from pytest_rkv.contract import (
    EVENT_PAGE_LIMIT,
    EVENT_TRANSITIONS,
    OTHER_TENANTS,
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
    "tenant_blind": "claim-isolation: tenants read, release and reuse each other's claims, one budget for all",
    "events_miscount_blocks": "ordered-lifecycle: claim.accepted and claim.materialized say one block fewer than the claim covers",
    "materialized_on_host": "ordered-lifecycle: claim.materialized reports the host tier",
    "events_without_requests": "ordered-lifecycle: events name no request",
    "stored_count_off": "ordered-lifecycle: blocks.stored says one block more than the hashes it lists",
    "refusal_event_disagrees": "active-refusal: the request.refused event says one block more than the refusal did",
    "unlocated_invalid": "materialization-predicate: a malformed claim's 422 does not say which field is wrong",
    "tenant_budget_only": "claim-isolation: only the tenant budgets are enforced; together the tenants may pass the global one",
    "refusal_names_other_tenants": "claim-isolation: a refusal names another tenant's blocking claim",
    "claims_for_other_tenants": "claim-isolation: a claim request naming another tenant is accepted as the caller's",
    "harm_names_foreign_request": "claim-isolation: a harm event names the other tenant's request id",
    "eviction_names_foreign_request": "claim-isolation: a blocks.evicted event names the other tenant's request id",
    "lists_other_tenants": "claim-isolation: GET /v1/kv/claims lists every tenant's claims",
    "pages_ignore_limit": "ordered-lifecycle: GET /v1/kv/events serves every event whatever its limit",
    "demotion_drops_soft_silently": "soft-harm: a demotion drops the blocks a soft claim shares with no harm event",
    "usage_miscounts": "reuse-attribution: usage.total_tokens leaves out the completion tokens",
    "demote_each_claim_once": "demotion-restore: each demotable claim is tried once, so two sharing a prefix are never both demoted",
    "demotion_frees_reused_blocks": "demotion-restore: a demotion also frees the blocks the demoting request reuses",
    "demoted_claims_reused": "demotion-restore: a demoted claim is credited with reuse of a prefix another claim served",
    "demotion_or_harm_not_both": "demotion-restore: a request that needs a demotion and a soft claim's blocks is refused",
    "claims_recompute_cached_prefix": "materialization-predicate: a claim needs fresh room for a prefix the pool already holds",
}
# The faults that only change the contents of events, applied where events are emitted.
_EVENT_CONTENT_FAULTS = frozenset({
    "events_miscount_blocks", "materialized_on_host", "events_without_requests", "stored_count_off",
    "refusal_event_disagrees",
})

EVERYONE = "*"  # owner of events every tenant sees (a reset)


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
    owner: str | None = None  # the tenant whose token created it (None: no tenancy)
    state: ClaimState = ClaimState.ACCEPTED
    ended_at: float | None = None  # when it reached a terminal state (for pruning)
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
        tenancy: bool = False,
        tenant_budget_blocks: int | None = None,
        event_retention: int = 10_000,
        claim_retention_s: float = 600.0,
        ended_claims_kept: int = 1_000,
    ) -> None:
        unknown = set(faults) - set(FAULT_MODES)
        if unknown:
            raise ValueError(
                f"unknown fault mode(s) {sorted(unknown)}; known: {', '.join(FAULT_MODES)}"
            )
        for name, value, least in (("blocks", num_blocks, 1), ("block size", block_size, 1),
                                   ("claim budget", claim_budget_blocks, 0), ("host blocks", host_blocks, 0),
                                   ("event retention", event_retention, 1), ("ended claims kept", ended_claims_kept, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if tenant_budget_blocks is not None and (not isinstance(tenant_budget_blocks, int) or tenant_budget_blocks < 1):
            raise ValueError(f"tenant budget must be a positive integer, got {tenant_budget_blocks!r}")
        if not (isinstance(claim_retention_s, (int, float)) and math.isfinite(claim_retention_s) and claim_retention_s >= 0):
            raise ValueError(f"claim retention must be a finite number of seconds >= 0, got {claim_retention_s!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.claim_budget_blocks, self.host_blocks = claim_budget_blocks, host_blocks
        self.clock, self.faults, self.fault_injection = clock, frozenset(faults), fault_injection
        self.park = park  # called, outside the lock, for a request the fault leaves unanswered
        self.tenancy, self.tenant_budget_blocks = tenancy, tenant_budget_blocks
        self.event_retention, self.claim_retention_s = event_retention, claim_retention_s
        self.ended_claims_kept = ended_claims_kept
        self._lock = threading.RLock()
        # seq and ids count for the runtime's whole life: a reset is an event, never a
        # renumbering, so a poller at `after=N` misses nothing and an old id never names a
        # new claim.
        self._seq = itertools.count(1)
        self._ids = itertools.count(1)
        self._events: deque[tuple[str | None, Event]] = deque(maxlen=event_retention)
        self._actor: str | None = None  # the tenant of the operation in progress
        self._clear()

    # ---------------------------------------------------------------- bookkeeping
    def _clear(self) -> None:
        self.pool = BlockPool(self.num_blocks, self.block_size)
        self.claims: dict[str, _Claim] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # ended claim ids, oldest first
        self._hash_owner: dict[str, str | None] = {}  # cached block hash -> tenant
        self._pending: list[dict] = []
        self._armed: list[FaultRequest] = []

    def reset(self) -> None:
        """Drop every claim, cached block and event; the log then starts with a
        `runtime.reset` event every tenant sees, numbered after the last one."""
        with self._lock:
            self._clear()
            self._events.clear()
            self._emit(EventType.RUNTIME_RESET, owner=EVERYONE, cause="reset")
            self._flush()

    def _emit(self, type_: EventType, owner: str | None = None, **fields) -> None:
        fields = self._distort(type_, fields)
        self._pending.append({"type": type_, "owner": owner if owner is not None else self._actor, **fields})

    def _distort(self, type_: EventType, fields: dict) -> dict:
        """An event's fields as the armed content faults misreport them (as they are, when
        none is armed)."""
        faults = self.faults & _EVENT_CONTENT_FAULTS
        if not faults:
            return fields
        fields = dict(fields)
        if "events_miscount_blocks" in faults and type_ in (EventType.CLAIM_ACCEPTED, EventType.CLAIM_MATERIALIZED):
            fields["blocks"] = fields.get("blocks", 0) - 1
        if "materialized_on_host" in faults and type_ == EventType.CLAIM_MATERIALIZED:
            fields["tier"] = "host"
        if "events_without_requests" in faults:
            fields.pop("request_id", None)
        if "stored_count_off" in faults and type_ == EventType.BLOCKS_STORED:
            fields["blocks"] = fields.get("blocks", 0) + 1
        if "refusal_event_disagrees" in faults and type_ == EventType.REQUEST_REFUSED:
            fields["blocks"] = fields.get("blocks", 0) + 1
        return fields

    def _transition(self, claim: _Claim, type_: EventType, **fields) -> None:
        _, to_state = EVENT_TRANSITIONS[type_]
        if fields.get("request_id") and self._foreign(claim.owner) and "harm_names_foreign_request" not in self.faults:
            fields["request_id"] = OTHER_TENANTS
        self._emit(type_, owner=claim.owner, claim_id=claim.claim_id, from_state=claim.state,
                   to_state=to_state, **fields)
        claim.state = to_state
        if to_state in TERMINAL_STATES:
            claim.ended_at = self.clock()
            self._ended[claim.claim_id] = None

    # ---------------------------------------------------------------- tenants
    def _isolated(self) -> bool:
        return "tenant_blind" not in self.faults

    def _foreign(self, owner: str | None) -> bool:
        """Is `owner` another tenant than the one acting now?"""
        return self._isolated() and self._actor is not None and owner != self._actor

    def _visible(self, owner: str | None, tenant: str | None) -> bool:
        return tenant is None or owner in (tenant, EVERYONE) or not self._isolated()

    def _salt(self, tenant: str | None) -> str | None:
        return tenant if self._isolated() else None

    def _prune(self) -> None:
        """Forget ended claims after the retention time, and beyond a count."""
        now = self.clock()
        while self._ended:
            claim_id = next(iter(self._ended))
            claim = self.claims.get(claim_id)
            old = claim is None or claim.ended_at is None or now - claim.ended_at >= self.claim_retention_s
            if not old and len(self._ended) <= self.ended_claims_kept:
                break
            del self._ended[claim_id]
            self.claims.pop(claim_id, None)

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
            owner = fields.pop("owner")
            self._events.append((owner, Event(seq=next(self._seq), ts=now, **fields)))
        self._pending = []
        self._actor = None

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _live(self) -> list[_Claim]:
        return [c for c in self.claims.values() if c.state not in TERMINAL_STATES]

    def _expire(self, reading: bool = False) -> None:
        self._prune()
        if "no_expiry" in self.faults or ("expire_on_read" in self.faults and not reading):
            return
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
        # Another tenant's claim does not exist for the caller: the same 404 as a bad id.
        if claim is None or self._foreign(claim.owner):
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
        # `keep`: the blocks the caller reuses; a demotion leaves them on the device
        plan = {"unclaimed": [], "demote": [], "soft": [], "keep": keep}
        room = free
        for b in unclaimed:
            if room >= needed:
                break
            plan["unclaimed"].append(b)
            room += 1
        if room < needed and "silent_evict_hard" not in self.faults:
            host_used = sum(len(c.host_hashes) for c in self._live())
            demoting: set[str] = set()
            freed: set[int] = set()
            # Until nothing more can be gained: a block two demotable claims share is freed
            # only once both are demoted, so a claim that frees nothing alone may free
            # blocks beside one chosen after it.
            progress = True
            while progress and room < needed:
                progress = False
                for claim in self._live():
                    if room >= needed:
                        break
                    if claim.claim_id in demoting or not (
                            claim.demotable and claim.tier == "device" and claim.state == ClaimState.RESIDENT):
                        continue
                    if host_used + len(claim.hashes) > self.host_blocks:
                        continue
                    # Only blocks that demoting frees count: a block another (non-demoted)
                    # hard claim also pins, or a running request uses, stays where it is.
                    gain = self._freed_by_demoting(claim.claim_id, demoting | {claim.claim_id}, keep) - freed
                    if gain:
                        demoting.add(claim.claim_id)
                        freed |= gain
                        plan["demote"].append(claim)
                        host_used += len(claim.hashes)
                        room += len(gain)
                        progress = True
                if "demote_each_claim_once" in self.faults:
                    break
        if plan["demote"] and "demotion_or_harm_not_both" in self.faults:
            return None
        for b in soft:
            if room >= needed:
                break
            if any(b in self.pool.held_by(c.claim_id) for c in plan["demote"]):
                continue
            plan["soft"].append(b)
            room += 1
        return plan if room >= needed else None

    def _freed_by_demoting(self, claim_id: str, demoting: set[str], keep: set[int]) -> set[int]:
        """Blocks of `claim_id` that become free once every claim in `demoting` is demoted:
        not kept, used by no running request, and pinned by no other hard claim."""
        return {
            b for b in self.pool.held_by(claim_id)
            if b not in keep and self.pool.blocks[b].ref == 0
            and self.pool.blocks[b].hard_holders <= demoting
        }

    def _make_room(self, plan: dict, request_id: str) -> None:
        evicted = [self.pool.evict(b) for b in plan["unclaimed"] if self.pool.blocks[b].evictable]
        if "silent_evict_hard" in self.faults:
            for b in plan["unclaimed"]:
                block = self.pool.blocks[b]
                if block.hard_holders:
                    block.hard_holders.clear()
                    evicted.append(self.pool.evict(b))
        self._evicted_events(evicted, request_id)
        harmed: dict[str, list[str]] = {}
        keep = plan["keep"]
        if "demotion_frees_reused_blocks" in self.faults:
            keep = set()
        for claim in plan["demote"]:
            claim.host_hashes = list(claim.hashes)
            for b in self.pool.held_by(claim.claim_id):  # soft claims sharing a dropped block
                block = self.pool.blocks[b]
                if "demotion_drops_soft_silently" in self.faults:
                    continue
                if block.hard_holders <= {claim.claim_id} and block.ref == 0 and b not in keep:
                    for holder in block.soft_holders - {claim.claim_id}:
                        harmed.setdefault(holder, []).append(block.hash)
            dropped = self.pool.drop_claim_blocks(claim.claim_id, keep=keep)
            for h in dropped:
                self._hash_owner.pop(h, None)
            claim.tier = "host"
            self._transition(
                claim, EventType.CLAIM_DEMOTED, cause="pressure", request_id=request_id,
                tier="host", blocks=len(dropped),
            )
        for b in plan["soft"]:
            block = self.pool.blocks[b]
            holders = set(block.soft_holders)
            block_hash = self.pool.evict(b)
            self._hash_owner.pop(block_hash, None)
            for claim_id in holders:
                harmed.setdefault(claim_id, []).append(block_hash)
        for claim_id, hashes in harmed.items():
            claim = self.claims[claim_id]
            self.pool.unpin(claim_id)
            if "no_harm_event" in self.faults:
                self._evicted_events(hashes, request_id)
                continue
            claim.reason = f"lost {len(hashes)} blocks to request {request_id}"
            lost = 1 if "harm_undercount" in self.faults else len(hashes)
            self._transition(
                claim, EventType.CLAIM_HARMED, cause="evicted_by_request",
                request_id=request_id, blocks=lost, block_hashes=hashes[:lost],
            )

    def _evicted_events(self, hashes: list[str], request_id: str) -> None:
        """One `blocks.evicted` per tenant whose blocks went, seen by that tenant only."""
        by_owner: dict[str | None, list[str]] = {}
        for h in hashes:
            by_owner.setdefault(self._hash_owner.pop(h, None), []).append(h)
        for owner, group in by_owner.items():
            rid = OTHER_TENANTS if self._foreign(owner) else request_id
            if "eviction_names_foreign_request" in self.faults:
                rid = request_id
            self._emit(EventType.BLOCKS_EVICTED, owner=owner, request_id=rid, blocks=len(group), block_hashes=group)

    def _refusal(self, needed: int, keep: set[int], request_id: str) -> ApiError:
        blockers = sorted(
            c.claim_id for c in self._live()
            if c.strength == "hard" and c.tier == "device" and set(self.pool.held_by(c.claim_id)) - keep
        )
        unclaimed, soft = self.pool.evictable(exclude=keep)
        claimed = {c: len(self.pool.held_by(c)) for c in blockers}
        # Other tenants' claims are counted, never named.
        foreign = [c for c in blockers if self._foreign(self.claims[c].owner)]
        if "refusal_names_other_tenants" in self.faults:
            foreign = []
        if foreign:
            blockers = [c for c in blockers if c not in foreign]
            claimed = {c: n for c, n in claimed.items() if c not in foreign}
            claimed[OTHER_TENANTS] = sum(len(self.pool.held_by(c)) for c in foreign)
        if "unattributed_refusal" in self.faults:
            blockers, claimed = [], {}
        if "blame_every_claim" in self.faults:
            blockers = sorted(c.claim_id for c in self._live())
        body = ErrorBody(
            type="active_refusal",
            message=(
                f"request {request_id} needs {needed} blocks; {self.pool.num_free()} free + "
                f"{len(unclaimed) + len(soft)} evictable; the rest is held by hard claims "
                f"{', '.join(blockers + ([OTHER_TENANTS] if foreign else [])) or '(unnamed)'}"
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
            tenancy=self.tenancy,
        )

    def _op(self, tenant: str | None, call, *args):
        """Run one operation as `tenant` under the lock; number its events at the end."""
        with self._lock:
            self._actor = tenant
            try:
                self._expire()
                return call(*args)
            finally:
                self._flush()

    def create_claim(self, req: ClaimRequest, tenant: str | None = None) -> Claim:
        return self._op(tenant, self._create_claim, req)

    def _create_claim(self, req: ClaimRequest) -> Claim:
        tenant = self._actor
        if tenant is not None and req.tenant not in (None, tenant) and "claims_for_other_tenants" not in self.faults:
            raise ApiError(403, ErrorBody(
                type="forbidden", message=f"tenant {req.tenant!r} is not the tenant of this token",
            ))
        hashes = block_hashes(list(req.prompt_token_ids), self.block_size, self._salt(tenant))
        request_id = self._new_id("claimreq")
        if not hashes:
            raise ApiError(422, ErrorBody(
                type="invalid_request",
                message=f"a claim must cover at least one full block of {self.block_size} tokens",
                fields=[] if "unlocated_invalid" in self.faults
                else [{"loc": ["prompt_token_ids"], "msg": "shorter than one block"}],
            ))
        held = sum(len(c.hashes) for c in self._live())
        room = self.claim_budget_blocks - held
        reason = None
        over_global = held + len(hashes) > self.claim_budget_blocks
        if "budget_off_by_one" in self.faults:
            over_global = held + len(hashes) >= self.claim_budget_blocks
        if "tenant_budget_only" in self.faults and tenant is not None:
            over_global = False
        if over_global:
            reason = (f"global claim budget: {held} of {self.claim_budget_blocks} blocks already claimed, "
                      f"{len(hashes)} more requested")
        elif tenant is not None and self.tenant_budget_blocks is not None and self._isolated():
            mine = sum(len(c.hashes) for c in self._live() if c.owner == tenant)
            room = self.tenant_budget_blocks - mine
            over_tenant = mine + len(hashes) > self.tenant_budget_blocks
            if "budget_off_by_one" in self.faults:
                over_tenant = mine + len(hashes) >= self.tenant_budget_blocks
            if over_tenant:
                reason = (f"tenant claim budget: tenant {tenant} holds {mine} of its {self.tenant_budget_blocks} "
                          f"blocks, {len(hashes)} more requested")
        if reason and "half_admit" in self.faults and room > 0:
            hashes, reason = hashes[:room], None
        cached = self.pool.lookup(hashes)
        fresh = len(hashes) - len(cached)
        if "claims_recompute_cached_prefix" in self.faults:
            fresh = len(hashes)
        plan = None if reason else self._plan_room(fresh, keep=set(cached))
        if reason or plan is None:
            reason = reason or f"capacity: {len(hashes)} blocks cannot be made resident without evicting hard claims"
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
            client_id=req.client_id, tenant=tenant or req.tenant, owner=tenant,
        )
        self.claims[claim_id] = claim
        self._emit(EventType.CLAIM_ACCEPTED, owner=tenant, claim_id=claim_id, from_state=None,
                   to_state=ClaimState.ACCEPTED, request_id=request_id, blocks=len(hashes))
        if self._take_fault("fail_next_materialization", claim_id):
            claim.reason = "materialization failed (injected)"
            self._transition(claim, EventType.CLAIM_MATERIALIZATION_FAILED, cause="injected", request_id=request_id)
            return self._claim_view(claim)

        self._make_room(plan, request_id)
        self.pool.touch(cached)
        new = self.pool.allocate(len(hashes) - len(cached))
        blocks = cached + new
        stored = self._store(new, hashes[len(cached):])
        if stored:
            self._emit(EventType.BLOCKS_STORED, request_id=request_id, blocks=len(stored), block_hashes=stored)
        pinned = blocks[:-1] if "false_resident" in self.faults else blocks
        self.pool.pin(pinned, claim_id, hard=req.strength == "hard")
        self.pool.release(blocks)
        self._transition(claim, EventType.CLAIM_MATERIALIZED, request_id=request_id, tier="device", blocks=len(hashes))
        if "false_resident" in self.faults and self.pool.blocks[blocks[-1]].evictable:
            self._hash_owner.pop(self.pool.evict(blocks[-1]), None)  # the unpinned last block is lost at once
        return self._claim_view(claim)

    def _store(self, block_ids: list[int], hashes: list[str]) -> list[str]:
        """Name freshly computed blocks; return the hashes that were new to the cache."""
        stored = [h for b, h in zip(block_ids, hashes) if self.pool.store(b, h)]
        for h in stored:
            self._hash_owner[h] = self._actor
        return stored

    def get_claim(self, claim_id: str, tenant: str | None = None) -> Claim:
        return self._op(tenant, self._get_claim, claim_id)

    def _get_claim(self, claim_id: str) -> Claim:
        self._expire(reading=True)  # (only the expire_on_read fault needs the read itself)
        if "unknown_claim_ok" in self.faults and claim_id not in self.claims:
            return Claim(claim_id=claim_id, state=ClaimState.RELEASED, strength="hard", blocks=1,
                         tokens=self.block_size, prefix_hash="0" * 16, resident_blocks=0,
                         tier="device", demotable=False)
        return self._claim_view(self._lookup_claim(claim_id))

    def release_claim(self, claim_id: str, tenant: str | None = None) -> Claim:
        return self._op(tenant, self._release_claim, claim_id)

    def _release_claim(self, claim_id: str) -> Claim:
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

    def list_claims(self, tenant: str | None = None) -> list[Claim]:
        shown = None if "lists_other_tenants" in self.faults else tenant
        return self._op(tenant, lambda: [self._claim_view(c) for c in self.claims.values()
                                         if self._visible(c.owner, shown)])

    def events(self, after: int = 0, limit: int = EVENT_PAGE_LIMIT, tenant: str | None = None) -> EventPage:
        """One page of the events `tenant` may see, with seq > `after` (see EventPage)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= EVENT_PAGE_LIMIT:
            raise ValueError(f"limit must be 1..{EVENT_PAGE_LIMIT}, got {limit!r}")
        return self._op(tenant, self._page, after, limit, tenant)

    def _page(self, after: int, limit: int, tenant: str | None) -> EventPage:
        self._flush()  # expiry events found just now belong on this page
        page: list[Event] = []
        more = False
        if "events_ignore_after" in self.faults:
            after = 0
        if "pages_ignore_limit" in self.faults:
            limit = len(self._events) + 1
        for owner, event in self._events:
            skip = event.seq < after if "events_include_after" in self.faults else event.seq <= after
            if skip or not self._visible(owner, tenant):
                continue
            if len(page) == limit:
                more = True
                break
            page.append(event)
        oldest = self._events[0][1].seq if self._events else 0
        return EventPage(events=page, last_seq=page[-1].seq if page else after, more=more, oldest_seq=oldest)

    def pool_state(self, tenant: str | None = None) -> PoolState:
        return self._op(tenant, self._pool_state, tenant)

    def _pool_state(self, tenant: str | None) -> PoolState:
        claimed = {
            c.claim_id: len(self.pool.held_by(c.claim_id))
            for c in self._live() if c.tier == "device" and self._visible(c.owner, tenant)
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
            tenant_budget_blocks=self.tenant_budget_blocks if self.tenancy else None,
        )

    def inject_fault(self, req: FaultRequest) -> None:
        """An admin operation: the caller is not scoped (the server checks the token)."""
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

    def complete(self, req: CompletionRequest, tenant: str | None = None) -> Completion:
        try:
            return self._op(tenant, self._complete, req)
        except Parked as parked:
            self.park(parked.request_id)  # outside the lock: a parked request blocks no one else
            raise

    def _complete(self, req: CompletionRequest) -> Completion:
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
        hashes = block_hashes(prompt, self.block_size, self._salt(self._actor))
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
        restored: list[str] = []  # in restore order (a set would iterate in a per-process order)
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
                restored.append(claim.claim_id)

        self.pool.touch(hit)
        new = self.pool.allocate(needed - len(hit))
        blocks = hit + new
        stored = self._store(new, hashes[len(hit):])
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
            skip = claim.state != ClaimState.RESIDENT and claim.state not in TERMINAL_STATES
            if "demoted_claims_reused" in self.faults and claim.state == ClaimState.DEMOTED:
                skip = False
            if skip:
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
                total_tokens=len(prompt) + (0 if "usage_miscounts" in self.faults else req.max_tokens),
                prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            ),
            rkv=RkvCompletionRecord(request_id=request_id, reuse=reuse, failures=failures),
        )
