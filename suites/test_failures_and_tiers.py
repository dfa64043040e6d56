"""Materialization and restore failure, demotion and restore-before-reuse."""

import pytest

from pytest_rkv.contract import ClaimState, EventType, FaultRequest
from pytest_rkv.errors import NotApplicable, Unsupported
from pytest_rkv.workload import ACTIVE_BLOCKS, RESIDENT_BLOCKS


def _seq(events, type_, claim_id=None, request_id=None):
    found = [e.seq for e in events if e.type == type_
             and (claim_id is None or e.claim_id == claim_id)
             and (request_id is None or e.request_id == request_id)]
    return found[0] if found else None


def _demote_by_pressure(rkv, tag):
    """A demotable hard claim, then the canonical active request, which should push it to
    the host tier instead of being refused."""
    if not rkv.info.demotion:
        raise Unsupported("the backend reports no demotion tier")
    claim = rkv.accepted(tag, RESIDENT_BLOCKS, demotable=True)
    rid, active = rkv.run("active", ACTIVE_BLOCKS)
    assert active.ok, f"a demotable claim should make room by demotion, not refusal: {active.error}"
    return claim, rid


@pytest.mark.rkv_obligation("materialization-failure")
@pytest.mark.rkv_litmus("materialization_failure")
def test_failed_materialization_is_scoped_to_the_claim(rkv):
    rkv.driver.inject_fault(FaultRequest(kind="fail_next_materialization"))
    mark = rkv.mark()
    claim = rkv.claim("doomed", 20).unwrap()
    events = rkv.events_since(mark)
    mine = [e.type.value for e in events if e.claim_id == claim.claim_id]
    rkv.record("claim_event_types", mine)
    if claim.state == ClaimState.RESIDENT and "claim.materialization_failed" not in mine:
        raise Unsupported("the injected materialization failure did not fire: the claim materialized "
                          f"(events {mine})", scope="probe")
    pool = rkv.pool_adds_up("claim failed")
    _, again = rkv.reuse_query("doomed", 20)
    assert claim.state == ClaimState.FAILED and claim.reason, f"the claim reports {claim.state.value}"
    assert mine == ["claim.accepted", "claim.materialization_failed"], f"claim events: {mine}"
    assert claim.claim_id not in pool.claimed_blocks, "a failed claim still holds blocks"
    record = again.unwrap().rkv
    assert record is not None and all(r.claim_id != claim.claim_id for r in record.reuse), (
        "a request was told it reused a claim that never materialized"
    )
    rkv.stays_ended(claim, "doomed", 20, "failed")


@pytest.mark.rkv_obligation("materialization-failure")
@pytest.mark.rkv_litmus("materialization_failure")
def test_failed_restore_is_not_reported_as_reuse(rkv):
    if not rkv.info.demotion:
        raise NotApplicable("no demotion tier, so nothing is ever restored (see demotion-restore)")
    claim, _ = _demote_by_pressure(rkv, "restore-fails")
    rkv.driver.inject_fault(FaultRequest(kind="fail_next_restore", claim_id=claim.claim_id))
    mark = rkv.mark()
    rid, again = rkv.reuse_query("restore-fails", RESIDENT_BLOCKS)
    done = again.unwrap()
    events = rkv.events_since(mark)
    failed_at = _seq(events, EventType.CLAIM_RESTORE_FAILED, claim_id=claim.claim_id)
    completed_at = _seq(events, EventType.REQUEST_COMPLETED, request_id=rid)
    state = rkv.driver.get_claim(claim.claim_id).unwrap().state
    fired = failed_at is not None or state == ClaimState.FAILED or (done.rkv and done.rkv.failures)
    if not fired:
        raise Unsupported("the injected restore failure did not fire: the claim was restored "
                          f"(now {state.value})", scope="probe")
    rkv.record("cached_tokens", done.usage.prompt_tokens_details.cached_tokens)
    rkv.record("reuse", [r.model_dump(mode="json") for r in (done.rkv.reuse if done.rkv else [])])
    assert done.rkv is not None and all(r.claim_id != claim.claim_id for r in done.rkv.reuse), (
        "a recompute after a failed restore was reported as reuse of the claim"
    )
    assert done.usage.prompt_tokens_details.cached_tokens < claim.tokens, "recomputed tokens counted as cached"
    assert [f.claim_id for f in done.rkv.failures] == [claim.claim_id], "the response does not name the failed claim"
    assert failed_at is not None, "no restore-failure event names the claim"
    assert completed_at is None or failed_at < completed_at, "the failure is ordered after the request's outcome"
    assert state == ClaimState.FAILED, f"after a failed restore the claim reports {state.value}"
    rkv.stays_ended(claim, "restore-fails", RESIDENT_BLOCKS, "failed")


