"""The claim book: which claims exist, which vLLM blocks each one pins, and the event log.

It lives in the engine-core process, is called only from the engine thread (scheduler
hooks and engine utility calls), and so takes no locks. It knows vLLM's `BlockPool` only
through `touch` (one reference per pin) and `free_blocks` (drop it), and answers in the
contract's own models (`contract.Claim`, `contract.PoolState`).

Invariants (tests/vllm/test_vllm_adapter_units.py exercises them through vLLM's real pool):

1. `pins[b]` is the number of live claims whose `blocks` contain block id `b`, and each is
   one `BlockPool.touch` reference on `b`; `hard_pins[b]` counts the hard ones among them.
   So a pinned block has `ref_cnt >= pins[b]`, is never in vLLM's free queue, and is
   never evicted by vLLM's allocator.
2. A claim holds blocks (`blocks` non-empty) only while it is `resident`. An `accepted`,
   `demoted` or terminal claim holds none. A claim is `demoted` (tier `host`) only if it
   was `backed` when demoted: the host tier had confirmed storing every block of it.
3. `by_first[h]` is the set of ids of non-terminal claims that have materialized and whose
   first block hash is `h` (the reuse index): entered at materialization, left at the
   terminal transition.
4. `live` holds exactly the claims not in a terminal state; `claims` every claim since
   the last reset (terminal ones answer `GET` until then).
5. Event `seq`s are contiguous from 1; a lifecycle event is emitted only through
   `transition`, which checks the move against `contract.EVENT_TRANSITIONS` and sets the
   claim's state to its target in the same call.
6. The expiry heap may hold stale entries (claims already released or failed): they are
   skipped when popped, never acted on.
7. Tenants (when the API server has them): every event has an owner, the tenant it is
   about (a claim's owner, a request's tenant, the tenant whose blocks were evicted); a
   tenant's page holds only its own events, and an event about one tenant's claim or
   blocks never names another tenant's request (`OTHER_TENANTS` stands in). A claim is
   visible (get, release, list, pool) only to its owner. Owner None: no tenancy, or a
   caller that sees everything (the admin).

NOTE: while any block is pinned, the pool's `metrics_collector` slot holds the eviction
observer (`watch`), so vLLM dropping a pinned block's content (its KV-load-failure path,
which evicts by id) is noticed and reported as harm instead of passing silently.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pytest_rkv.contract import (
    EVENT_PAGE_LIMIT,
    EVENT_TRANSITIONS,
    TERMINAL_STATES,
    Claim as ClaimModel,
    ClaimState,
    EventType,
    PoolState,
    Tier,
)

_MASK64 = (1 << 64) - 1


def visible(owner: str | None, tenant: str | None) -> bool:
    """May `tenant` (None: not tenant-scoped) see what `owner` owns?"""
    return tenant is None or owner == tenant


def hash_hex(block_hash_with_group: bytes) -> str:
    """A block hash as the 16 hex digits vLLM's KV events carry (low 64 bits, group id
    stripped), so RKV events and vLLM's own block events name blocks the same way."""
    return f"{int.from_bytes(block_hash_with_group[:-4], 'big') & _MASK64:016x}"


@dataclass(eq=False)
class Claim:
    """One claim's book entry (its public form is `view()`, a `contract.Claim`)."""

    claim_id: str
    strength: str
    num_blocks: int
    hashes: list[bytes]  # BlockHashWithGroupId of each covered block (the predicate)
    prefix_hash: str
    demotable: bool
    ttl_s: float | None
    expires_at: float | None
    client_id: str | None
    tenant: str | None
    owner: str | None  # the tenant whose token made it (None: no tenancy)
    request_id: str  # the claim request (claimreq-N), named by its events
    mat_id: str  # vLLM request id of the materializing prefill
    state: ClaimState = ClaimState.ACCEPTED
    tier: Tier = "device"
    reason: str | None = None
    blocks: list = field(default_factory=list)  # the KVCacheBlocks it pins (empty: none)
    # The host tier confirmed it stores every block (the materializing request's stores
    # completed): only a backed claim may be demoted.
    backed: bool = False
    fail_injected: bool = False
    fail_reason: str | None = None
    waiter: Future | None = None  # the POST /claims answer, resolved at materialization
    yield_snapshot: list | None = None


