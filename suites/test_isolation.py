"""Claim isolation between tenants (RKV API v1.1).

The probe's own identity is tenant A; `driver.other_tenant()` is tenant B on the same
runtime. A runtime that declares no tenancy is *unsupported*; one that declares it but
gives the suite no second identity is *untestable*.
"""

import pytest

from pytest_rkv.contract import ClaimRequest, ClaimState, CompletionRequest, EventType
from pytest_rkv.workload import ACTIVE_BLOCKS, RESIDENT_BLOCKS


@pytest.mark.rkv_obligation("claim-isolation")
@pytest.mark.rkv_litmus("tenant_isolation")
def test_another_tenant_cannot_read_release_see_or_reuse_a_claim(rkv):
    other = rkv.driver.other_tenant()
    claim = rkv.accepted("tenant-a-prefix", 10)
    mark = rkv.mark()
    read = other.get_claim(claim.claim_id)
    released = other.release(claim.claim_id)
    listed = other.pool().claimed_blocks
    theirs = other.complete(CompletionRequest(prompt=rkv.tokens("tenant-a-prefix", 10, extra_tokens=1),
                                              request_id=rkv.request_id("tenant-b-same-prompt")))
    their_events = other.events(0)
    mine = rkv.driver.get_claim(claim.claim_id).unwrap()
    my_events = rkv.events_since(0)
    my_hashes = {h for e in my_events for h in e.block_hashes}
    seen_ids = {e.claim_id for e in their_events} | {c for e in their_events for c in e.blocking_claims}
    reuse = theirs.unwrap().rkv
    rkv.record("tenant_b_read_status", read.status)
    rkv.record("tenant_b_release_status", released.status)
    rkv.record("tenant_b_cached_tokens", rkv.cached_tokens(theirs))
    rkv.record("tenant_b_events", len(their_events))

    assert read.status == 404, f"tenant B read tenant A's claim: {read.status} {read.value or read.error}"
    assert released.status == 404, f"tenant B's release of tenant A's claim answered {released.status}"
    assert claim.claim_id not in listed, "tenant B's pool view lists tenant A's claim"
    assert claim.claim_id not in seen_ids, "tenant B sees events naming tenant A's claim"
    leaked = my_hashes & {h for e in their_events for h in e.block_hashes}
    assert not leaked, f"tenant B sees {len(leaked)} of tenant A's block hashes"
    assert reuse is not None and claim.claim_id not in [r.claim_id for r in reuse.reuse], (
        "tenant B's request was credited with tenant A's claim"
    )
    assert mine.state == ClaimState.RESIDENT and mine.resident_blocks == 10, (
        f"after tenant B's calls tenant A's claim is {mine.state.value} with {mine.resident_blocks} of 10 blocks"
    )
    touched = [e.type.value for e in my_events if e.seq > mark and e.claim_id == claim.claim_id]
    assert touched == [], f"tenant B's calls changed tenant A's claim: {touched}"
    my_list, their_list = rkv.driver.list_claims(), other.list_claims()
    assert my_list == [mine], f"tenant A lists {my_list}; it holds exactly {mine}"
    assert claim.claim_id not in [c.claim_id for c in their_list], "tenant B's GET /v1/kv/claims lists tenant A's claim"
    assert claim.tenant, "a runtime with tenancy must say whose a claim is (`tenant`)"
    posing = other.claim(ClaimRequest(prompt_token_ids=rkv.tokens("tenant-b-posing", 2), tenant=claim.tenant))
    rkv.record("tenant_b_claim_as_a", {"status": posing.status, "error": posing.error and posing.error.type})
    assert (posing.status, posing.error and posing.error.type) == (403, "forbidden"), (
        f"tenant B's claim naming tenant {claim.tenant!r} answered {posing.status} {posing.value or posing.error}"
    )


@pytest.mark.rkv_obligation("claim-isolation")
@pytest.mark.rkv_litmus("tenant_isolation")
def test_one_tenant_cannot_exhaust_the_claim_budget_of_another(rkv):
    other = rkv.driver.other_tenant()
    pool = rkv.driver.pool()
    budget, tenant_budget = pool.claim_budget_blocks, pool.tenant_budget_blocks
    rkv.record("budgets", {"global": budget, "tenant": tenant_budget})
    assert tenant_budget is not None, "the runtime declares tenancy but reports no per-tenant claim budget"
    assert tenant_budget < budget, (
        f"a tenant may hold {tenant_budget} blocks of a {budget}-block budget: one tenant can starve the others"
    )
    filled = other.claim(ClaimRequest(prompt_token_ids=rkv.tokens("tenant-b-fill", tenant_budget)))
    over = other.claim(ClaimRequest(prompt_token_ids=rkv.tokens("tenant-b-over", 1)))
    mine = rkv.claim("tenant-a-rest", budget - tenant_budget)
    refused = [e for e in other.events(0) if e.type == EventType.CLAIM_REFUSED]
    rkv.record("tenant_b_fill_admitted", filled.ok)
    rkv.record("tenant_b_over", {"status": over.status, "reason": over.error.reason if over.error else None})
    rkv.record("tenant_a_rest_admitted", mine.ok)

    assert filled.ok, f"tenant B could not claim its own budget of {tenant_budget} blocks: {filled.error}"
    assert not over.ok and over.status == 409 and over.error.type == "no_admit", (
        f"tenant B went past its {tenant_budget}-block budget: {over.status} {over.value or over.error}"
    )
    assert "tenant" in (over.error.reason or "").lower(), (
        f"the no-admit does not say the tenant budget refused it: {over.error.reason!r}"
    )
    assert len(refused) == 1, f"tenant B sees {len(refused)} claim.refused events, expected its one"
    assert mine.ok and mine.unwrap().state == ClaimState.RESIDENT, (
        f"with tenant B at its budget, tenant A could not claim the remaining {budget - tenant_budget} blocks: "
        f"{mine.error}"
    )
    # The global budget is now full, though tenant A holds far less than its own: it binds.
    past_global = rkv.claim("tenant-a-past-global", 1)
    rkv.record("tenant_a_past_global", {"status": past_global.status,
                                        "reason": past_global.error.reason if past_global.error else None})
    assert not past_global.ok and past_global.status == 409 and past_global.error.type == "no_admit", (
        f"with {budget} of {budget} blocks claimed between the tenants, tenant A's one more block was "
        f"{past_global.status} {past_global.value or past_global.error}"
    )
    assert "global" in (past_global.error.reason or "").lower(), (
        f"the no-admit does not say the global budget refused it: {past_global.error.reason!r}"
    )


