"""Active/resident arbitration under KV pressure: the canonical probe and its neighbours."""

import pytest

from pytest_rkv.contract import ClaimState, EventType
from pytest_rkv.workload import ACTIVE_BLOCKS, POOL_BLOCKS, RESIDENT_BLOCKS


@pytest.mark.rkv_obligation("active-refusal")
@pytest.mark.rkv_litmus("active_refusal")
def test_canonical_probe_refuses_the_active_request_and_names_the_claim(rkv):
    timeline = rkv.timeline()
    claim = rkv.accepted("resident", RESIDENT_BLOCKS)
    timeline.resident_written(f"{RESIDENT_BLOCKS}-block hard claim resident")
    before = rkv.pool_adds_up("claim resident")
    mark = rkv.mark()
    rid, active = rkv.run("active", ACTIVE_BLOCKS, held=claim)
    timeline.active_ran(f"{ACTIVE_BLOCKS}-block prefill", admitted=active.ok)
    rkv.pool_adds_up("active request answered")
    after = rkv.driver.get_claim(claim.claim_id).unwrap()
    again_rid, again = rkv.reuse_query("resident", RESIDENT_BLOCKS)
    timeline.resident_measured("resident re-queried", rkv.cached_tokens(again) // rkv.block_size)
    rkv.pool_adds_up("resident re-queried")
    rkv.record("timeline", timeline.steps)
    events = rkv.events_since(mark)
    refusals = [e for e in events if e.type == EventType.REQUEST_REFUSED]
    mine = [(e.type.value, e.request_id, e.blocks) for e in events if e.claim_id == claim.claim_id]
    rkv.record("active_status", active.status)
    rkv.record("refusal", active.error.model_dump(mode="json") if active.error else None)
    rkv.record("resident_cached_tokens_after", rkv.cached_tokens(again))

    assert not active.ok, (
        f"the {ACTIVE_BLOCKS}-block request was admitted beside a {RESIDENT_BLOCKS}-block hard claim "
        f"in a {POOL_BLOCKS}-block pool: the claim cannot have survived"
    )
    err = active.error
    assert (active.status, err.type) == (409, "active_refusal"), (
        f"refused as {active.status} {err.type!r}, the contract's refusal is 409 'active_refusal': {err.message}"
    )
    assert err.request_id == rid, f"the refusal names request {err.request_id!r}, not {rid!r}"
    assert err.blocking_claims == [claim.claim_id], f"the refusal names {err.blocking_claims}, not exactly [{claim.claim_id}]"
    arithmetic = {"needed": err.needed_blocks, "free": err.free_blocks, "evictable": err.evictable_blocks,
                  "claimed": err.claimed_blocks}
    assert arithmetic == {"needed": ACTIVE_BLOCKS, "free": before.free_blocks, "evictable": before.cached_blocks,
                          "claimed": {claim.claim_id: RESIDENT_BLOCKS}}, (
        f"the refusal's arithmetic {arithmetic} is not the pool's: {ACTIVE_BLOCKS} needed, "
        f"{before.free_blocks} free, {before.cached_blocks} evictable, {RESIDENT_BLOCKS} claimed"
    )
    assert [(e.request_id, e.blocking_claims, e.blocks) for e in refusals] == [(rid, [claim.claim_id], ACTIVE_BLOCKS)], (
        f"expected one refusal event for {rid} naming {claim.claim_id} and {ACTIVE_BLOCKS} blocks: {refusals}"
    )
    assert after.state == ClaimState.RESIDENT and after.resident_blocks == RESIDENT_BLOCKS
    assert mine == [("claim.reused", again_rid, RESIDENT_BLOCKS)], f"the claim's events after the probe: {mine}"
    assert rkv.cached_tokens(again) == RESIDENT_BLOCKS * rkv.block_size, "the resident lost blocks"


@pytest.mark.rkv_obligation("active-refusal")
@pytest.mark.rkv_litmus("active_refusal")
def test_refusal_names_exactly_the_claims_that_block(rkv):
    """Beside the blocking hard claim sit a released hard claim and a soft claim: neither
    blocks anything, so neither may be named, and both count as evictable."""
    hard = rkv.accepted("blocker", 30)
    gone = rkv.accepted("released-hard", 20)
    rkv.driver.release(gone.claim_id).unwrap()
    soft = rkv.accepted("soft-bystander", 10, strength="soft")
    pool = rkv.pool_adds_up("three claims, one released")
    rid, active = rkv.run("active", ACTIVE_BLOCKS, held=hard)
    soft_after = rkv.driver.get_claim(soft.claim_id).unwrap()
    rkv.record("refusal", active.error.model_dump(mode="json") if active.error else None)
    assert not active.ok and active.status == 409, f"{ACTIVE_BLOCKS} blocks cannot fit beside a 30-block hard claim"
    err = active.error
    assert err.blocking_claims == [hard.claim_id], (
        f"the refusal names {err.blocking_claims}; only {hard.claim_id} blocks "
        f"({gone.claim_id} is released, {soft.claim_id} is soft)"
    )
    evictable = pool.cached_blocks + pool.claimed_blocks.get(soft.claim_id, 0)
    got = (err.needed_blocks, err.free_blocks, err.evictable_blocks, err.claimed_blocks)
    assert got == (ACTIVE_BLOCKS, pool.free_blocks, evictable, {hard.claim_id: 30}), (
        f"needed/free/evictable/claimed = {got}; the pool says {ACTIVE_BLOCKS}/{pool.free_blocks}/"
        f"{evictable}/{{{hard.claim_id}: 30}}"
    )
    assert err.free_blocks + err.evictable_blocks + sum(err.claimed_blocks.values()) == pool.total_blocks
    assert soft_after.state == ClaimState.RESIDENT and soft_after.resident_blocks == 10, (
        f"a refused request harmed the soft claim: {soft_after.state.value}, {soft_after.resident_blocks} blocks"
    )


@pytest.mark.rkv_obligation("active-refusal")
@pytest.mark.rkv_litmus("ordinary_eviction")
def test_unclaimed_cache_is_evicted_not_refused(rkv):
    rkv.run("resident", RESIDENT_BLOCKS)
    _, active = rkv.run("active", ACTIVE_BLOCKS)
    _, again = rkv.reuse_query("resident", RESIDENT_BLOCKS)
    rkv.record("active_admitted", active.ok)
    rkv.record("resident_cached_tokens_after", rkv.cached_tokens(again))
    assert active.ok, f"refusal is for hard claims only; with none, the request must run: {active.error}"
    assert rkv.cached_tokens(again) < RESIDENT_BLOCKS * rkv.block_size


@pytest.mark.rkv_obligation("soft-harm")
@pytest.mark.rkv_litmus("soft_priority")
def test_soft_claim_outlives_unclaimed_cache(rkv):
    rkv.run("plain", 20)
    soft = rkv.accepted("soft", 40, strength="soft")
    # 80 - 20 cached - 40 soft = 20 free; 30 more must come from the unclaimed 20, not the soft claim
    rid, active = rkv.run("active", 30)
    after = rkv.driver.get_claim(soft.claim_id).unwrap()
    _, again = rkv.reuse_query("soft", 40)
    harmed = [e for e in rkv.events_since(0) if e.type == EventType.CLAIM_HARMED]
    rkv.record("soft_cached_tokens_after", rkv.cached_tokens(again))
    assert active.ok, f"a soft claim never blocks an active request: {active.error}"
    assert not harmed and after.state == ClaimState.RESIDENT, "the soft claim was harmed while unclaimed cache was left"
    assert rkv.cached_tokens(again) == 40 * rkv.block_size


@pytest.mark.rkv_obligation("soft-harm")
@pytest.mark.rkv_litmus("soft_priority")
def test_soft_claim_loss_is_reported_as_attributed_harm(rkv):
    soft = rkv.accepted("soft", RESIDENT_BLOCKS, strength="soft")
    mark = rkv.mark()
    rid, active = rkv.run("active", ACTIVE_BLOCKS)
    harmed = [e for e in rkv.events_since(mark) if e.type == EventType.CLAIM_HARMED]
    state = rkv.driver.get_claim(soft.claim_id).unwrap()
    _, again = rkv.reuse_query("soft", RESIDENT_BLOCKS)
    surviving = rkv.cached_tokens(again) // rkv.block_size
    rkv.record("harm_events", [e.model_dump(mode="json", include={"claim_id", "request_id", "blocks"}) for e in harmed])
    rkv.record("soft_blocks_surviving", surviving)
    assert active.ok, f"a soft claim never blocks an active request: {active.error}"
    assert [(e.claim_id, e.request_id) for e in harmed] == [(soft.claim_id, rid)], (
        f"expected one harm event naming {soft.claim_id} and request {rid}, got {harmed}"
    )
    # 70 blocks into an 80-block pool holding only the soft claim: at least 50 of its 60
    # blocks had to go, and no more were lost than are missing from its prefix now.
    at_least, at_most = ACTIVE_BLOCKS - (POOL_BLOCKS - RESIDENT_BLOCKS), RESIDENT_BLOCKS - surviving
    lost = harmed[0]
    assert at_least <= lost.blocks <= at_most, (
        f"the harm event reports {lost.blocks} blocks lost; at least {at_least} had to be evicted and "
        f"{surviving} of {RESIDENT_BLOCKS} still hit, so it lost between {at_least} and {at_most}"
    )
    assert not lost.block_hashes or len(set(lost.block_hashes)) == len(lost.block_hashes) == lost.blocks, (
        f"the harm event names {len(lost.block_hashes)} block hashes for {lost.blocks} blocks"
    )
    assert state.state == ClaimState.HARMED, f"after losing blocks the soft claim reports {state.state.value}"
    rkv.stays_ended(soft, "soft", RESIDENT_BLOCKS, "harmed")


@pytest.mark.rkv_obligation("write-no-admit")
@pytest.mark.rkv_litmus("write_no_admit")
def test_claim_over_budget_is_refused_whole(rkv):
    before = rkv.driver.pool()
    too_many = before.claim_budget_blocks + 1
    mark = rkv.mark()
    reply = rkv.claim("too-big", too_many)
    after = rkv.pool_adds_up("claim refused")
    events = rkv.events_since(mark)
    refused = [e for e in events if e.type == EventType.CLAIM_REFUSED]
    rkv.record("budget_blocks", before.claim_budget_blocks)
    rkv.record("reply_status", reply.status)
    assert not reply.ok, f"a {too_many}-block claim over a {before.claim_budget_blocks}-block budget was accepted: {reply.value}"
    assert reply.status == 409 and reply.error.type == "no_admit" and reply.error.reason, (
        f"expected 409 no_admit with a reason, got {reply.status} {reply.error}"
    )
    assert after.claimed_blocks == before.claimed_blocks == {}, "a refused claim left blocks pinned"
    assert [e.type for e in events if e.type.value.startswith("claim.")] == [EventType.CLAIM_REFUSED], (
        f"a refused claim must leave one claim.refused event and nothing else: {[e.type.value for e in events]}"
    )
    assert (refused[0].claim_id, refused[0].request_id, refused[0].blocks) == (None, reply.error.request_id, too_many), (
        f"the refusal event {refused[0]} does not match the answer (request {reply.error.request_id}, "
        f"{too_many} blocks, no claim id)"
    )

    # The budget that binds this caller: the global one, or its tenant's when smaller (v1.1).
    budget = min(b for b in (before.claim_budget_blocks, before.tenant_budget_blocks) if b is not None)
    within = rkv.claim("within-budget", budget)
    assert within.ok and within.value.blocks == budget, (
        f"a claim of exactly the {budget}-block budget must be admitted: {within.error}"
    )
