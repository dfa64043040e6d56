"""Admission: the scheduler hooks, where the adapter decides with vLLM's own numbers.

`Admission` is called by `RkvScheduler` in the engine thread: `on_add` (a request
arrives), `before_schedule` (expiry, client aborts), `allocate` (around vLLM's
`KVCacheManager.allocate_slots`, the one place vLLM decides whether a request fits),
`pin_materialized` (a claim's prefill has been computed, before vLLM frees it) and
`after_update` (refusals delivered, finished requests recorded). It changes claims only
through the `ClaimBook` (see book.py for the book's invariants).

Invariants:

1. vLLM decides first. The adapter looks closer only when `allocate_slots` said "does not
   fit" for a fresh request (waiting or preempted, nothing computed yet).
2. A request is refused (`request.refused` naming every blocking hard claim, HTTP 409)
   only when it could not fit even with every block not held by a hard claim free:
   `needed + watermark > usable - hard-pinned blocks outside its prefix hit`.
3. Soft claims yield only when that makes the request fit (the fewest, oldest first); a
   yielded claim that then lost a block is `harmed` in one event naming the request and
   every lost block hash; one that lost nothing is pinned again in the same call.
4. An eviction is attributed only to the request whose allocation caused it (the observer
   records evictions only while `book.allocating` names a request).
5. `claim.reused` is emitted only for a resident claim whose first block is the first
   hit block of an admitted request, with the count of leading blocks that match.
6. A claim leaves `accepted` exactly once: `materialized` with its blocks pinned when the
   step that computed all of them has run and every block carries the claimed hash, or
   `materialization_failed` (holding nothing) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_rkv.adapters.vllm.book import Claim, ClaimBook
from pytest_rkv.contract import ClaimState, EventType

GROUP = 0  # the adapter supports exactly one KV cache group (full attention)

_FRESH_STATUSES: frozenset = frozenset()  # filled by bind_vllm() (RequestStatus members)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reply(status: int, body: dict) -> dict:
    return {"status": status, "body": body}


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
    admission about every cached block the pool evicts. It forwards to vLLM's real
    collector, if one was configured (`--kv-cache-metrics`)."""

    def __init__(self, admission: "Admission", inner: Any = None) -> None:
        self.admission = admission
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
            admission = self.admission
            if admission.book.allocating is not None:
                admission.evicted.append((block.block_id, block.block_hash))
            if block.block_id in admission.book.pins:  # only vLLM's KV-load-failure path can do this
                admission.pinned_block_lost(block)
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


