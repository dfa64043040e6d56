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
   `needed + watermark > usable - hard-pinned blocks outside its prefix hit - its hit`
   (`needed` counts the new blocks; the hit's blocks are its own, not room).
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

With a host tier (`AdapterConfig.host_tier`: vLLM's KV connector stores every computed
block to LMCache and loads it back):

7. A demotable hard claim is `backed` once the connector reports its materializing
   request's stores finished (`finished_sending`); its `POST /v1/kv/claims` answers then,
   so an answered demotable claim can be demoted.
8. A request that invariant 2 would refuse demotes backed demotable hard claims instead
   (oldest first, until it would fit), each with `claim.demoted` naming it; if even all of
   them would not make room, it is refused as before. Demotion unpins, nothing more: the
   blocks stay cached on the device until vLLM needs them.
9. A demoted claim is restored only by a request whose prompt holds its whole prefix and
   can be served from it (the last-block rule), when vLLM's local hit plus the connector's
   load cover every block of it. It is `restored` (then `reused`) only once the load has
   finished and each of its blocks carries the claimed hash; otherwise (the tier lacks
   blocks, a load failed, or `fail_next_restore` withheld the load) it is `restore_failed`
   before the request's outcome, and the request names it among its failures, never as
   reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_rkv.adapters.vllm.book import Claim, ClaimBook
from pytest_rkv.contract import OTHER_TENANTS, ClaimState, EventType

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
    tenant: str | None = None  # whose request it is (None: no tenancy)
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

    def __init__(self, scheduler: Any, book: ClaimBook, usable_blocks: int, host_tier: bool = False) -> None:
        bind_vllm()
        self.sched = scheduler
        self.book = book
        self.mgr = scheduler.kv_cache_manager
        self.pool = self.mgr.block_pool
        self.block_size: int = scheduler.block_size
        self.usable_blocks = usable_blocks
        book.observer = EvictionObserver(self, book.inner_collector)
        self.tracked: dict[str, Record] = {}  # vLLM request id -> record (survives reset)
        self.hash_owner: dict[bytes, str] = {}  # cached block hash -> tenant whose request stored it
        self.refusals: dict[str, dict] = {}  # vLLM request id -> refusal body, to finish
        self.mat: dict[str, Claim] = {}  # vLLM request id -> claim being materialized
        self.evicted: list[tuple[int, bytes]] = []  # (block id, hash) evicted by `allocating`
        self.host_tier = host_tier
        self.storing: dict[str, Claim] = {}  # materializing vLLM id -> demotable claim awaiting its stores
        self.restoring: dict[str, list[Claim]] = {}  # vLLM id -> demoted claims its load brings back
        self.withheld: dict[str, set[str]] = {}  # vLLM id -> claims whose restore a fault withheld
        self.take_fault: Callable[[str, str], bool] = lambda kind, claim_id: False  # set by ClaimCore

    @property
    def engaged(self) -> bool:
        """Anything for the hooks to do? (False: every hook is a no-op.)"""
        return bool(self.book.live or self.tracked or self.refusals or self.mat or self.storing)

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
            claim_id=extra.get("rkv_claim_id"), tenant=extra.get("rkv_tenant"),
        )

    def tenant_of(self, vid: str) -> str | None:
        record = self.tracked.get(vid)
        return record.tenant if record is not None else None

    def name_for(self, owner: str | None, vid: str) -> str:
        """The id of request `vid` as `owner` may see it: its own, or `OTHER_TENANTS`."""
        return self.rkv_id(vid) if self.tenant_of(vid) == owner else OTHER_TENANTS

    def _note_owner(self, request: Any) -> None:
        """Remember whose blocks an admitted tenant's request stores (its eviction events
        go to that tenant)."""
        tenant = self.tenant_of(request.request_id)
        if tenant is not None:
            from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

            for h in request.block_hashes:
                self.hash_owner[make_block_hash_with_group_id(h, GROUP)] = tenant

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
        if vid in self.restoring:  # its host-tier load has finished: did it bring the claims back?
            self._settle_restores(request)
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
                    if needed + watermark > self.usable_blocks - hard_outside - len(hits):
                        if not self._demote(request, hits, needed + watermark):
                            self._refuse(request, hits, needed, hard_outside)
                            return None
                        result = orig(request, num_new_tokens, *args, **kwargs)
                if result is None:
                    yielded = self._yield_soft(hits, needed + watermark)
                    if yielded:
                        result = orig(request, num_new_tokens, *args, **kwargs)
        finally:
            self._end_allocation(request, yielded)
        if result is not None:
            self._note_owner(request)
            if book.by_first:
                if hits:
                    self._attribute_reuse(request, hits)
                if self.host_tier:
                    self._begin_restores(request, hits, kwargs)
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
        if result is not None:
            self._note_owner(request)
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
            if claim.demotable and self.host_tier:
                self.storing[vid] = claim  # answered once the tier holds it (invariant 7)
            else:
                self.resolve(claim)

    def stores_completed(self, finished_sending: set[str]) -> None:
        """The connector finished storing these requests' blocks to the host tier."""
        for vid in finished_sending & self.storing.keys():
            claim = self.storing.pop(vid)
            claim.backed = True
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
        self.restoring.pop(vid, None)  # a load that never finished leaves its claims demoted
        self.withheld.pop(vid, None)
        record = self.tracked.pop(vid, None)
        if record is None or record.internal or record.refused:
            return record
        self.book.emit(EventType.REQUEST_COMPLETED, owner=record.tenant, request_id=record.rkv_id, cause="completed",
                       blocks=record.num_blocks)
        return record

    # -- decisions -----------------------------------------------------------------------
    def _refuse(self, request: Any, hits: Sequence, needed: int, hard_outside: int) -> None:
        vid = request.request_id
        record = self.tracked.get(vid)
        rid = record.rkv_id if record is not None else vid
        hit_ids = {b.block_id for b in hits}
        live = self.book.live
        tenant = record.tenant if record is not None else None
        blocking = sorted(
            (c for c in live.values() if c.strength == "hard" and any(b.block_id not in hit_ids for b in c.blocks)),
            key=lambda c: c.claim_id)
        # Another tenant's claims are counted, never named (book.py, invariant 7).
        blockers = [c.claim_id for c in blocking if tenant is None or c.owner == tenant]
        claimed = {cid: len(live[cid].blocks) for cid in blockers}
        foreign = sum(len(c.blocks) for c in blocking if c.claim_id not in claimed)
        if foreign:
            claimed[OTHER_TENANTS] = foreign
        free, evictable = self._free_and_evictable(hit_ids)
        body = {
            "type": "active_refusal",
            "message": (
                f"request {rid} needs {needed} blocks; {free} free + {evictable} evictable; the "
                f"rest is held by hard claims {', '.join([*blockers, *([OTHER_TENANTS] if foreign else [])])} "
                f"({hard_outside} blocks), which the adapter will not evict"
            ),
            "request_id": rid,
            "blocking_claims": blockers,
            "needed_blocks": needed,
            "free_blocks": free,
            "evictable_blocks": evictable,
            "claimed_blocks": claimed,
        }
        claim = self.mat.get(vid)
        if claim is not None:  # a claim's own prefill cannot evict other hard claims
            claim.fail_reason = (f"capacity: {needed} blocks cannot be made resident without "
                                 f"evicting hard claims {', '.join(blockers)}")
        else:
            self.book.emit(EventType.REQUEST_REFUSED, owner=tenant, request_id=rid, cause="hard_claims",
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
        plain: dict[str | None, list[bytes]] = {}  # owner -> hashes (raw bytes until read)
        for i, h in evicted:
            owner = self.hash_owner.pop(h, None)
            if i not in lost_ids:
                plain.setdefault(owner, []).append(h)
        for owner, hashes in plain.items():  # one event per tenant whose blocks went
            book.emit(EventType.BLOCKS_EVICTED, owner=owner, request_id=self.name_for(owner, request.request_id),
                      blocks=len(hashes), block_hashes=hashes)
        for claim, hashes in harmed:
            by = self.name_for(claim.owner, request.request_id)
            claim.reason = f"lost {len(hashes)} blocks to request {by}"
            book.transition(claim, EventType.CLAIM_HARMED, cause="evicted_by_request",
                            request_id=by, blocks=len(hashes), block_hashes=hashes)

    def _demote(self, request: Any, hits: Sequence, need: int) -> list[Claim]:
        """Demote the backed demotable hard claims (oldest first) that leave `need` blocks
        outside hard pins; [] and nothing changed if even all of them would not
        (invariant 8). A block two claims pin is freed only once both are demoted."""
        if not self.host_tier or self.request_is_claim(request):
            return []
        book = self.book
        hit_ids = {b.block_id for b in hits}
        hard = dict(book.hard_pins)
        outside = len(hard) - sum(1 for i in hit_ids if i in hard)
        room = self.usable_blocks - len(hit_ids)  # less what stays hard-pinned outside the hit
        chosen: list[Claim] = []
        for claim in book.live.values():
            if need <= room - outside:
                break
            if claim.strength != "hard" or not (claim.demotable and claim.backed and claim.blocks):
                continue
            chosen.append(claim)
            for b in claim.blocks:
                left = hard[b.block_id] - 1
                if left:
                    hard[b.block_id] = left
                else:
                    del hard[b.block_id]
                    outside -= b.block_id not in hit_ids
        if need > room - outside:
            return []
        for claim in chosen:
            rid = self.name_for(claim.owner, request.request_id)
            book.unpin(claim)
            claim.tier = "host"
            claim.reason = f"demoted to the host tier to admit request {rid}"
            book.transition(claim, EventType.CLAIM_DEMOTED, cause="pressure", request_id=rid,
                            tier="host", blocks=claim.num_blocks)
        return chosen

    def request_is_claim(self, request: Any) -> bool:
        """A claim's own materializing prefill (it may not demote other claims)."""
        return request.request_id in self.mat

    def demoted_in(self, request: Any) -> list[Claim]:
        """Demoted claims whose whole prefix this prompt holds and could be served from
        (the last-block rule), longest first."""
        from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

        full = request.block_hashes
        if not full:
            return []
        ids = self.book.by_first.get(make_block_hash_with_group_id(full[0], GROUP))
        if not ids:
            return []
        servable = (request.num_tokens - 1) // self.block_size
        found = []
        for claim_id in sorted(ids):
            claim = self.book.live.get(claim_id)
            if claim is None or claim.state != ClaimState.DEMOTED or claim.num_blocks > servable:
                continue
            if all(make_block_hash_with_group_id(full[i], GROUP) == h for i, h in enumerate(claim.hashes)):
                found.append(claim)
        return sorted(found, key=lambda c: -c.num_blocks)

    def allow_load(self, request: Any) -> bool:
        """Asked by the connector wrapper before vLLM plans a load for a fresh request.

        Only a restore loads: a request whose prompt holds a demoted claim. Any other
        request is served from the device pool alone, as without a tier, so a block it
        lost on the device stays lost (evictions, harm and reuse read the same as on
        `vllm+rkv`) and every load is a claim's restore. A `fail_next_restore` armed for
        a claim the request would restore withholds the whole load (the request recomputes
        what the device does not hold, and the restore fails)."""
        vid = request.request_id
        if vid in self.withheld:
            return False
        claims = self.demoted_in(request)
        armed = {c.claim_id for c in claims if self.take_fault("fail_next_restore", c.claim_id)}
        if armed:
            self.withheld[vid] = armed
        return bool(claims) and not armed

    def _begin_restores(self, request: Any, hits: Sequence, kwargs: dict) -> None:
        """An admitted request whose prompt holds demoted claims: plan their restore, or
        fail it now if the local hit plus the load cannot cover them (invariant 9)."""
        claims = self.demoted_in(request)
        if not claims:
            return
        vid = request.request_id
        covered = len(hits) + int(kwargs.get("num_external_computed_tokens") or 0) // self.block_size
        withheld = self.withheld.get(vid, set())
        pending = []
        for claim in claims:
            if claim.claim_id in withheld:
                self._fail_restore(claim, vid, "restore failed (injected): the host tier's load was withheld",
                                   cause="injected")
            elif covered < claim.num_blocks:
                self._fail_restore(claim, vid, f"the host tier and the device hold {covered} of its "
                                   f"{claim.num_blocks} blocks; the rest is recomputed", cause="tier")
            else:
                pending.append(claim)
        if pending:
            self.restoring[vid] = pending
            if not kwargs.get("delay_cache_blocks"):  # loaded in this very step: settle now
                self._settle_restores(request)

    def _settle_restores(self, request: Any) -> None:
        """The request's load has finished (or was synchronous): each pending claim is
        restored, pinned and then credited, or its restore failed."""
        vid = request.request_id
        book = self.book
        blocks = self.mgr.get_blocks(vid).blocks[GROUP]
        rid = self.rkv_id(vid)
        restored = []
        for claim in self.restoring.pop(vid, []):
            if claim.state != ClaimState.DEMOTED:
                continue  # released or expired while loading
            got = 0
            for b, h in zip(blocks, claim.hashes):
                if b.block_hash != h:
                    break
                got += 1
            if got < claim.num_blocks:
                self._fail_restore(claim, vid, f"the load brought back {got} of its {claim.num_blocks} "
                                   "blocks; the rest is recomputed", cause="load")
                continue
            book.pin(claim, blocks[: claim.num_blocks])
            claim.tier, claim.reason = "device", None
            book.transition(claim, EventType.CLAIM_RESTORED, cause="reuse", request_id=rid, tier="device",
                            blocks=claim.num_blocks)
            restored.append(claim)
        record = self.tracked.get(vid)
        for claim in restored:
            if record is not None:
                record.reuse.append({"claim_id": claim.claim_id, "tokens": claim.num_blocks * self.block_size,
                                     "restored": True,
                                     "recomputed_tokens": self._recomputed(request, claim, claim.num_blocks),
                                     **book.where})
            book.transition(claim, EventType.CLAIM_REUSED, request_id=rid, blocks=claim.num_blocks)

    def _fail_restore(self, claim: Claim, vid: str, reason: str, cause: str) -> None:
        claim.reason = reason
        self.book.transition(claim, EventType.CLAIM_RESTORE_FAILED, cause=cause, request_id=self.rkv_id(vid),
                             tier="host")
        record = self.tracked.get(vid)
        if record is not None:
            record.failures.append({"claim_id": claim.claim_id, "reason": reason})

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
                                     "recomputed_tokens": self._recomputed(request, claim, shared),
                                     **self.book.where})
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