@pytest.mark.rkv_obligation("materialization-failure")
@pytest.mark.rkv_litmus("materialization_failure")
def test_restore_failure_armed_for_one_claim_spares_the_others(rkv):
    if not rkv.info.demotion:
        raise NotApplicable("no demotion tier, so nothing is ever restored (see demotion-restore)")
    a = rkv.accepted("scoped-a", 20, demotable=True)
    b = rkv.accepted("scoped-b", 20, demotable=True)
    _, active = rkv.run("active", ACTIVE_BLOCKS)
    assert active.ok, f"two demotable claims should make room by demotion: {active.error}"
    if {rkv.driver.get_claim(c.claim_id).unwrap().state for c in (a, b)} != {ClaimState.DEMOTED}:
        raise Unsupported("the pressure did not demote both claims; the scoping probe needs both on the host",
                          scope="probe")
    rkv.driver.inject_fault(FaultRequest(kind="fail_next_restore", claim_id=a.claim_id))
    _, first = rkv.reuse_query("scoped-b", 20)
    _, second = rkv.reuse_query("scoped-a", 20)
    b_reuse = [(r.claim_id, r.restored) for r in (first.unwrap().rkv.reuse if first.unwrap().rkv else [])]
    a_failures = [f.claim_id for f in (second.unwrap().rkv.failures if second.unwrap().rkv else [])]
    states = {c.claim_id: rkv.driver.get_claim(c.claim_id).unwrap().state.value for c in (a, b)}
    assert b_reuse == [(b.claim_id, True)], f"{b.claim_id} should restore normally, a fault armed for {a.claim_id} fired on it: {b_reuse}"
    assert a_failures == [a.claim_id], f"the fault armed for {a.claim_id} did not fail its restore: {a_failures}"
    assert states == {a.claim_id: "failed", b.claim_id: "resident"}, f"claim states: {states}"


@pytest.mark.rkv_obligation("demotion-restore")
@pytest.mark.rkv_litmus("demotion")
def test_demoted_claim_is_restored_before_it_is_reused(rkv):
    mark = rkv.mark()
    claim, active_rid = _demote_by_pressure(rkv, "demoted")
    demoted = [e for e in rkv.events_since(mark) if e.type == EventType.CLAIM_DEMOTED]
    state = rkv.driver.get_claim(claim.claim_id).unwrap()
    host = rkv.driver.pool()
    mark = rkv.mark()
    rid, again = rkv.reuse_query("demoted", RESIDENT_BLOCKS)
    done = again.unwrap()
    events = rkv.events_since(mark)
    restored_at = _seq(events, EventType.CLAIM_RESTORED, claim_id=claim.claim_id)
    reused_at = _seq(events, EventType.CLAIM_REUSED, claim_id=claim.claim_id)
    rkv.record("demotion_events", len(demoted))
    rkv.record("restored_seq", restored_at)
    rkv.record("reused_seq", reused_at)
    assert [(e.claim_id, e.request_id, e.tier) for e in demoted] == [(claim.claim_id, active_rid, "host")], (
        f"expected one demotion of {claim.claim_id} to host caused by {active_rid}: {demoted}"
    )
    assert state.state == ClaimState.DEMOTED and state.tier == "host", f"claim reports {state.state.value} on {state.tier}"
    assert state.resident_blocks == 0 and demoted[0].blocks == RESIDENT_BLOCKS, (
        f"a demoted claim has {state.resident_blocks} blocks on the device and its event moved "
        f"{demoted[0].blocks}; expected 0 and {RESIDENT_BLOCKS}"
    )
    assert (host.host_used_blocks, host.claimed_blocks.get(claim.claim_id)) == (RESIDENT_BLOCKS, None), (
        f"while demoted the pool shows {host.host_used_blocks} host blocks used and "
        f"{host.claimed_blocks.get(claim.claim_id)} device blocks for the claim"
    )
    reuse = [r for r in (done.rkv.reuse if done.rkv else []) if r.claim_id == claim.claim_id]
    assert reuse and reuse[0].restored and reuse[0].tokens == claim.tokens, f"reuse record: {reuse}"
    assert done.usage.prompt_tokens_details.cached_tokens == claim.tokens, "restored blocks not counted as cached"
    assert restored_at is not None, "the claim was reused with no restore event"
    assert reused_at is not None and restored_at < reused_at, "the restore is not ordered before the reuse"
    mine = [(e.type.value, e.request_id, e.blocks) for e in events if e.claim_id == claim.claim_id]
    assert mine == [("claim.restored", rid, RESIDENT_BLOCKS), ("claim.reused", rid, RESIDENT_BLOCKS)], (
        f"the claim's events on reuse (type, request, blocks): {mine}"
    )
    now = rkv.driver.get_claim(claim.claim_id).unwrap()
    assert (now.state, now.tier, now.resident_blocks) == (ClaimState.RESIDENT, "device", RESIDENT_BLOCKS), (
        f"after its restore the claim reports {now.state.value} on {now.tier} with {now.resident_blocks} blocks"
    )
    pool = rkv.driver.pool()
    assert pool.host_used_blocks == 0 and pool.claimed_blocks.get(claim.claim_id) == RESIDENT_BLOCKS, (
        f"after the restore the pool shows {pool.host_used_blocks} host blocks used and "
        f"{pool.claimed_blocks.get(claim.claim_id)} device blocks for the claim"
    )
