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
    mark = rkv.mark()
    rid, active = rkv.run("active", ACTIVE_BLOCKS, held=claim)
    timeline.active_ran(f"{ACTIVE_BLOCKS}-block prefill", admitted=active.ok)
    after = rkv.driver.get_claim(claim.claim_id).unwrap()
    _, again = rkv.reuse_query("resident", RESIDENT_BLOCKS)
    timeline.resident_measured("resident re-queried", rkv.cached_tokens(again) // rkv.block_size)
    rkv.record("timeline", timeline.steps)
    refusals = [e for e in rkv.events_since(mark) if e.type == EventType.REQUEST_REFUSED]
    rkv.record("active_status", active.status)
    rkv.record("refusal", active.error.model_dump(mode="json") if active.error else None)
    rkv.record("resident_cached_tokens_after", rkv.cached_tokens(again))

    assert not active.ok, (
        f"the {ACTIVE_BLOCKS}-block request was admitted beside a {RESIDENT_BLOCKS}-block hard claim "
        f"in a {POOL_BLOCKS}-block pool: the claim cannot have survived"
    )
    err = active.error
    assert err.type == "active_refusal", f"refused, but as {err.type!r}: {err.message}"
    assert claim.claim_id in err.blocking_claims, f"the refusal names {err.blocking_claims}, not {claim.claim_id}"
    assert err.needed_blocks == ACTIVE_BLOCKS and err.claimed_blocks.get(claim.claim_id) == RESIDENT_BLOCKS
    assert (err.free_blocks or 0) + (err.evictable_blocks or 0) < ACTIVE_BLOCKS, "the arithmetic does not show why"
    assert [(e.request_id, e.blocking_claims) for e in refusals] == [(rid, [claim.claim_id])], (
        f"no single refusal event for {rid} naming {claim.claim_id}: {refusals}"
    )
    assert after.state == ClaimState.RESIDENT and after.resident_blocks == RESIDENT_BLOCKS
    assert rkv.cached_tokens(again) == RESIDENT_BLOCKS * rkv.block_size, "the resident lost blocks"


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
    state = rkv.driver.get_claim(soft.claim_id).unwrap().state
    rkv.record("harm_events", [e.model_dump(mode="json", include={"claim_id", "request_id", "blocks"}) for e in harmed])
    assert active.ok, f"a soft claim never blocks an active request: {active.error}"
    assert [(e.claim_id, e.request_id) for e in harmed] == [(soft.claim_id, rid)], (
        f"expected one harm event naming {soft.claim_id} and request {rid}, got {harmed}"
    )
    assert harmed[0].blocks > 0, "the harm event does not say how many blocks were lost"
    assert state == ClaimState.HARMED, f"after losing blocks the soft claim reports {state.value}"


@pytest.mark.rkv_obligation("write-no-admit")
@pytest.mark.rkv_litmus("write_no_admit")
def test_claim_over_budget_is_refused_whole(rkv):
    before = rkv.driver.pool()
    too_many = before.claim_budget_blocks + 1
    mark = rkv.mark()
    reply = rkv.claim("too-big", too_many)
    after = rkv.driver.pool()
    events = rkv.events_since(mark)
    rkv.record("budget_blocks", before.claim_budget_blocks)
    rkv.record("reply_status", reply.status)
    assert not reply.ok, f"a {too_many}-block claim over a {before.claim_budget_blocks}-block budget was accepted: {reply.value}"
    assert reply.status == 409 and reply.error.type == "no_admit" and reply.error.reason, (
        f"expected 409 no_admit with a reason, got {reply.status} {reply.error}"
    )
    assert after.claimed_blocks == before.claimed_blocks, "a refused claim left blocks pinned"
    assert not [e for e in events if e.type == EventType.CLAIM_ACCEPTED], "a refused claim was half-accepted"
    assert [e.type for e in events if e.type == EventType.CLAIM_REFUSED] == [EventType.CLAIM_REFUSED]
