"""Claim isolation between tenants (RKV API v1.1).

The probe's own identity is tenant A; `driver.other_tenant()` is tenant B on the same
runtime. A runtime that declares no tenancy is *unsupported*; one that declares it but
gives the suite no second identity is *untestable*.
"""

import pytest

from pytest_rkv.contract import ClaimRequest, ClaimState, CompletionRequest, EventType


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
