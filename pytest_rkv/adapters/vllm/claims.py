"""The claim book: every claim decision the adapter makes, inside vLLM's engine core.

`ClaimCore` lives in the engine-core process, owned by `RkvScheduler`, and is only ever
called from the engine thread: from the scheduler hooks (`allocate`, `before_schedule`,
`pin_materialized`, `after_update`) and from engine utility calls (`handle`). So it takes
no locks and never races vLLM's own bookkeeping.

How each part of the contract maps onto vLLM's v1 KV cache (see docs/vllm-adapter.md):

* **Materialization** is a real prefill: a claim submits an internal request for its
  full blocks (`max_tokens=1`) straight into the scheduler. When the step that computed
  the prefix has run, the request's first k blocks are pinned *before* the request frees
  them: `BlockPool.touch` adds one reference per claim, and a block with a reference is
  never in the free queue, so vLLM cannot evict it. Release, expiry and harm drop the
  reference again (`BlockPool.free_blocks`, tail first, like vLLM frees a request).
* **Admission** goes through vLLM's own `allocate_slots`. Only when it says "does not fit"
  for a fresh request does the adapter look closer: if the request cannot fit even with
  every non-hard-claimed block free, hard claims are the reason and the request is
  refused (HTTP 409 via the engine output, plus a `request.refused` event); if unpinning
  soft claims would make it fit, they yield (their blocks go to the *tail* of the free
  queue, so unclaimed cache goes first) and every block they then lose is one attributed
  `claim.harmed` event; otherwise vLLM's ordinary queueing applies (it waits for running
  requests to finish).
* **Eviction attribution** uses the block pool's metrics-collector hook (`on_block_evicted`),
  active only while the adapter is allocating for a request, so an eviction is tied to
  the request that caused it.
* **Reuse attribution**: when a fresh request is admitted with prefix-cache hits, the hit
  blocks' hashes are compared with the resident claims whose first block hash matches
  (an index keyed by that hash), giving `claim.reused` and the response's `rkv.reuse`.

Cost per scheduler step, with no claims: one dict truthiness test per hook. With claims:
work proportional to the claims and blocks an admission actually touches (the index
lookup, the hit blocks, the soft claims that yield); nothing walks the block pool per step.
Two API answers do walk the pool, once per call: `GET /v1/kv/pool` and the arithmetic of a
refusal (how many blocks are free vs. evictable). See bench/README.md.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pytest_rkv.adapters.vllm import ADAPTER_VERSION
from pytest_rkv.adapters.vllm.config import AdapterConfig
from pytest_rkv.contract import (
    API_VERSION,
    EVENT_TRANSITIONS,
    TERMINAL_STATES,
    ClaimState,
    EventType,
)

_MASK64 = (1 << 64) - 1
_GROUP = 0  # the adapter supports exactly one KV cache group (full attention)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_hex(block_hash_with_group: bytes) -> str:
    """A block hash as the 16 hex digits vLLM's KV events carry (low 64 bits, group id
    stripped), so RKV events and vLLM's own block events name blocks the same way."""
    return f"{int.from_bytes(block_hash_with_group[:-4], 'big') & _MASK64:016x}"


def _reply(status: int, body: dict) -> dict:
    return {"status": status, "body": body}


def _error(status: int, type_: str, message: str, **extra) -> dict:
    return _reply(status, {"error": {"type": type_, "message": message, **extra}})


@dataclass(eq=False)
class Claim:
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
    request_id: str  # the claim request (claimreq-N), named by its events
    mat_id: str  # vLLM request id of the materializing prefill
    state: ClaimState = ClaimState.ACCEPTED
    reason: str | None = None
    blocks: list = field(default_factory=list)  # the KVCacheBlocks it pins (empty: none)
    fail_injected: bool = False
    fail_reason: str | None = None
    waiter: Future | None = None
    yield_snapshot: list | None = None


@dataclass(eq=False)
class Record:
    """What the adapter knows about one request it follows."""

    rkv_id: str  # the id clients and events use
    num_blocks: int = 0
    internal: bool = False  # a claim's materializing prefill
    claim_id: str | None = None  # the claim a completion named (informational)
    reuse: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    refused: bool = False