class Admission:
    """The scheduler-side half of the adapter. See the module docstring."""

    def __init__(self, scheduler: Any, book: ClaimBook, usable_blocks: int) -> None:
        bind_vllm()
        self.sched = scheduler
        self.book = book
        self.mgr = scheduler.kv_cache_manager
        self.pool = self.mgr.block_pool
        self.block_size: int = scheduler.block_size
        self.usable_blocks = usable_blocks
        book.observer = EvictionObserver(self, book.inner_collector)
        self.tracked: dict[str, Record] = {}  # vLLM request id -> record (survives reset)
        self.refusals: dict[str, dict] = {}  # vLLM request id -> refusal body, to finish
        self.mat: dict[str, Claim] = {}  # vLLM request id -> claim being materialized
        self.evicted: list[tuple[int, bytes]] = []  # (block id, hash) evicted by `allocating`

    @property
    def engaged(self) -> bool:
        """Anything for the hooks to do? (False: every hook is a no-op.)"""
        return bool(self.book.live or self.tracked or self.refusals or self.mat)

    def rkv_id(self, vid: str) -> str:
        rec = self.tracked.get(vid)
        return rec.rkv_id if rec is not None else vid

    # -- scheduler hooks -----------------------------------------------------------------
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
        self.book.tick()
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
        book = self.book
        hits = _hit_blocks(args, kwargs)
        yielded: list[Claim] = []
        book.allocating = vid
        book.watch()
        try:
            result = orig(request, num_new_tokens, *args, **kwargs)
            if result is None:
                needed = cdiv(request.num_tokens, self.block_size) - len(hits)
                watermark = self.mgr.watermark_blocks if kwargs.get("has_scheduled_reqs", True) else 0
                if book.hard_pins:
                    hard_outside = len(book.hard_pins) - sum(1 for b in hits if b.block_id in book.hard_pins)
                    if needed + watermark > self.usable_blocks - hard_outside:
                        self._refuse(request, hits, needed, hard_outside)
                        return None
                yielded = self._yield_soft(hits, needed + watermark)
                if yielded:
                    result = orig(request, num_new_tokens, *args, **kwargs)
        finally:
            self._end_allocation(request, yielded)
        if result is not None and hits and book.by_first:
            self._attribute_reuse(request, hits)
        return result

    def allocate_followed(self, orig: Callable, request: Any, num_new_tokens: int, args: tuple,
                          kwargs: dict) -> Any:
        """No claims, so no decision to make: if a followed request is being admitted, tie
        the evictions its admission causes to it."""
        vid = request.request_id
        if request.num_computed_tokens or vid not in self.tracked:
            return orig(request, num_new_tokens, *args, **kwargs)
        book = self.book
        book.allocating = vid
        book.watch()
        result = orig(request, num_new_tokens, *args, **kwargs)
        book.allocating = None
        book.unwatch()
        if self.evicted:
            self._end_allocation(request, ())
        return result

    def pin_materialized(self, scheduler_output: Any) -> None:
        """Before vLLM processes a step's output (and frees finished requests): pin the
        blocks of every claim whose materializing prefill has now been computed."""
        scheduled = scheduler_output.num_scheduled_tokens
        book = self.book
        for vid, claim in list(self.mat.items()):
            request = self.sched.requests.get(vid)
            if request is None or vid not in scheduled or vid in self.refusals:
                continue
            if request.is_finished() or request.num_computed_tokens < claim.num_blocks * self.block_size:
                continue
            del self.mat[vid]
            blocks = self.mgr.get_blocks(vid).blocks[GROUP][: claim.num_blocks]
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
                self.fail_materialization(claim, problem, cause="injected" if claim.fail_injected else "prefill")
                continue
            book.pin(claim, blocks)
            book.index(claim)
            book.transition(claim, EventType.CLAIM_MATERIALIZED, request_id=claim.request_id,
                            tier="device", blocks=claim.num_blocks)
            book.schedule_expiry(claim)
            self.resolve(claim)

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
                    self.fail_materialization(
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
        self.book.emit(EventType.REQUEST_COMPLETED, request_id=record.rkv_id, cause="completed",
                       blocks=record.num_blocks)
        return record

    # -- decisions -----------------------------------------------------------------------
    def _refuse(self, request: Any, hits: Sequence, needed: int, hard_outside: int) -> None:
        vid = request.request_id
        record = self.tracked.get(vid)
        rid = record.rkv_id if record is not None else vid
        hit_ids = {b.block_id for b in hits}
        live = self.book.live
        blockers = sorted(
            c.claim_id for c in live.values()
            if c.strength == "hard" and any(b.block_id not in hit_ids for b in c.blocks)
        )
        free, evictable = self._free_and_evictable(hit_ids)
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
            "claimed_blocks": {cid: len(live[cid].blocks) for cid in blockers},
        }
        claim = self.mat.get(vid)
        if claim is not None:  # a claim's own prefill cannot evict other hard claims
            claim.fail_reason = (f"capacity: {needed} blocks cannot be made resident without "
                                 f"evicting hard claims {', '.join(blockers)}")
        else:
            self.book.emit(EventType.REQUEST_REFUSED, request_id=rid, cause="hard_claims",
                           blocking_claims=blockers, blocks=needed)
            if record is not None:
                record.refused = True
        self.refusals[vid] = body

    def _free_and_evictable(self, hit_ids: set[int]) -> tuple[int, int]:
        """(truly free blocks, evictable blocks outside the hit): the refusal's arithmetic.
        Walks the pool once; only a refusal (or GET /pool) pays for it."""
        book = self.book
        free = cached = soft = 0
        for b in self.pool.blocks[1:]:
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    free += 1
                elif b.block_id not in hit_ids:
                    cached += 1
            elif b.block_id not in book.hard_pins and b.ref_cnt == book.pins.get(b.block_id, -1) \
                    and b.block_id not in hit_ids:
                soft += 1
        return free, cached + soft

    def _yield_soft(self, hits: Sequence, need: int) -> list[Claim]:
        """Unpin the fewest soft claims (oldest first) that let the request fit; [] if
        even all of them would not (then vLLM's ordinary queueing applies)."""
        soft = [c for c in self.book.live.values() if c.strength == "soft" and c.blocks]
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
            claim.yield_snapshot = self.book.unpin(claim)
        return chosen

    def _end_allocation(self, request: Any, yielded: Sequence[Claim]) -> None:
        book = self.book
        evicted, self.evicted = self.evicted, []
        book.allocating = None
        book.unwatch()
        if not evicted and not yielded:
            return
        rid = self.rkv_id(request.request_id)
        harmed: list[tuple[Claim, list[bytes]]] = []
        lost_ids: set[int] = set()
        for claim in yielded:
            snapshot, claim.yield_snapshot = claim.yield_snapshot or [], None
            lost = [(b.block_id, h) for b, h in zip(snapshot, claim.hashes) if b.block_hash != h]
            if lost:
                harmed.append((claim, [h for _, h in lost]))
                lost_ids.update(i for i, _ in lost)
            else:
                book.pin(claim, snapshot)  # nothing lost: protected again
        plain = [h for i, h in evicted if i not in lost_ids]
        if plain:  # (hashes stay raw bytes until someone reads the events)
            book.emit(EventType.BLOCKS_EVICTED, request_id=rid, blocks=len(plain), block_hashes=plain)
        for claim, hashes in harmed:
            claim.reason = f"lost {len(hashes)} blocks to request {rid}"
            book.transition(claim, EventType.CLAIM_HARMED, cause="evicted_by_request",
                            request_id=rid, blocks=len(hashes), block_hashes=hashes)

    def _attribute_reuse(self, request: Any, hits: Sequence) -> None:
        vid = request.request_id
        if vid in self.mat:
            return  # a claim's own prefill is not a reuse
        book = self.book
        ids = book.by_first.get(hits[0].block_hash)
        if not ids:
            return
        record = self.tracked.get(vid)
        rid = record.rkv_id if record is not None else vid
        for claim_id in sorted(ids):
            claim = book.live.get(claim_id)
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
            book.transition(claim, EventType.CLAIM_REUSED, request_id=rid, blocks=shared)

    def _recomputed(self, request: Any, claim: Claim, shared: int) -> int:
        """Tokens of the claim the prompt contains past the hit: vLLM never serves a
        prompt's last token from cache, so a prompt ending at or inside the claimed prefix
        recomputes the block holding it (the last-block rule, contract.servable_blocks).
        A resident claim's blocks are all cached, so this is the only way the hit stops
        short of what the prompt shares with it: at most one block."""
        from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

        full = request.block_hashes  # every full block of the prompt
        if shared < claim.num_blocks and shared < len(full) and \
                make_block_hash_with_group_id(full[shared], GROUP) == claim.hashes[shared]:
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

    def fail_materialization(self, claim: Claim, reason: str, cause: str) -> None:
        self.book.unpin(claim)
        claim.reason = reason
        self.book.transition(claim, EventType.CLAIM_MATERIALIZATION_FAILED, cause=cause,
                             request_id=claim.request_id)
        self.resolve(claim)

    def pinned_block_lost(self, block: Any) -> None:
        """vLLM dropped the content of a pinned block (its KV-load-failure path evicts by
        id, references or not). The claims on it no longer hold: report, never hide."""
        book = self.book
        for claim in book.claims_on(block):
            book.unpin(claim)
            claim.reason = "vLLM evicted a pinned block (its KV-load-failure path)"
            if claim.state in (ClaimState.RESIDENT, ClaimState.DEMOTED):
                book.transition(claim, EventType.CLAIM_HARMED, cause="kv_load_failure", blocks=1,
                                block_hashes=[block.block_hash])

    def resolve(self, claim: Claim) -> None:
        """Answer the `POST /v1/kv/claims` still waiting for this claim, if any."""
        waiter, claim.waiter = claim.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(reply(201, self.book.view(claim)))


def _hit_blocks(args: tuple, kwargs: dict) -> Sequence:
    """The prefix-cache hit `allocate_slots` was given (`new_computed_blocks`)."""
    blocks = kwargs.get("new_computed_blocks")
    if blocks is None and len(args) > 1:
        blocks = args[1]
    if blocks is None:
        return ()
    return blocks.blocks[GROUP]


def bind_vllm() -> None:
    """Resolve the vLLM names the hot path compares against (once, lazily: importing this
    module must not import vLLM)."""
    global _FRESH_STATUSES
    if not _FRESH_STATUSES:
        from vllm.v1.request import RequestStatus

        _FRESH_STATUSES = frozenset({RequestStatus.WAITING, RequestStatus.PREEMPTED})