@pytest.mark.rkv_obligation("claim-isolation")
@pytest.mark.rkv_litmus("tenant_isolation")
def test_another_tenant_s_hard_claim_refuses_my_request_counted_not_named(rkv):
    """The canonical probe across tenants: A holds the 60-block hard claim, B's 70-block
    request is refused, and B learns how many blocks another tenant holds, never which claim."""
    other = rkv.driver.other_tenant()
    claim = rkv.accepted("tenant-a-resident", RESIDENT_BLOCKS)
    rid = rkv.request_id("tenant-b-active")
    refused = other.complete(CompletionRequest(prompt=rkv.tokens("tenant-b-active", ACTIVE_BLOCKS),
                                               max_tokens=1, request_id=rid))
    their_events = other.events(0)
    rkv.record("tenant_b_refusal", {"status": refused.status,
                                    "error": refused.error.model_dump() if refused.error else None})
    assert refused.status == 409 and refused.error and refused.error.type == "active_refusal", (
        f"tenant B's {ACTIVE_BLOCKS}-block request against tenant A's {RESIDENT_BLOCKS}-block hard claim answered "
        f"{refused.status} {refused.error or 'a completion'}"
    )
    error = refused.error
    assert claim.claim_id not in error.blocking_claims and error.blocking_claims == [], (
        f"tenant B's refusal names claims {error.blocking_claims}; the only blocker is tenant A's, which it may not see"
    )
    assert error.claimed_blocks == {"(another tenant)": RESIDENT_BLOCKS}, (
        f"tenant B's refusal counts claimed blocks as {error.claimed_blocks}; expected "
        f"{{'(another tenant)': {RESIDENT_BLOCKS}}}"
    )
    seen = {e.claim_id for e in their_events} | {c for e in their_events for c in e.blocking_claims}
    assert claim.claim_id not in seen, "tenant B's events name tenant A's claim"
    mine = rkv.driver.get_claim(claim.claim_id).unwrap()
    assert mine.state == ClaimState.RESIDENT and mine.resident_blocks == RESIDENT_BLOCKS, (
        f"after tenant B's refused request tenant A's claim is {mine.state.value}, "
        f"{mine.resident_blocks} of {RESIDENT_BLOCKS} blocks resident"
    )


@pytest.mark.rkv_obligation("claim-isolation")
@pytest.mark.rkv_litmus("tenant_isolation")
def test_harm_across_tenants_names_no_foreign_request(rkv):
    """Tenant B's request displaces tenant A's soft claim: A learns it was harmed, by
    "(another tenant)", never by B's request id; B's trace shows neither A's claim nor
    its block hashes."""
    other = rkv.driver.other_tenant()
    start = rkv.mark()
    rkv.run("tenant-a-cache", 5)  # unclaimed cache of tenant A's, evicted first
    cached = {h for e in rkv.events_since(start) if e.type == EventType.BLOCKS_STORED for h in e.block_hashes}
    soft = rkv.accepted("tenant-a-soft", RESIDENT_BLOCKS, strength="soft")
    mark = rkv.mark()
    rid = rkv.request_id("tenant-b-displacing")
    theirs = other.complete(CompletionRequest(prompt=rkv.tokens("tenant-b-displacing", ACTIVE_BLOCKS),
                                              max_tokens=1, request_id=rid))
    mine_after = rkv.events_since(mark)
    harmed = [e for e in mine_after if e.type == EventType.CLAIM_HARMED]
    their_events = other.events(0)
    rkv.record("tenant_a_harm_events", [e.model_dump(mode="json", include={"claim_id", "request_id", "blocks"})
                                        for e in harmed])
    assert theirs.ok, f"a soft claim never blocks another tenant's request: {theirs.error}"
    assert [(e.claim_id, e.request_id) for e in harmed] == [(soft.claim_id, "(another tenant)")], (
        f"tenant A should see one harm of {soft.claim_id} by \"(another tenant)\", got "
        f"{[(e.claim_id, e.request_id) for e in harmed]}"
    )
    evicted = {h for e in mine_after if e.type == EventType.BLOCKS_EVICTED for h in e.block_hashes}
    named = sorted({e.request_id for e in mine_after if e.request_id} - {"(another tenant)"})
    assert named == [], f"tenant A's events name tenant B's request(s) {named}"
    assert cached <= evicted, (
        f"tenant A saw {len(cached)} of its blocks stored, but only {len(cached & evicted)} of them evicted "
        f"when tenant B's {ACTIVE_BLOCKS}-block request needed the pool"
    )
    my_hashes = {h for e in rkv.events_since(0) if e.claim_id == soft.claim_id for h in e.block_hashes}
    seen = {e.claim_id for e in their_events} | {h for e in their_events for h in e.block_hashes}
    assert soft.claim_id not in seen and not my_hashes & seen, (
        "tenant B's events name tenant A's claim or its block hashes"
    )
