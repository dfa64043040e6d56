"""The RKV API v1 operations, as the engine utility call `EngineCore.rkv_call` runs them.

`ClaimApi.handle(op, payload, engine)` is the one door from the endpoint plugin (API
server process) into the claim book (engine-core process); it runs in the engine thread
between steps. Every answer is a `{"status", "body"}` pair whose body is a contract model
dumped as JSON (`contract.Claim`, `PoolState`, `RuntimeInfo`, `EventPage`), or a `Future`
of one (a claim answers when its prefill has run).

Invariants:

1. Every operation first expires due claims (`book.tick`), so no answer shows a claim
   past its TTL as alive.
2. A claim refused at claim time (`claim.refused`, HTTP 409 `no_admit`) gets no identity
   and holds nothing; an accepted one is in the book, with `claim.accepted`, before its
   materializing prefill is handed to the scheduler.
3. `reset` drops every claim (their waiters answered), the event log and vLLM's prefix
   cache, or answers 409 and changes nothing vLLM holds while a request still runs.
4. Tenants: the endpoint plugin authenticates the caller and passes its tenant as
   `payload["_tenant"]` (None: no tenancy, or the admin). A tenant's claims are salted with
   its name (vLLM's `cache_salt`), so equal prompts of two tenants share no blocks; another
   tenant's claim answers 404 as if it did not exist; a tenant's claims together stay
   within `tenant_budget_blocks`, and all claims within the global budget.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from pytest_rkv.adapters.vllm import ADAPTER_VERSION
from pytest_rkv.adapters.vllm.admission import GROUP, Admission, Record, reply
from pytest_rkv.adapters.vllm.book import Claim, ClaimBook, hash_hex, visible
from pytest_rkv.adapters.vllm.config import AdapterConfig
from pytest_rkv.contract import EVENT_PAGE_LIMIT, TERMINAL_STATES, ClaimState, EventType, RuntimeInfo

DEMOTION_UNSUPPORTED = ("no host tier configured: start vLLM with a storing and loading KV connector "
                        "(LMCache's LMCacheMPConnector) and --additional-config '{\"rkv\": {\"host_tier\": true}}'")
FAULTS = ("fail_next_materialization", "fail_next_restore")


def error(status: int, type_: str, message: str, **extra) -> dict:
    return reply(status, {"error": {"type": type_, "message": message, **extra}})


class ClaimApi:
    """`op_<name>` per RKV operation. See the module docstring."""

    def __init__(self, scheduler: Any, book: ClaimBook, admission: Admission, config: AdapterConfig,
                 *, usable_blocks: int, budget: int, unsupported: str | None) -> None:
        self.sched = scheduler
        self.book = book
        self.admission = admission
        self.config = config
        self.mgr = scheduler.kv_cache_manager
        self.block_size: int = scheduler.block_size
        self.max_model_len: int = scheduler.max_model_len
        self.usable_blocks = usable_blocks
        self.budget = budget
        self.unsupported = unsupported
        self.armed: list[dict] = []
        self.caller: str | None = None  # the tenant of the operation in progress

    def handle(self, op: str, payload: dict, engine: Any) -> dict | Future:
        self.book.tick()
        payload = dict(payload or {})
        self.caller = payload.pop("_tenant", None)
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            return error(404, "not_found", f"no RKV operation {op!r}")
        return handler(payload, engine)

    def _lookup(self, claim_id: str) -> Claim | dict:
        claim = self.book.claims.get(claim_id)
        if claim is None or not visible(claim.owner, self.caller):  # another tenant's: as if absent
            return error(404, "not_found", f"no claim {claim_id!r}")
        return claim

    # -- operations ----------------------------------------------------------------------
    def op_info(self, payload: dict, engine: Any) -> dict:
        import vllm

        info = RuntimeInfo(
            runtime="vllm", runtime_version=getattr(vllm, "__version__", "unknown"),
            block_size=self.block_size, total_blocks=self.usable_blocks,
            fault_injection=self.config.fault_injection, demotion=self.config.host_tier, routed=False,
        ).model_dump(mode="json")
        info["adapter"] = {"name": "pytest-rkv vllm adapter", "version": ADAPTER_VERSION,
                           "depth": "adapter", "claim_budget_blocks": self.budget,
                           "unsupported": self.unsupported,
                           "host_tier": self.config.host_tier,
                           "demotion_unsupported": None if self.config.host_tier else DEMOTION_UNSUPPORTED}
        return reply(200, info)

    def op_claim(self, payload: dict, engine: Any) -> dict | Future:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
        from vllm.v1.request import Request

        if self.unsupported:
            return error(501, "unsupported", self.unsupported)
        book, admission = self.book, self.admission
        tokens = list(payload["prompt_token_ids"])
        B = self.block_size
        k = len(tokens) // B
        rid = book.new_id("claimreq")
        if k == 0:
            return error(422, "invalid_request",
                         f"a claim must cover at least one full block of {B} tokens",
                         fields=[{"loc": ["prompt_token_ids"], "msg": "shorter than one block"}])

        owner = self.caller

        def refuse(reason: str) -> dict:
            book.emit(EventType.CLAIM_REFUSED, owner=owner, request_id=rid, cause=reason, blocks=k)
            return error(409, "no_admit", "claim not admitted", reason=reason, request_id=rid)

        if k * B > self.max_model_len:
            return refuse(f"capacity: {k} blocks are longer than max_model_len {self.max_model_len}")
        tenant_budget = self.config.tenant_budget_blocks
        if owner is not None and tenant_budget is not None:
            mine = book.held_blocks(owner)
            if mine + k > tenant_budget:
                return refuse(f"tenant claim budget: tenant {owner} holds {mine} of its {tenant_budget} "
                              f"blocks, {k} more requested")
        held = book.held_blocks()
        if held + k > self.budget:
            return refuse(f"global claim budget: {held} of {self.budget} blocks already claimed, "
                          f"{k} more requested")

        mat_id = f"rkv-materialize-{rid}-{time.monotonic_ns()}"
        request = Request(
            request_id=mat_id, prompt_token_ids=tokens[: k * B],
            sampling_params=SamplingParams(max_tokens=1, temperature=0.0),
            pooling_params=None, arrival_time=time.time(), priority=0, cache_salt=owner,
            block_hasher=engine.request_block_hasher,
        )
        hashes = [make_block_hash_with_group_id(h, GROUP) for h in request.block_hashes[:k]]
        if len(hashes) < k:
            return error(501, "unsupported", "vLLM computed no block hashes (prefix caching off?)")
        # Could the prefix ever be resident without evicting a hard claim?
        hits = self.mgr.get_computed_blocks(request)[0].blocks[GROUP]
        hit_ids = {b.block_id for b in hits}
        needed = k - len(hits)
        hard_outside = len(book.hard_pins) - sum(1 for i in hit_ids if i in book.hard_pins)
        if needed > self.usable_blocks - hard_outside - len(hit_ids):
            return refuse(f"capacity: {k} blocks cannot be made resident without evicting hard claims")

        now = time.monotonic()
        ttl = payload.get("ttl_s")
        claim = Claim(
            claim_id=book.new_id("claim"), strength=payload.get("strength", "hard"),
            num_blocks=k, hashes=hashes, prefix_hash=hash_hex(hashes[-1]),
            demotable=bool(payload.get("demotable", False)), ttl_s=ttl,
            expires_at=None if ttl is None else now + ttl,
            client_id=payload.get("client_id"), tenant=owner or payload.get("tenant"), owner=owner,
            request_id=rid, mat_id=mat_id,
        )
        book.claims[claim.claim_id] = book.live[claim.claim_id] = claim
        book.emit(EventType.CLAIM_ACCEPTED, owner=owner, claim_id=claim.claim_id, from_state=None,
                  to_state=ClaimState.ACCEPTED.value, request_id=rid, blocks=k)
        claim.fail_injected = self.take_fault("fail_next_materialization", claim.claim_id)
        claim.waiter = Future()
        admission.mat[mat_id] = claim
        admission.tracked[mat_id] = Record(rkv_id=rid, num_blocks=k, internal=True, claim_id=claim.claim_id,
                                           tenant=owner)
        engine.add_request(request)
        return claim.waiter

    def op_get(self, payload: dict, engine: Any) -> dict:
        claim = self._lookup(payload.get("claim_id", ""))
        return claim if isinstance(claim, dict) else reply(200, self.book.view(claim))

    def op_list(self, payload: dict, engine: Any) -> dict:
        return reply(200, {"claims": [self.book.view(c) for c in self.book.claims.values()
                                      if visible(c.owner, self.caller)]})

    def op_release(self, payload: dict, engine: Any) -> dict:
        from vllm.v1.request import RequestStatus

        book, admission = self.book, self.admission
        claim = self._lookup(payload.get("claim_id", ""))
        if isinstance(claim, dict):
            return claim
        if claim.state not in TERMINAL_STATES:
            if claim.state == ClaimState.ACCEPTED and admission.mat.pop(claim.mat_id, None) is not None:
                self.sched.finish_requests(claim.mat_id, RequestStatus.FINISHED_ABORTED)
            book.unpin(claim)
            claim.reason = "released by its owner"
            book.transition(claim, EventType.CLAIM_RELEASED, cause="client")
            admission.resolve(claim)
        return reply(200, book.view(claim))

    def op_events(self, payload: dict, engine: Any) -> dict:
        return reply(200, self.book.page(int(payload.get("after", 0)), int(payload.get("limit", EVENT_PAGE_LIMIT)),
                                         tenant=self.caller))

    def op_pool(self, payload: dict, engine: Any) -> dict:
        # The host side: demoted claims may together keep up to the claim budget there.
        host_total = self.budget if self.config.host_tier else 0
        return reply(200, self.book.pool_state(self.usable_blocks, self.budget, host_total, tenant=self.caller,
                                               tenant_budget=self.config.tenant_budget_blocks))

    def op_reset(self, payload: dict, engine: Any) -> dict:
        """Drop every claim, the event log and the prefix cache. Fails (409, retry) while
        running requests still hold blocks, like vLLM's own /reset_prefix_cache."""
        from vllm.v1.request import RequestStatus

        book, admission = self.book, self.admission
        for vid, claim in list(admission.mat.items()):
            self.sched.finish_requests(vid, RequestStatus.FINISHED_ABORTED)
            admission.tracked.pop(vid, None)
            claim.reason = "dropped by reset"
            admission.resolve(claim)
        admission.mat.clear()
        admission.storing.clear()
        admission.restoring.clear()
        admission.withheld.clear()
        admission.hash_owner.clear()
        for claim in list(book.live.values()):
            book.unpin(claim)
        for claim in list(book.claims.values()):
            admission.resolve(claim)
        book.clear()
        self.armed.clear()
        if not self.sched.reset_prefix_cache():
            return error(409, "capacity", "running requests still hold KV blocks; retry the reset")
        return self.op_pool({}, engine)

    def op_fault(self, payload: dict, engine: Any) -> dict:
        if not self.config.fault_injection:
            return error(501, "unsupported", "fault injection is disabled "
                         "(--additional-config '{\"rkv\": {\"fault_injection\": true}}')")
        kind = payload.get("kind")
        if kind not in FAULTS:
            return error(501, "unsupported", f"fault {kind!r} is not offered (offered: {', '.join(FAULTS)})")
        if kind == "fail_next_restore" and not self.config.host_tier:
            return error(501, "unsupported", "fault 'fail_next_restore' is not offered: this adapter has no "
                         "host tier, so nothing is ever restored")
        claim_id = payload.get("claim_id")
        if claim_id is not None and claim_id not in self.book.claims:
            return error(404, "not_found", f"no claim {claim_id!r}")
        self.armed.append({"kind": kind, "claim_id": claim_id})
        return reply(200, {"kind": kind, "claim_id": claim_id})

    def take_fault(self, kind: str, claim_id: str) -> bool:
        for armed in self.armed:
            if armed["kind"] == kind and armed["claim_id"] in (None, claim_id):
                self.armed.remove(armed)
                return True
        return False