class EvictionObserver:
    """Sits in `BlockPool.metrics_collector` (the pool's own observation hook) and tells
    the claim core about every cached block the pool evicts. It forwards to vLLM's real
    collector, if one was configured (`--kv-cache-metrics`)."""

    def __init__(self, core: ClaimCore, inner: Any = None) -> None:
        self.core = core
        self.inner = inner
        self.sample_rate = getattr(inner, "sample_rate", 1.0)

    def on_block_allocated(self, block) -> None:
        if self.inner is not None:
            self.inner.on_block_allocated(block)

    def on_block_accessed(self, block) -> None:
        if self.inner is not None:
            self.inner.on_block_accessed(block)

    def on_block_evicted(self, block) -> None:  # called for every block the pool hands out
        if block.block_hash is not None:
            core = self.core
            if core.current is not None:
                core.evicted.append((block.block_id, block.block_hash))
            if block.block_id in core.pins:  # only vLLM's KV-load-failure path can do this
                core._pinned_block_lost(block)
        if self.inner is not None:
            self.inner.on_block_evicted(block)

    def reset(self) -> None:
        if self.inner is not None:
            self.inner.reset()

    def __getattr__(self, name: str):  # anything else vLLM may ask its collector
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


_FRESH_STATUSES: frozenset = frozenset()  # filled by bind_vllm() (RequestStatus members)


