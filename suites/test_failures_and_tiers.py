"""Materialization and restore failure, demotion and restore-before-reuse."""

import pytest

from pytest_rkv.contract import ClaimState, CompletionRequest, EventType, FaultRequest
from pytest_rkv.errors import NotApplicable, Unsupported
from pytest_rkv.workload import ACTIVE_BLOCKS, RESIDENT_BLOCKS


def _seq(events, type_, claim_id=None, request_id=None):
    found = [e.seq for e in events if e.type == type_
             and (claim_id is None or e.claim_id == claim_id)
             and (request_id is None or e.request_id == request_id)]
    return found[0] if found else None


def _require_demotion(rkv):
    if not rkv.info.demotion:
        raise Unsupported("the backend reports no demotion tier")


def _demote_by_pressure(rkv, tag, blocks=RESIDENT_BLOCKS):
    """A demotable hard claim, then the canonical active request, which should push it to
    the host tier instead of being refused."""
    _require_demotion(rkv)
    claim = rkv.accepted(tag, blocks, demotable=True)
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
    assert host.host_used_blocks <= host.host_total_blocks, (
        f"the host tier holds {host.host_used_blocks} blocks of its {host.host_total_blocks}"
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


@pytest.mark.rkv_obligation("soft-harm")
@pytest.mark.rkv_litmus("demotion")
def test_demotion_that_takes_a_soft_claim_s_blocks_reports_the_harm(rkv):
    """A soft claim whose blocks lie inside a demotable hard claim's prefix: the pressure
    that demotes the hard claim either leaves the soft claim whole, or harms it with one
    event counting exactly the blocks it lost. Never a soft claim that silently shrank."""
    if not rkv.info.demotion:
        raise NotApplicable("no demotion tier (soft harm by eviction is tested in test_pressure)")
    soft = rkv.accepted("shared-prefix", 10, strength="soft")
    mark = rkv.mark()
    hard, rid = _demote_by_pressure(rkv, "shared-prefix", blocks=20)
    events = rkv.events_since(mark)
    now = rkv.driver.get_claim(soft.claim_id).unwrap()
    harms = [(e.request_id, e.blocks) for e in events if e.type == EventType.CLAIM_HARMED
             and e.claim_id == soft.claim_id]
    rkv.record("soft_claim_after_demotion", {"state": now.state.value, "resident_blocks": now.resident_blocks,
                                             "harms": harms})
    assert rkv.driver.get_claim(hard.claim_id).unwrap().state == ClaimState.DEMOTED, (
        "the demotable claim was not demoted by the pressure that needed its blocks"
    )
    if now.state == ClaimState.RESIDENT:
        assert (now.resident_blocks, harms) == (soft.blocks, []), (
            f"the soft claim reports resident with {now.resident_blocks} of {soft.blocks} blocks, harm events {harms}"
        )
    else:
        assert now.state == ClaimState.HARMED and now.resident_blocks == 0, (
            f"after the demotion the soft claim reports {now.state.value} with {now.resident_blocks} blocks"
        )
        assert harms == [(rid, soft.blocks)], (
            f"the soft claim lost its {soft.blocks} blocks to {rid}; its harm events (request, blocks): {harms}"
        )


@pytest.mark.rkv_obligation("demotion-restore")
@pytest.mark.rkv_litmus("demotion")
def test_nested_demoted_claims_are_both_restored_before_reuse(rkv):
    """Two demotable claims, one a prefix of the other, and a request that needs the whole
    pool: both are demoted (not refused), and one request on the longer prefix restores
    both before it reuses them, crediting each with its own blocks."""
    _require_demotion(rkv)
    inner = rkv.accepted("nested", 10, demotable=True)
    outer = rkv.accepted("nested", 20, demotable=True)
    # The whole pool: a prompt one token short of it, so the token it generates fits too
    # (vLLM's longest sequence is the pool). Either claim alone frees too little.
    _, whole = rkv.run("whole-pool", rkv.info.total_blocks - 1, extra_tokens=rkv.block_size - 1)
    states = {c.claim_id: rkv.driver.get_claim(c.claim_id).unwrap() for c in (inner, outer)}
    seen = {k: [v.state.value, v.tier, v.resident_blocks] for k, v in states.items()}
    rkv.record("nested_after_pressure", seen)
    assert whole.ok, f"two demotable claims should make room for the whole pool by demotion: {whole.error}"
    assert {(v.state, v.tier, v.resident_blocks) for v in states.values()} == {(ClaimState.DEMOTED, "host", 0)}, (
        f"a request needing the whole pool left the claims (state, tier, resident blocks) as {seen}"
    )
    mark = rkv.mark()
    rid, again = rkv.reuse_query("nested", 20)
    done = again.unwrap()
    events = rkv.events_since(mark)
    reuse = sorted((r.claim_id, r.tokens, r.restored) for r in (done.rkv.reuse if done.rkv else []))
    rkv.record("nested_reuse", reuse)
    assert reuse == sorted([(inner.claim_id, inner.tokens, True), (outer.claim_id, outer.tokens, True)]), (
        f"reuse records (claim, tokens, restored): {reuse}"
    )
    assert done.usage.prompt_tokens_details.cached_tokens == outer.tokens, (
        f"{done.usage.prompt_tokens_details.cached_tokens} cached tokens; the restored prefix is {outer.tokens}"
    )
    for claim in (inner, outer):
        mine = [(e.type.value, e.request_id, e.blocks) for e in events if e.claim_id == claim.claim_id]
        assert mine == [("claim.restored", rid, claim.blocks), ("claim.reused", rid, claim.blocks)], (
            f"{claim.claim_id}'s events on reuse (type, request, blocks): {mine}"
        )
        now = rkv.driver.get_claim(claim.claim_id).unwrap()
        assert (now.state, now.tier, now.resident_blocks) == (ClaimState.RESIDENT, "device", claim.blocks), (
            f"after the restore {claim.claim_id} reports {now.state.value} on {now.tier} with "
            f"{now.resident_blocks} of {claim.blocks} blocks"
        )
    pool = rkv.driver.pool()
    assert pool.host_used_blocks == 0, f"after both restores the host tier still holds {pool.host_used_blocks} blocks"


@pytest.mark.rkv_obligation("demotion-restore")
@pytest.mark.rkv_litmus("demotion")
def test_pressure_demotes_and_harms_but_never_refuses_without_a_hard_blocker(rkv):
    """A hard demotable claim, a soft demotable one and a plain soft one, and a request
    that needs all the room they can give: no hard claim stays in the way, so it is
    admitted; the hard claim is demoted (it may not be dropped), the soft demotable one is
    demoted or harmed, and the soft one is harmed, each with its event."""
    _require_demotion(rkv)
    hard = rkv.accepted("mixed-hard", 20, demotable=True)
    soft_demotable = rkv.accepted("mixed-soft-demotable", 10, strength="soft", demotable=True)
    soft = rkv.accepted("mixed-soft", 30, strength="soft")
    mark = rkv.mark()
    rid, active = rkv.run("active", ACTIVE_BLOCKS)
    events = rkv.events_since(mark)
    states = {c.claim_id: rkv.driver.get_claim(c.claim_id).unwrap().state for c in (hard, soft_demotable, soft)}
    harms = {c: [(e.request_id, e.blocks) for e in events if e.type == EventType.CLAIM_HARMED and e.claim_id == c]
             for c in states}
    rkv.record("mixed_pressure", {c: [s.value, harms[c]] for c, s in states.items()})
    assert active.ok, f"no hard claim could stay in the way, yet the request was refused: {active.error}"
    assert states[hard.claim_id] == ClaimState.DEMOTED, f"the hard demotable claim is {states[hard.claim_id].value}"
    assert states[soft_demotable.claim_id] in (ClaimState.DEMOTED, ClaimState.HARMED), (
        f"the soft demotable claim is {states[soft_demotable.claim_id].value}, though its blocks were needed"
    )
    if states[soft_demotable.claim_id] == ClaimState.HARMED:
        assert harms[soft_demotable.claim_id] == [(rid, soft_demotable.blocks)], harms
    # 80 blocks: 20 free, 30 from the demotable claims, so at least 20 of the soft claim's 30
    at_least = ACTIVE_BLOCKS - (rkv.info.total_blocks - 60) - 30
    assert states[soft.claim_id] == ClaimState.HARMED and len(harms[soft.claim_id]) == 1, (
        f"the soft claim is {states[soft.claim_id].value}, harm events (request, blocks) {harms[soft.claim_id]}"
    )
    assert harms[soft.claim_id][0][0] == rid and at_least <= harms[soft.claim_id][0][1] <= soft.blocks, (
        f"the soft claim's harm (request, blocks) {harms[soft.claim_id][0]}: expected {rid} and "
        f"{at_least} to {soft.blocks} blocks"
    )


@pytest.mark.rkv_obligation("demotion-restore")
@pytest.mark.rkv_litmus("demotion")
def test_demoted_claim_is_not_credited_for_a_prefix_another_claim_serves(rkv):
    """A demoted claim extends a resident one: a request on the resident prefix alone is
    served from the resident claim's blocks, restores nothing, and credits only that claim
    (crediting the demoted one would be reuse without a restore)."""
    _require_demotion(rkv)
    inner = rkv.accepted("outer-demoted", 10)
    outer, _ = _demote_by_pressure(rkv, "outer-demoted", blocks=20)
    if rkv.driver.get_claim(outer.claim_id).unwrap().state != ClaimState.DEMOTED:
        raise Unsupported("the pressure did not demote the outer claim", scope="probe")
    mark = rkv.mark()
    rid, again = rkv.reuse_query("outer-demoted", 10)
    done = again.unwrap()
    reuse = [(r.claim_id, r.tokens, r.restored) for r in (done.rkv.reuse if done.rkv else [])]
    outer_events = [e.type.value for e in rkv.events_since(mark) if e.claim_id == outer.claim_id]
    rkv.record("reuse_beside_demoted", reuse)
    assert reuse == [(inner.claim_id, inner.tokens, False)], f"reuse records (claim, tokens, restored): {reuse}"
    assert outer_events == [], f"a request on the inner prefix alone gave the demoted claim events {outer_events}"
    assert rkv.driver.get_claim(outer.claim_id).unwrap().state == ClaimState.DEMOTED


@pytest.mark.rkv_obligation("demotion-restore")
@pytest.mark.rkv_litmus("demotion")
def test_demotion_beside_a_request_that_reuses_half_the_claim(rkv):
    """A request that starts with the first half of a demotable claim's prefix and needs
    the room of the other half: it is admitted, the claim is demoted, the pool still adds
    up (the half being reused is neither lost nor counted twice), and the whole prefix
    later comes back by a restore before its reuse."""
    _require_demotion(rkv)
    claim = rkv.accepted("half-reused", RESIDENT_BLOCKS, demotable=True)
    half = RESIDENT_BLOCKS // 2
    fresh = rkv.info.total_blocks - RESIDENT_BLOCKS + half - 5  # needs room only demotion can give
    rid = rkv.request_id("half-and-fresh")
    reply = rkv.driver.complete(CompletionRequest(
        prompt=rkv.tokens("half-reused", half) + rkv.tokens("half-fresh", fresh), max_tokens=1, request_id=rid))
    rkv.record("half_and_fresh", {"admitted": reply.ok, "cached_tokens": reply.value and
                                  reply.value.usage.prompt_tokens_details.cached_tokens})
    assert reply.ok, f"a demotable claim should make room by demotion, not refusal: {reply.error}"
    state = rkv.driver.get_claim(claim.claim_id).unwrap().state
    assert state == ClaimState.DEMOTED, f"with {half + fresh} blocks running beside it the claim reports {state.value}"
    rkv.pool_adds_up("after a demotion beside a request reusing half the claim")
    _, again = rkv.reuse_query("half-reused", RESIDENT_BLOCKS)
    done = again.unwrap()
    reuse = [(r.claim_id, r.tokens, r.restored) for r in (done.rkv.reuse if done.rkv else [])]
    assert reuse == [(claim.claim_id, claim.tokens, True)], f"reuse records (claim, tokens, restored): {reuse}"
    rkv.pool_adds_up("after the restore")
