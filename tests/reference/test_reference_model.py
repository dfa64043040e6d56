"""Model-based tests of the reference runtime (in process, fake clock).

`RuntimeMachine` drives random sequences of claims (hard, soft, demotable, with TTLs),
completions, releases, clock advances, demotion pressure, armed faults and resets, as two
tenants, and after every step checks what must always hold:

* no exception except an `ApiError` the contract allows for that call;
* the pool's blocks add up (each block free, cached or pinned, and the indexes agree);
* a resident hard claim holds every block of its predicate;
* every completion ends in exactly one outcome event (or none, when it was rejected
  before scheduling: 400/404);
* the event log is well ordered and its seq never restarts, across resets;
* every answer is a contract model that serializes to strict JSON;
* no tenant holds more than its budget, no tenant reads another's claim.

CI runs a bounded number of steps; `bench/bench_reference_model.py` runs >= 100,000.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pytest_rkv.contract import ClaimRequest, ClaimState, CompletionRequest, EventType, FaultRequest
from pytest_rkv.reference.runtime import ApiError, FakeClock, MicroRuntime
from pytest_rkv.trace import order_problems
from pytest_rkv.workload import prompt_tokens

BLOCK = 4  # small blocks keep prompts short; the geometry is the canonical one in blocks
TENANTS = ("a", "b")
TENANT_BUDGET = 40

tenants = st.sampled_from(TENANTS)
tags = st.sampled_from(["p0", "p1", "p2", "p3"])


class RuntimeMachine(RuleBasedStateMachine):
    steps = 0  # across every run of the machine (the bench script reads it)

    @initialize()
    def start(self) -> None:
        self.clock = FakeClock()
        self.rt = MicroRuntime(block_size=BLOCK, clock=self.clock, tenancy=True,
                               tenant_budget_blocks=TENANT_BUDGET, claim_retention_s=30.0,
                               event_retention=5_000)
        self.claims: dict[str, str] = {}  # claim id -> owner
        self.requests: dict[str, int] = {}  # request id -> status, since the last reset
        self.max_seq = 0
        self.n = 0

    def _rid(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def _expect(self, exc: ApiError, allowed: set[int]) -> None:
        assert exc.status in allowed, f"unexpected {exc.status}: {exc.body}"
        json.dumps(exc.body.model_dump(mode="json"), allow_nan=False)

    # -- rules -------------------------------------------------------------------------
    @rule(tenant=tenants, tag=tags, blocks=st.integers(1, 70), strength=st.sampled_from(["hard", "soft"]),
          demotable=st.booleans(), ttl=st.none() | st.sampled_from([0.5, 2.0, 10.0]), extra=st.integers(0, 3))
    def claim(self, tenant, tag, blocks, strength, demotable, ttl, extra) -> None:
        RuntimeMachine.steps += 1
        req = ClaimRequest(prompt_token_ids=prompt_tokens(tag, blocks, BLOCK, extra), strength=strength,
                           demotable=demotable, ttl_s=ttl)
        try:
            claim = self.rt.create_claim(req, tenant=tenant)
        except ApiError as exc:
            self._expect(exc, {409})
            assert exc.body.type == "no_admit" and exc.body.reason
            return
        self.claims[claim.claim_id] = tenant
        assert claim.blocks == blocks and claim.tenant == tenant
        assert claim.state in (ClaimState.RESIDENT, ClaimState.FAILED)
        json.dumps(claim.model_dump(mode="json"), allow_nan=False)

    @rule(tenant=tenants, tag=tags, blocks=st.integers(1, 82), extra=st.integers(0, 3),
          max_tokens=st.integers(1, 9), with_claim=st.booleans())
    def complete(self, tenant, tag, blocks, extra, max_tokens, with_claim) -> None:
        self._complete(tenant, tag, blocks, extra, max_tokens, with_claim)

    def _complete(self, tenant, tag, blocks, extra, max_tokens, with_claim) -> None:
        RuntimeMachine.steps += 1
        rid = self._rid()
        claim_id = next(iter(self.claims), None) if with_claim else None
        req = CompletionRequest(prompt=prompt_tokens(tag, blocks, BLOCK, extra), max_tokens=max_tokens,
                                request_id=rid, claim_id=claim_id)
        try:
            done = self.rt.complete(req, tenant=tenant)
        except ApiError as exc:
            self._expect(exc, {400, 404, 409})
            if exc.status == 409:
                assert exc.body.type == "active_refusal" and exc.body.needed_blocks is not None
                assert exc.body.needed_blocks > exc.body.free_blocks + exc.body.evictable_blocks
            self.requests[rid] = exc.status
            return
        self.requests[rid] = 200
        assert done.rkv is not None and done.rkv.request_id == rid
        assert all(self.claims.get(r.claim_id) == tenant for r in done.rkv.reuse), "reuse across tenants"
        json.dumps(done.model_dump(mode="json"), allow_nan=False)

    @precondition(lambda self: self.claims)
    @rule(tenant=tenants, pick=st.integers(0, 10_000))
    def release(self, tenant, pick) -> None:
        RuntimeMachine.steps += 1
        claim_id = list(self.claims)[pick % len(self.claims)]
        try:
            claim = self.rt.release_claim(claim_id, tenant=tenant)
        except ApiError as exc:
            self._expect(exc, {404})
            return
        assert self.claims[claim_id] == tenant, f"tenant {tenant} released another tenant's claim"
        assert claim.state in (ClaimState.RELEASED, ClaimState.FAILED, ClaimState.HARMED, ClaimState.EXPIRED)

    @rule(seconds=st.sampled_from([0.1, 1.0, 5.0, 40.0]))
    def advance(self, seconds) -> None:
        RuntimeMachine.steps += 1
        self.clock.advance(seconds)

    @rule(tenant=tenants, tag=tags)
    def pressure(self, tenant, tag) -> None:
        """A prefill as large as the pool allows: demotes, harms or is refused."""
        self._complete(tenant, tag + "-big", 78, 0, 1, False)

    @rule(kind=st.sampled_from(["fail_next_materialization", "fail_next_restore"]))
    def fault(self, kind) -> None:
        RuntimeMachine.steps += 1
        self.rt.inject_fault(FaultRequest(kind=kind))

    @rule()
    def reset(self) -> None:
        RuntimeMachine.steps += 1
        self.rt.reset()
        self.claims.clear()
        self.requests.clear()

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def pool_adds_up(self) -> None:
        pool = self.rt.pool
        free = set(pool._free)
        lru = set(pool._lru)
        pinned = {b.block_id for b in pool.blocks if b.hard_holders}
        assert len(free) == len(pool._free), "a block is free twice"
        assert not free & lru and not free & pinned and not lru & pinned
        assert len(free) + len(lru) + len(pinned) == pool.num_blocks, (len(free), len(lru), len(pinned))
        for b in pool.blocks:
            assert b.ref == 0, f"block {b.block_id} still referenced between operations"
            if b.block_id in free:
                assert b.hash is None and not b.soft_holders
            else:
                assert b.hash is not None and pool._by_hash[b.hash] == b.block_id
        assert len(pool._by_hash) == pool.num_blocks - len(free)
        state = self.rt.pool_state()
        assert state.free_blocks + state.cached_blocks <= state.total_blocks

    @invariant()
    def hard_claims_keep_their_blocks(self) -> None:
        for claim in self.rt._live():
            if claim.strength == "hard" and claim.state == ClaimState.RESIDENT and claim.tier == "device":
                held = self.rt.pool.held_by(claim.claim_id)
                assert len(held) == len(claim.hashes), f"{claim.claim_id} holds {len(held)} of {len(claim.hashes)}"
                assert {self.rt.pool.blocks[b].hash for b in held} == set(claim.hashes)

    @invariant()
    def budgets_hold(self) -> None:
        live = self.rt._live()
        assert sum(len(c.hashes) for c in live) <= self.rt.claim_budget_blocks
        for tenant in TENANTS:
            assert sum(len(c.hashes) for c in live if c.owner == tenant) <= TENANT_BUDGET

    @invariant()
    def events_are_ordered_and_outcomes_unique(self) -> None:
        page = self.rt.events(after=0, limit=1000)
        events = list(page.events)
        while page.more:
            page = self.rt.events(after=page.last_seq, limit=1000)
            events += page.events
        assert not order_problems(events), order_problems(events)[:3]
        if events:
            assert events[-1].seq >= self.max_seq, "seq went backwards"
            self.max_seq = events[-1].seq
        outcomes: dict[str, int] = {}
        for e in events:
            if e.type in (EventType.REQUEST_COMPLETED, EventType.REQUEST_REFUSED) and e.request_id:
                outcomes[e.request_id] = outcomes.get(e.request_id, 0) + 1
                want = EventType.REQUEST_COMPLETED if self.requests.get(e.request_id) == 200 else EventType.REQUEST_REFUSED
                assert e.type == want, f"{e.request_id}: answered {self.requests.get(e.request_id)}, event {e.type.value}"
        if page.oldest_seq <= 1 or events and events[0].type == EventType.RUNTIME_RESET:
            for rid, status in self.requests.items():
                expected = 1 if status in (200, 409) else 0
                assert outcomes.get(rid, 0) == expected, f"request {rid} ({status}) has {outcomes.get(rid, 0)} outcomes"

    @invariant()
    def tenants_are_isolated(self) -> None:
        for claim_id, owner in list(self.claims.items())[:8]:
            other = "b" if owner == "a" else "a"
            try:
                self.rt.get_claim(claim_id, tenant=other)
            except ApiError as exc:
                assert exc.status == 404
            else:
                raise AssertionError(f"tenant {other} read {owner}'s claim {claim_id}")
            try:
                self.rt.get_claim(claim_id, tenant=owner)
            except ApiError as exc:  # pruned after the retention time: gone for everyone
                assert exc.status == 404 and claim_id not in self.rt.claims
                del self.claims[claim_id]
        seen = self.rt.events(tenant="b", limit=1000).events
        assert all(self.claims.get(e.claim_id, "b") == "b" for e in seen if e.claim_id)


CI_SETTINGS = settings(max_examples=40, stateful_step_count=40, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow])
TestRuntimeMachine = RuntimeMachine.TestCase
TestRuntimeMachine.settings = CI_SETTINGS


# -- regressions found by the machine (and by hand) ---------------------------------------


def test_refusal_with_a_demotable_claim_pinned_by_another_hard_claim_changes_nothing():
    """The room planner counted blocks another hard claim pins as freed by demotion:
    allocate() then crashed and the demotable claim stayed demoted for good."""
    rt = MicroRuntime()
    prompt = list(range(160))
    demotable = rt.create_claim(ClaimRequest(prompt_token_ids=prompt, demotable=True))
    hard = rt.create_claim(ClaimRequest(prompt_token_ids=prompt))
    before_pool, mark = rt.pool_state(), rt.events().last_seq
    try:
        rt.complete(CompletionRequest(prompt=list(range(1000, 2184))))  # 74 blocks
    except ApiError as exc:
        assert exc.status == 409 and exc.body.type == "active_refusal"
        assert sorted(exc.body.blocking_claims) == sorted([demotable.claim_id, hard.claim_id])
    else:
        raise AssertionError("a 74-block request fit beside 10 pinned blocks of 80 and a 64-block budget?")
    assert rt.get_claim(demotable.claim_id).state == ClaimState.RESIDENT
    assert rt.pool_state() == before_pool
    assert [e.type for e in rt.events(mark).events] == [EventType.REQUEST_REFUSED]