class ClaimCore:
    """The claim book of one scheduler. See the module docstring."""

    def __init__(self, scheduler: Any, config: AdapterConfig) -> None:
        bind_vllm()
        self.sched = scheduler
        self.config = config
        self.mgr = scheduler.kv_cache_manager
        self.pool = self.mgr.block_pool
        self.block_size: int = scheduler.block_size
        self.max_model_len: int = scheduler.max_model_len
        self.usable_blocks: int = self.pool.num_gpu_blocks - 1  # block 0 is vLLM's null block
        self.budget: int = config.budget_for(self.usable_blocks)
        self.unsupported: str | None = None
        if len(scheduler.kv_cache_config.kv_cache_groups) != 1:
            self.unsupported = ("claims need exactly one KV cache group (full attention); this "
                                f"model has {len(scheduler.kv_cache_config.kv_cache_groups)}")
        elif not self.mgr.enable_caching:
            self.unsupported = "claims need prefix caching (--enable-prefix-caching)"
        # The observer sits in the pool only while it is needed: permanently while any
        # block is pinned (to notice vLLM dropping a pinned block), and around a followed
        # request's allocation (to attribute evictions); otherwise vLLM's own collector
        # (normally None) is there and the pool pays nothing.
        self.inner_collector = self.pool.metrics_collector
        self.observer = EvictionObserver(self, self.inner_collector)
        self.tracked: dict[str, Record] = {}  # vLLM request id -> record (survives reset)
        self.refusals: dict[str, dict] = {}  # vLLM request id -> refusal body, to finish
        self.current: str | None = None  # request whose allocation is in progress
        self.evicted: list[tuple[int, bytes]] = []  # (block id, hash) evicted by it
        self._clear()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.claims: dict[str, Claim] = {}
        self.live: dict[str, Claim] = {}  # not in a terminal state
        self.pins: dict[int, int] = {}  # block id -> claim pins on it
        self.hard_pins: dict[int, int] = {}  # block id -> hard claim pins on it
        self.by_first: dict[bytes, set[str]] = {}  # first block hash -> resident claims
        self.expiry: list[tuple[float, int, str]] = []
        self.mat: dict[str, Claim] = {}  # vLLM request id -> claim being materialized
        self.events: list[dict] = []
        self.next_seq = 1
        self._ids = itertools.count(1)
        self._heap_ids = itertools.count()
        self.armed: list[dict] = []

    @property
    def engaged(self) -> bool:
        """Anything for the hooks to do? (False: every hook is a no-op.)"""
        return bool(self.live or self.tracked or self.refusals or self.mat)

    def _rid(self, vid: str) -> str:
        rec = self.tracked.get(vid)
        return rec.rkv_id if rec is not None else vid

    # ------------------------------------------------------------------ events
    def emit(self, type_: EventType, **fields: Any) -> None:
        event = {"seq": self.next_seq, "ts": time.time(), "type": type_.value}
        event.update(fields)
        self.next_seq += 1
        self.events.append(event)
        overflow = len(self.events) - self.config.max_events
        if overflow > 0:
            del self.events[:overflow]

    def _transition(self, claim: Claim, type_: EventType, **fields: Any) -> None:
        _, to_state = EVENT_TRANSITIONS[type_]
        self.emit(type_, claim_id=claim.claim_id, from_state=claim.state.value,
                  to_state=to_state.value, **fields)
        claim.state = to_state
        if to_state in TERMINAL_STATES:
            self._unindex(claim)
            self.live.pop(claim.claim_id, None)

    # ------------------------------------------------------------------ pins
    def _pin(self, claim: Claim, blocks: Sequence) -> None:
        self.pool.metrics_collector = self.observer
        self.pool.touch(blocks)
        hard = claim.strength == "hard"
        for b in blocks:
            self.pins[b.block_id] = self.pins.get(b.block_id, 0) + 1
            if hard:
                self.hard_pins[b.block_id] = self.hard_pins.get(b.block_id, 0) + 1
        claim.blocks = list(blocks)

    def _unpin(self, claim: Claim) -> list:
        blocks, claim.blocks = claim.blocks, []
        if not blocks:
            return blocks
        hard = claim.strength == "hard"
        for b in blocks:
            n = self.pins[b.block_id] - 1
            if n:
                self.pins[b.block_id] = n
            else:
                del self.pins[b.block_id]
            if hard:
                n = self.hard_pins[b.block_id] - 1
                if n:
                    self.hard_pins[b.block_id] = n
                else:
                    del self.hard_pins[b.block_id]
        # Tail first, the order vLLM frees a finished request in: under pressure a claim
        # that lost its protection loses its last blocks first.
        self.pool.free_blocks(reversed(blocks))
        if not self.pins and self.current is None:
            self.pool.metrics_collector = self.inner_collector
        return blocks

    def _index(self, claim: Claim) -> None:
        self.by_first.setdefault(claim.hashes[0], set()).add(claim.claim_id)

    def _unindex(self, claim: Claim) -> None:
        ids = self.by_first.get(claim.hashes[0]) if claim.hashes else None
        if ids is not None:
            ids.discard(claim.claim_id)
            if not ids:
                del self.by_first[claim.hashes[0]]

    # ------------------------------------------------------------------ time
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
            self._unpin(claim)
            claim.reason = f"ttl of {claim.ttl_s}s ran out"
            self._transition(claim, EventType.CLAIM_EXPIRED, cause="ttl")

    # ------------------------------------------------------------------ scheduler hooks
    def on_add(self, request: Any) -> None:
        """A request entered the scheduler: follow it if it came through the RKV route."""
        params = request.sampling_params
        extra = params.extra_args if params is not None else None
        if not extra:
            return
        rkv_id = extra.get("rkv_request_id")
        if rkv_id is None:
            return
        self.tracked[request.request_id] = Record(
            rkv_id=str(rkv_id), num_blocks=cdiv(request.num_prompt_tokens, self.block_size),
            claim_id=extra.get("rkv_claim_id"),
        )

    def before_schedule(self) -> None:
        self.tick()
        if self.tracked:  # requests aborted by their client since the last step
            gone = self.sched.finished_req_ids & self.tracked.keys()
            for vid in gone:
                self._finish_record(vid)

    def allocate(self, orig: Callable, request: Any, num_new_tokens: int, args: tuple,
                 kwargs: dict) -> Any:
        """`KVCacheManager.allocate_slots`, as the scheduler calls it, with claims."""
        vid = request.request_id
        if vid in self.refusals:
            return None
        if request.num_computed_tokens or request.status not in _FRESH_STATUSES:
            # A running request growing: nothing to decide (it can evict only unclaimed
            # cache, which vLLM's own block events show), and not worth a step's time.
            return orig(request, num_new_tokens, *args, **kwargs)
        hits = _hit_blocks(args, kwargs)
        yielded: list[Claim] = []
        self.current = vid
        self.pool.metrics_collector = self.observer
        try:
            result = orig(request, num_new_tokens, *args, **kwargs)
            if result is None:
                needed = cdiv(request.num_tokens, self.block_size) - len(hits)
                watermark = self.mgr.watermark_blocks if kwargs.get("has_scheduled_reqs", True) else 0
                if self.hard_pins:
                    hard_outside = len(self.hard_pins) - sum(1 for b in hits if b.block_id in self.hard_pins)
                    if needed + watermark > self.usable_blocks - hard_outside:
                        self._refuse(request, hits, needed, hard_outside)
                        return None
                yielded = self._yield_soft(hits, needed + watermark)
                if yielded:
                    result = orig(request, num_new_tokens, *args, **kwargs)
        finally:
            self._end_allocation(request, yielded)
        if result is not None and hits and self.by_first:
            self._attribute_reuse(request, hits)
        return result

    def allocate_followed(self, orig: Callable, request: Any, num_new_tokens: int, args: tuple,
                          kwargs: dict) -> Any:
        """No claims, so no decision to make: if a followed request is being admitted, tie
        the evictions its admission causes to it."""
        vid = request.request_id
        if request.num_computed_tokens or vid not in self.tracked:
            return orig(request, num_new_tokens, *args, **kwargs)
        self.current = vid
        self.pool.metrics_collector = self.observer
        result = orig(request, num_new_tokens, *args, **kwargs)
        self.current = None
        if not self.pins:
            self.pool.metrics_collector = self.inner_collector
        if self.evicted:
            self._end_allocation(request, ())
        return result

    def pin_materialized(self, scheduler_output: Any) -> None:
        """Before vLLM processes a step's output (and frees finished requests): pin the
        blocks of every claim whose materializing prefill has now been computed."""
        scheduled = scheduler_output.num_scheduled_tokens
        for vid, claim in list(self.mat.items()):
            request = self.sched.requests.get(vid)
            if request is None or vid not in scheduled or vid in self.refusals:
                continue
            if request.is_finished() or request.num_computed_tokens < claim.num_blocks * self.block_size:
                continue
            del self.mat[vid]
            blocks = self.mgr.get_blocks(vid).blocks[_GROUP][: claim.num_blocks]
            problem = None
            if len(blocks) < claim.num_blocks:
                problem = f"the prefill holds {len(blocks)} of the claim's {claim.num_blocks} blocks"
            else:
                bad = [i for i, (b, h) in enumerate(zip(blocks, claim.hashes)) if b.block_hash != h]
                if bad:
                    problem = f"{len(bad)} of its blocks are not cached under the claimed prefix hash"
            if claim.fail_injected:
                problem = "materialization failed (injected fault)"
            if claim.state != ClaimState.ACCEPTED:
                continue  # released while materializing
            if problem is not None:
                self._fail_materialization(claim, problem, cause="injected" if claim.fail_injected else "prefill")
                continue
            self._pin(claim, blocks)
            self._index(claim)
            self._transition(claim, EventType.CLAIM_MATERIALIZED, request_id=claim.request_id,
                             tier="device", blocks=claim.num_blocks)
            if claim.expires_at is not None:
                heapq.heappush(self.expiry, (claim.expires_at, next(self._heap_ids), claim.claim_id))
            self._resolve(claim)

    def after_update(self, outputs: dict) -> None:
        """After vLLM built a step's outputs: deliver refusals, settle materializations
        that ended without a pin, and record the outcome of finished requests."""
        if self.refusals:
            self._deliver_refusals(outputs)
        if self.mat:
            for vid, claim in list(self.mat.items()):
                request = self.sched.requests.get(vid)
                if request is not None and not request.is_finished():
                    continue
                del self.mat[vid]
                if claim.state == ClaimState.ACCEPTED:
                    status = request.status.name if request is not None else "finished"
                    self._fail_materialization(
                        claim, claim.fail_reason or f"the materializing prefill ended ({status}) "
                        "before the claimed prefix was computed", cause="prefill")
        if self.tracked:
            done = self.sched.finished_req_ids & self.tracked.keys()
            if done:
                attach: dict[str, dict] = {}
                for vid in done:
                    record = self._finish_record(vid)
                    if record is not None and (record.reuse or record.failures):
                        attach[vid] = {"request_id": record.rkv_id, "reuse": record.reuse,
                                       "failures": record.failures}
                if attach:
                    for eco in outputs.values():
                        for out in eco.outputs:
                            rkv = attach.get(out.request_id)
                            if rkv is not None:
                                out.kv_transfer_params = {**(out.kv_transfer_params or {}), "rkv": rkv}

    def _finish_record(self, vid: str) -> Record | None:
        record = self.tracked.pop(vid, None)
        if record is None or record.internal or record.refused:
            return record
        self.emit(EventType.REQUEST_COMPLETED, request_id=record.rkv_id, cause="completed",
                  blocks=record.num_blocks)
        return record

    # ------------------------------------------------------------------ decisions
    def _refuse(self, request: Any, hits: Sequence, needed: int, hard_outside: int) -> None:
        vid = request.request_id
        record = self.tracked.get(vid)
        rid = record.rkv_id if record is not None else vid
        hit_ids = {b.block_id for b in hits}
        blockers = sorted(
            c.claim_id for c in self.live.values()
            if c.strength == "hard" and any(b.block_id not in hit_ids for b in c.blocks)
        )
        free, evictable = self._free_and_evictable(hit_ids, hits)
        body = {
            "type": "active_refusal",
            "message": (
                f"request {rid} needs {needed} blocks; {free} free + {evictable} evictable; the "
                f"rest is held by hard claims {', '.join(blockers)} ({hard_outside} blocks), "
                "which the adapter will not evict"
            ),
            "request_id": rid,
            "blocking_claims": blockers,
            "needed_blocks": needed,
            "free_blocks": free,
            "evictable_blocks": evictable,
            "claimed_blocks": {cid: len(self.live[cid].blocks) for cid in blockers},
        }
        claim = self.mat.get(vid)
        if claim is not None:  # a claim's own prefill cannot evict other hard claims
            claim.fail_reason = (f"capacity: {needed} blocks cannot be made resident without "
                                 f"evicting hard claims {', '.join(blockers)}")
        else:
            self.emit(EventType.REQUEST_REFUSED, request_id=rid, cause="hard_claims",
                      blocking_claims=blockers, blocks=needed)
            if record is not None:
                record.refused = True
        self.refusals[vid] = body

    def _free_and_evictable(self, hit_ids: set[int], hits: Sequence) -> tuple[int, int]:
        """(truly free blocks, evictable blocks outside the hit): the refusal's arithmetic.
        Walks the pool once; only a refusal (or GET /pool) pays for it."""
        free = cached = 0
        soft = 0
        for b in self.pool.blocks[1:]:
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    free += 1
                elif b.block_id not in hit_ids:
                    cached += 1
            elif b.block_id not in self.hard_pins and b.ref_cnt == self.pins.get(b.block_id, -1) \
                    and b.block_id not in hit_ids:
                soft += 1
        return free, cached + soft

    def _yield_soft(self, hits: Sequence, need: int) -> list[Claim]:
        """Unpin the fewest soft claims (oldest first) that let the request fit; [] if
        even all of them would not (then vLLM's ordinary queueing applies)."""
        soft = [c for c in self.live.values() if c.strength == "soft" and c.blocks]
        if not soft:
            return []
        hit_ids = {b.block_id for b in hits}
        available = self.pool.get_num_free_blocks() - sum(1 for b in hits if b.ref_cnt == 0)
        refs: dict[int, int] = {}
        chosen: list[Claim] = []
        gain = 0
        for claim in soft:
            chosen.append(claim)
            for b in claim.blocks:
                left = refs.get(b.block_id, b.ref_cnt) - 1
                refs[b.block_id] = left
                if left == 0 and b.block_id not in hit_ids:
                    gain += 1
            if available + gain >= need:
                break
        else:
            return []
        for claim in chosen:
            claim.yield_snapshot = self._unpin(claim)
        return chosen

    def _end_allocation(self, request: Any, yielded: Sequence[Claim]) -> None:
        evicted, self.evicted = self.evicted, []
        self.current = None
        if not self.pins:
            self.pool.metrics_collector = self.inner_collector
        if not evicted and not yielded:
            return
        rid = self._rid(request.request_id)
        harmed: list[tuple[Claim, list[bytes]]] = []
        lost_ids: set[int] = set()
        for claim in yielded:
            snapshot, claim.yield_snapshot = claim.yield_snapshot or [], None
            lost = [(b.block_id, h) for b, h in zip(snapshot, claim.hashes) if b.block_hash != h]
            if lost:
                harmed.append((claim, [h for _, h in lost]))
                lost_ids.update(i for i, _ in lost)
            else:
                self._pin(claim, snapshot)  # nothing lost: protected again
        plain = [h for i, h in evicted if i not in lost_ids]
        if plain:  # (hashes stay raw bytes until someone reads the events)
            self.emit(EventType.BLOCKS_EVICTED, request_id=rid, blocks=len(plain), block_hashes=plain)
        for claim, hashes in harmed:
            claim.reason = f"lost {len(hashes)} blocks to request {rid}"
            self._transition(claim, EventType.CLAIM_HARMED, cause="evicted_by_request",
                             request_id=rid, blocks=len(hashes), block_hashes=hashes)

    def _attribute_reuse(self, request: Any, hits: Sequence) -> None:
        vid = request.request_id
        if vid in self.mat:
            return  # a claim's own prefill is not a reuse
        ids = self.by_first.get(hits[0].block_hash)
        if not ids:
            return
        record = self.tracked.get(vid)
        rid = record.rkv_id if record is not None else vid
        for claim_id in sorted(ids):
            claim = self.live.get(claim_id)
            if claim is None or claim.state != ClaimState.RESIDENT:
                continue
            shared = 0
            for b, h in zip(hits, claim.hashes):
                if b.block_hash != h:
                    break
                shared += 1
            if not shared:
                continue
            if record is not None:
                record.reuse.append({"claim_id": claim_id, "tokens": shared * self.block_size,
                                     "restored": False,
                                     "recomputed_tokens": self._recomputed(request, claim, shared)})
            self._transition(claim, EventType.CLAIM_REUSED, request_id=rid, blocks=shared)

    def _recomputed(self, request: Any, claim: Claim, shared: int) -> int:
        """Tokens of the claim the prompt contains past the hit: vLLM never serves a
        prompt's last token from cache, so a prompt ending at or inside the claimed prefix
        recomputes the block holding it (the last-block rule, contract.servable_blocks).
        A resident claim's blocks are all cached, so this is the only way the hit stops
        short of what the prompt shares with it: at most one block."""
        from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

        full = request.block_hashes  # every full block of the prompt
        if shared < claim.num_blocks and shared < len(full) and \
                make_block_hash_with_group_id(full[shared], _GROUP) == claim.hashes[shared]:
            return self.block_size
        return 0

    def _deliver_refusals(self, outputs: dict) -> None:
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
        from vllm.v1.request import RequestStatus

        refusals, self.refusals = self.refusals, {}
        for request in self.sched.finish_requests(list(refusals), RequestStatus.FINISHED_ABORTED):
            vid = request.request_id
            if vid in self.mat:
                continue  # a claim's prefill: the claim fails (after_update), no client waits
            body = refusals[vid]
            out = EngineCoreOutput(
                request_id=vid, new_token_ids=[], finish_reason=FinishReason.ABORT,
                kv_transfer_params={"rkv": {"request_id": body["request_id"], "refused": body}},
                events=request.take_events(), trace_headers=request.trace_headers,
            )
            eco = outputs.get(request.client_index)
            if eco is None:
                outputs[request.client_index] = EngineCoreOutputs(outputs=[out])
            else:
                eco.outputs.append(out)

    def _fail_materialization(self, claim: Claim, reason: str, cause: str) -> None:
        self._unpin(claim)
        claim.reason = reason
        self._transition(claim, EventType.CLAIM_MATERIALIZATION_FAILED, cause=cause,
                         request_id=claim.request_id)
        self._resolve(claim)

    def _pinned_block_lost(self, block: Any) -> None:
        """vLLM dropped the content of a pinned block (its KV-load-failure path evicts by
        id, references or not). The claims on it no longer hold: report, never hide."""
        for claim in [c for c in self.live.values() if any(b is block for b in c.blocks)]:
            self._unpin(claim)
            claim.reason = "vLLM evicted a pinned block (its KV-load-failure path)"
            if claim.state in (ClaimState.RESIDENT, ClaimState.DEMOTED):
                self._transition(claim, EventType.CLAIM_HARMED, cause="kv_load_failure", blocks=1,
                                 block_hashes=[block.block_hash])

    def _resolve(self, claim: Claim) -> None:
        waiter, claim.waiter = claim.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(_reply(201, self.view(claim)))

    # ------------------------------------------------------------------ API (utility calls)
    def handle(self, op: str, payload: dict, engine: Any) -> dict | Future:
        self.tick()
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            return _error(404, "not_found", f"no RKV operation {op!r}")
        return handler(payload or {}, engine)

    def view(self, claim: Claim) -> dict:
        return {
            "claim_id": claim.claim_id,
            "state": claim.state.value,
            "strength": claim.strength,
            "blocks": claim.num_blocks,
            "tokens": claim.num_blocks * self.block_size,
            "prefix_hash": claim.prefix_hash,
            "resident_blocks": len(claim.blocks),
            "tier": "device",
            "demotable": claim.demotable,
            "ttl_s": claim.ttl_s,
            "expires_at": claim.expires_at,
            "client_id": claim.client_id,
            "tenant": claim.tenant,
            "reason": claim.reason,
            "worker": None,
        }

    def _lookup(self, claim_id: str) -> Claim | dict:
        claim = self.claims.get(claim_id)
        if claim is None:
            return _error(404, "not_found", f"no claim {claim_id!r}")
        return claim

    def op_info(self, payload: dict, engine: Any) -> dict:
        import vllm

        return _reply(200, {
            "api_version": API_VERSION,
            "runtime": "vllm",
            "runtime_version": getattr(vllm, "__version__", "unknown"),
            "block_size": self.block_size,
            "total_blocks": self.usable_blocks,
            "fault_injection": self.config.fault_injection,
            "demotion": False,
            "routed": False,
            "adapter": {"name": "pytest-rkv vllm adapter", "version": ADAPTER_VERSION,
                        "depth": "adapter", "claim_budget_blocks": self.budget,
                        "unsupported": self.unsupported,
                        "demotion_unsupported": "vLLM's KV offload worker needs CUDA or XPU; "
                                                "this adapter has no host tier"},
        })

    def op_claim(self, payload: dict, engine: Any) -> dict | Future:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
        from vllm.v1.request import Request

        if self.unsupported:
            return _error(501, "unsupported", self.unsupported)
        tokens = list(payload["prompt_token_ids"])
        B = self.block_size
        k = len(tokens) // B
        rid = f"claimreq-{next(self._ids)}"
        if k == 0:
            return _error(422, "invalid_request",
                          f"a claim must cover at least one full block of {B} tokens",
                          fields=[{"loc": ["prompt_token_ids"], "msg": "shorter than one block"}])

        def refuse(reason: str) -> dict:
            self.emit(EventType.CLAIM_REFUSED, request_id=rid, cause=reason, blocks=k)
            return _error(409, "no_admit", "claim not admitted", reason=reason, request_id=rid)

        if k * B > self.max_model_len:
            return refuse(f"capacity: {k} blocks are longer than max_model_len {self.max_model_len}")
        held = sum(c.num_blocks for c in self.live.values())
        if held + k > self.budget:
            return refuse(f"claim budget: {held} of {self.budget} blocks already claimed, {k} more requested")

        mat_id = f"rkv-materialize-{rid}-{time.monotonic_ns()}"
        request = Request(
            request_id=mat_id, prompt_token_ids=tokens[: k * B],
            sampling_params=SamplingParams(max_tokens=1, temperature=0.0),
            pooling_params=None, arrival_time=time.time(), priority=0,
            block_hasher=engine.request_block_hasher,
        )
        hashes = [make_block_hash_with_group_id(h, _GROUP) for h in request.block_hashes[:k]]
        if len(hashes) < k:
            return _error(501, "unsupported", "vLLM computed no block hashes (prefix caching off?)")
        # Could the prefix ever be resident without evicting a hard claim?
        hits = self.mgr.get_computed_blocks(request)[0].blocks[_GROUP]
        hit_ids = {b.block_id for b in hits}
        needed = k - len(hits)
        hard_outside = len(self.hard_pins) - sum(1 for i in hit_ids if i in self.hard_pins)
        if needed > self.usable_blocks - hard_outside:
            return refuse(f"capacity: {k} blocks cannot be made resident without evicting hard claims")

        now = time.monotonic()
        ttl = payload.get("ttl_s")
        claim = Claim(
            claim_id=f"claim-{next(self._ids)}", strength=payload.get("strength", "hard"),
            num_blocks=k, hashes=hashes, prefix_hash=hash_hex(hashes[-1]),
            demotable=bool(payload.get("demotable", False)), ttl_s=ttl,
            expires_at=None if ttl is None else now + ttl,
            client_id=payload.get("client_id"), tenant=payload.get("tenant"),
            request_id=rid, mat_id=mat_id,
        )
        self.claims[claim.claim_id] = self.live[claim.claim_id] = claim
        self.emit(EventType.CLAIM_ACCEPTED, claim_id=claim.claim_id, from_state=None,
                  to_state=ClaimState.ACCEPTED.value, request_id=rid, blocks=k)
        claim.fail_injected = self._take_fault("fail_next_materialization", claim.claim_id)
        claim.waiter = Future()
        self.mat[mat_id] = claim
        self.tracked[mat_id] = Record(rkv_id=rid, num_blocks=k, internal=True, claim_id=claim.claim_id)
        engine.add_request(request)
        return claim.waiter

    def op_get(self, payload: dict, engine: Any) -> dict:
        claim = self._lookup(payload.get("claim_id", ""))
        return claim if isinstance(claim, dict) else _reply(200, self.view(claim))

    def op_list(self, payload: dict, engine: Any) -> dict:
        return _reply(200, {"claims": [self.view(c) for c in self.claims.values()]})

    def op_release(self, payload: dict, engine: Any) -> dict:
        from vllm.v1.request import RequestStatus

        claim = self._lookup(payload.get("claim_id", ""))
        if isinstance(claim, dict):
            return claim
        if claim.state not in TERMINAL_STATES:
            if claim.state == ClaimState.ACCEPTED and self.mat.pop(claim.mat_id, None) is not None:
                self.sched.finish_requests(claim.mat_id, RequestStatus.FINISHED_ABORTED)
            self._unpin(claim)
            claim.reason = "released by its owner"
            self._transition(claim, EventType.CLAIM_RELEASED, cause="client")
            self._resolve(claim)
        return _reply(200, self.view(claim))

    def op_events(self, payload: dict, engine: Any) -> dict:
        after = int(payload.get("after", 0))
        events = self.events
        if events:
            start = max(0, after + 1 - events[0]["seq"])  # seqs are contiguous
            page = [_public(e) for e in events[start:]]
        else:
            page = []
        return _reply(200, {"events": page, "last_seq": self.next_seq - 1})

    def op_pool(self, payload: dict, engine: Any) -> dict:
        free = cached = active = 0
        for b in self.pool.blocks[1:]:
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    free += 1
                else:
                    cached += 1
            elif b.ref_cnt > self.pins.get(b.block_id, 0):
                active += 1
        return _reply(200, {
            "block_size": self.block_size,
            "total_blocks": self.usable_blocks,
            "free_blocks": free,
            "cached_blocks": cached,
            "active_blocks": active,
            "claimed_blocks": {c.claim_id: len(c.blocks) for c in self.live.values() if c.blocks},
            "claim_budget_blocks": self.budget,
            "host_total_blocks": 0,
            "host_used_blocks": 0,
        })

    def op_reset(self, payload: dict, engine: Any) -> dict:
        """Drop every claim, the event log and the prefix cache. Fails (409, retry) while
        running requests still hold blocks, like vLLM's own /reset_prefix_cache."""
        from vllm.v1.request import RequestStatus

        for vid, claim in list(self.mat.items()):
            self.sched.finish_requests(vid, RequestStatus.FINISHED_ABORTED)
            self.tracked.pop(vid, None)
            claim.reason = "dropped by reset"
            self._resolve(claim)
        for claim in list(self.live.values()):
            self._unpin(claim)
        for claim in list(self.claims.values()):
            self._resolve(claim)
        self._clear()
        if not self.sched.reset_prefix_cache():
            return _error(409, "capacity", "running requests still hold KV blocks; retry the reset")
        return self.op_pool({}, engine)

    def op_fault(self, payload: dict, engine: Any) -> dict:
        if not self.config.fault_injection:
            return _error(501, "unsupported", "fault injection is disabled "
                          "(--additional-config '{\"rkv\": {\"fault_injection\": true}}')")
        kind = payload.get("kind")
        if kind != "fail_next_materialization":
            return _error(501, "unsupported", f"fault {kind!r} is not offered: this adapter has no "
                          "host tier, so nothing is ever restored")
        claim_id = payload.get("claim_id")
        if claim_id is not None and claim_id not in self.claims:
            return _error(404, "not_found", f"no claim {claim_id!r}")
        self.armed.append({"kind": kind, "claim_id": claim_id})
        return _reply(200, {"kind": kind, "claim_id": claim_id})

    def _take_fault(self, kind: str, claim_id: str) -> bool:
        for armed in self.armed:
            if armed["kind"] == kind and armed["claim_id"] in (None, claim_id):
                self.armed.remove(armed)
                return True
        return False


def _public(event: dict) -> dict:
    """An event as the API serves it: block hashes as vLLM's event hex strings."""
    hashes = event.get("block_hashes")
    if hashes and isinstance(hashes[0], bytes):
        return {**event, "block_hashes": [hash_hex(h) for h in hashes]}
    return event


def _hit_blocks(args: tuple, kwargs: dict) -> Sequence:
    """The prefix-cache hit `allocate_slots` was given (`new_computed_blocks`)."""
    blocks = kwargs.get("new_computed_blocks")
    if blocks is None and len(args) > 1:
        blocks = args[1]
    if blocks is None:
        return ()
    return blocks.blocks[_GROUP]


def bind_vllm() -> None:
    """Resolve the vLLM names the hot path compares against (once, lazily: importing this
    module must not import vLLM)."""
    global _FRESH_STATUSES
    if not _FRESH_STATUSES:
        from vllm.v1.request import RequestStatus

        _FRESH_STATUSES = frozenset({RequestStatus.WAITING, RequestStatus.PREEMPTED})