class ClaimBook:
    """Claims, pins, the reuse index, the TTL heap and the event log. See the module
    docstring for the invariants."""

    def __init__(self, pool: Any, block_size: int, max_events: int, worker: str | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_events = max_events
        # In a routed deployment, this engine's worker name: ids start with it (so they are
        # unique across workers) and claims, reuse records and events name it.
        self.worker = worker
        self.where: dict[str, str] = {"worker": worker} if worker else {}
        self.inner_collector = pool.metrics_collector  # vLLM's own (normally None)
        self.observer: Any = None  # set by the owner: who watches evictions while pinned
        self.allocating: str | None = None  # vLLM id of the request being allocated, if any
        self.clear()

    def clear(self) -> None:
        self.claims: dict[str, Claim] = {}
        self.live: dict[str, Claim] = {}
        self.pins: dict[int, int] = {}
        self.hard_pins: dict[int, int] = {}
        self.by_first: dict[bytes, set[str]] = {}
        self.expiry: list[tuple[float, int, str]] = []
        self.events: list[dict] = []
        self.next_seq = 1
        self._ids = itertools.count(1)  # claim and claim-request ids restart with the log
        self._heap_ids = itertools.count()

    def new_id(self, prefix: str) -> str:
        n = next(self._ids)
        return f"{self.worker}-{prefix}-{n}" if self.worker else f"{prefix}-{n}"

    def held_blocks(self, owner: str | None = None) -> int:
        """Blocks claimed by live claims (the claim budget's measure), or by one tenant's."""
        return sum(c.num_blocks for c in self.live.values() if owner is None or c.owner == owner)

    # -- events ----------------------------------------------------------------------
    def emit(self, type_: EventType, owner: str | None = None, **fields: Any) -> None:
        event = {"seq": self.next_seq, "ts": time.time(), "type": type_.value, "_owner": owner}
        event.update(fields)
        event.update(self.where)
        self.next_seq += 1
        self.events.append(event)
        overflow = len(self.events) - self.max_events
        if overflow > 0:
            del self.events[:overflow]

    def transition(self, claim: Claim, type_: EventType, **fields: Any) -> None:
        from_states, to_state = EVENT_TRANSITIONS[type_]
        assert claim.state in from_states, (
            f"{type_.value} cannot leave {claim.state.value} (claim {claim.claim_id})")
        self.emit(type_, owner=claim.owner, claim_id=claim.claim_id, from_state=claim.state.value,
                  to_state=to_state.value, **fields)
        claim.state = to_state
        if to_state in TERMINAL_STATES:
            self.unindex(claim)
            self.live.pop(claim.claim_id, None)

    def page(self, after: int, limit: int = EVENT_PAGE_LIMIT, tenant: str | None = None) -> dict:
        """`GET /v1/kv/events?after=&limit=`: at most `limit` events with seq > after that
        `tenant` may see, and whether more wait (seqs are contiguous, so the start is
        arithmetic; a tenant's view skips the others' events)."""
        events = self.events
        start = max(0, after + 1 - events[0]["seq"]) if events else 0
        if tenant is None:
            chosen = events[start:start + limit]
            more = start + limit < len(events)
        else:
            chosen, more = [], False
            for event in events[start:]:
                if not visible(event["_owner"], tenant):
                    continue
                if len(chosen) == limit:
                    more = True
                    break
                chosen.append(event)
        return {"events": [_public(e) for e in chosen],
                "last_seq": chosen[-1]["seq"] if chosen else after,
                "more": more,
                "oldest_seq": events[0]["seq"] if events else 0}

    # -- pins --------------------------------------------------------------------------
    def pin(self, claim: Claim, blocks: Sequence) -> None:
        self.watch()
        self.pool.touch(blocks)
        hard = claim.strength == "hard"
        for b in blocks:
            self.pins[b.block_id] = self.pins.get(b.block_id, 0) + 1
            if hard:
                self.hard_pins[b.block_id] = self.hard_pins.get(b.block_id, 0) + 1
        claim.blocks = list(blocks)

    def unpin(self, claim: Claim) -> list:
        blocks, claim.blocks = claim.blocks, []
        if not blocks:
            return blocks
        hard = claim.strength == "hard"
        for b in blocks:
            _decrement(self.pins, b.block_id)
            if hard:
                _decrement(self.hard_pins, b.block_id)
        # Tail first, the order vLLM frees a finished request in: under pressure a claim
        # that lost its protection loses its last blocks first.
        self.pool.free_blocks(reversed(blocks))
        self.unwatch()
        return blocks

    def watch(self) -> None:
        self.pool.metrics_collector = self.observer

    def unwatch(self) -> None:
        """Give vLLM its own collector back once nothing needs watching."""
        if not self.pins and self.allocating is None:
            self.pool.metrics_collector = self.inner_collector

    def claims_on(self, block: Any) -> list[Claim]:
        return [c for c in self.live.values() if any(b is block for b in c.blocks)]

    # -- the reuse index ---------------------------------------------------------------
    def index(self, claim: Claim) -> None:
        self.by_first.setdefault(claim.hashes[0], set()).add(claim.claim_id)

    def unindex(self, claim: Claim) -> None:
        ids = self.by_first.get(claim.hashes[0]) if claim.hashes else None
        if ids is not None:
            ids.discard(claim.claim_id)
            if not ids:
                del self.by_first[claim.hashes[0]]

    # -- time --------------------------------------------------------------------------
    def schedule_expiry(self, claim: Claim) -> None:
        if claim.expires_at is not None:
            heapq.heappush(self.expiry, (claim.expires_at, next(self._heap_ids), claim.claim_id))

    def tick(self) -> None:
        """Expire claims whose TTL ran out (a heap: O(1) when nothing is due)."""
        if not self.expiry or self.expiry[0][0] > time.monotonic():
            return
        now = time.monotonic()
        while self.expiry and self.expiry[0][0] <= now:
            _, _, claim_id = heapq.heappop(self.expiry)
            claim = self.live.get(claim_id)
            if claim is None or claim.state not in (ClaimState.RESIDENT, ClaimState.DEMOTED):
                continue
            self.unpin(claim)
            claim.reason = f"ttl of {claim.ttl_s}s ran out"
            self.transition(claim, EventType.CLAIM_EXPIRED, cause="ttl")

    # -- answers -----------------------------------------------------------------------
    def view(self, claim: Claim) -> dict:
        return ClaimModel(
            claim_id=claim.claim_id, state=claim.state, strength=claim.strength,
            blocks=claim.num_blocks, tokens=claim.num_blocks * self.block_size,
            prefix_hash=claim.prefix_hash, resident_blocks=len(claim.blocks), tier=claim.tier,
            demotable=claim.demotable, ttl_s=claim.ttl_s, expires_at=claim.expires_at,
            client_id=claim.client_id, tenant=claim.tenant, reason=claim.reason, worker=self.worker,
        ).model_dump(mode="json")

    def host_blocks(self) -> int:
        """Distinct blocks demoted claims keep in the host tier (nested claims share some)."""
        return len({h for c in self.live.values() if c.state == ClaimState.DEMOTED for h in c.hashes})

    def pool_state(self, usable_blocks: int, budget: int, host_total: int = 0, tenant: str | None = None,
                   tenant_budget: int | None = None) -> dict:
        """`GET /v1/kv/pool`. Walks vLLM's pool once (block 0 is its null block). The host
        side counts what demoted claims keep there, not what else the tier caches."""
        free = cached = active = 0
        for b in self.pool.blocks[1:]:
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    free += 1
                else:
                    cached += 1
            elif b.ref_cnt > self.pins.get(b.block_id, 0):
                active += 1
        return PoolState(
            block_size=self.block_size, total_blocks=usable_blocks, free_blocks=free,
            cached_blocks=cached, active_blocks=active,
            claimed_blocks={c.claim_id: len(c.blocks) for c in self.live.values()
                            if c.blocks and visible(c.owner, tenant)},
            claim_budget_blocks=budget, host_total_blocks=host_total,
            host_used_blocks=self.host_blocks() if host_total else 0, tenant_budget_blocks=tenant_budget,
        ).model_dump(mode="json")


def _decrement(counts: dict[int, int], key: int) -> None:
    n = counts[key] - 1
    if n:
        counts[key] = n
    else:
        del counts[key]


def _public(event: dict) -> dict:
    """An event as the API serves it: block hashes as vLLM's event hex strings."""
    public = {k: v for k, v in event.items() if k != "_owner"}
    hashes = public.get("block_hashes")
    if hashes and isinstance(hashes[0], bytes):
        public["block_hashes"] = [hash_hex(h) for h in hashes]
    return public
