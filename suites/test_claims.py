"""Claim identity, materialization predicate, ordered lifecycle, release and expiry."""

import pytest

from pytest_rkv.contract import ClaimRequest, ClaimState, EventType, servable_blocks
from pytest_rkv.trace import order_problems
from pytest_rkv.workload import ACTIVE_BLOCKS, RESIDENT_BLOCKS


@pytest.mark.rkv_obligation("claim-identity")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_each_claim_has_its_own_identity(rkv):
    a = rkv.accepted("identity-a", 10)
    b = rkv.accepted("identity-b", 10)
    rkv.record("claim_ids", [a.claim_id, b.claim_id])
    assert a.claim_id and b.claim_id, "an accepted claim must carry an identifier"
    assert a.claim_id != b.claim_id, f"two claims share the identifier {a.claim_id!r}"
    assert rkv.driver.get_claim(a.claim_id).unwrap().claim_id == a.claim_id

    rid, reply = rkv.reuse_query("identity-a", 10)
    record = reply.unwrap().rkv
    assert record is not None, "the completion carries no claim record"
    assert [r.claim_id for r in record.reuse] == [a.claim_id], (
        f"reuse of claim {a.claim_id}'s prefix is attributed to {[r.claim_id for r in record.reuse]}"
    )
    lifecycle = [e for e in rkv.events_since(0) if e.type.value.startswith("claim.") and e.type != EventType.CLAIM_REFUSED]
    assert {e.claim_id for e in lifecycle} == {a.claim_id, b.claim_id}, (
        f"lifecycle events name {sorted({str(e.claim_id) for e in lifecycle})}, expected exactly the two claims"
    )
    accepted = [e.claim_id for e in lifecycle if e.type == EventType.CLAIM_ACCEPTED]
    assert sorted(accepted) == sorted([a.claim_id, b.claim_id]), f"acceptance events: {accepted}"


@pytest.mark.rkv_obligation("materialization-predicate")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_claim_covers_exactly_its_full_blocks(rkv):
    claim = rkv.claim("predicate", 20, extra_tokens=7).unwrap()
    pool = rkv.driver.pool()
    _, again = rkv.reuse_query("predicate", 20)
    rkv.record("claim", {"blocks": claim.blocks, "tokens": claim.tokens, "resident_blocks": claim.resident_blocks})
    rkv.record("pool_claimed_blocks", pool.claimed_blocks.get(claim.claim_id))
    rkv.record("cached_tokens_on_reuse", rkv.cached_tokens(again))
    assert (claim.blocks, claim.tokens) == (20, 20 * rkv.block_size), (
        "a 20-block prompt plus 7 tokens must claim exactly its 20 full blocks"
    )
    assert claim.state == ClaimState.RESIDENT and claim.resident_blocks == 20
    assert pool.claimed_blocks.get(claim.claim_id) == 20, (
        f"claim reports resident but the pool holds {pool.claimed_blocks.get(claim.claim_id)} of its 20 blocks"
    )
    servable = servable_blocks(20 * rkv.block_size + 1, rkv.block_size)  # the last-block rule: 20
    assert rkv.cached_tokens(again) == min(20, servable) * rkv.block_size, "a resident claim's prefix must hit in full"

    too_short = rkv.driver.claim(ClaimRequest(prompt_token_ids=rkv.tokens("short", 0, extra_tokens=rkv.block_size - 1)))
    assert not too_short.ok and too_short.status in (409, 422), (
        f"a claim shorter than one block has nothing to materialize, yet got {too_short.status}"
    )


@pytest.mark.rkv_obligation("ordered-lifecycle")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_lifecycle_events_are_numbered_and_follow_the_state_machine(rkv):
    claim = rkv.accepted("lifecycle", 10)
    rkv.reuse_query("lifecycle", 10)
    rkv.driver.release(claim.claim_id).unwrap()
    events = rkv.events_since(0)
    mine = [e.type.value for e in events if e.claim_id == claim.claim_id]
    rkv.record("claim_event_types", mine)
    problems = order_problems(events)
    assert not problems, "the event trace is not well ordered:\n" + "\n".join(problems)
    assert mine == ["claim.accepted", "claim.materialized", "claim.reused", "claim.released"]


@pytest.mark.rkv_obligation("release")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_release_ends_protection_at_once(rkv):
    claim = rkv.accepted("released", RESIDENT_BLOCKS)
    mark = rkv.mark()
    released = rkv.driver.release(claim.claim_id).unwrap()
    pool = rkv.driver.pool()
    rid, active = rkv.run("active", ACTIVE_BLOCKS)
    events = rkv.events_since(mark)
    rkv.record("active_admitted_after_release", active.ok)
    assert released.state == ClaimState.RELEASED
    assert claim.claim_id not in pool.claimed_blocks, "a released claim still holds blocks"
    assert [e.claim_id for e in events if e.type == EventType.CLAIM_RELEASED] == [claim.claim_id]
    assert active.ok, f"the released claim still blocks a {ACTIVE_BLOCKS}-block request: {active.error}"
    assert rkv.driver.get_claim(claim.claim_id).unwrap().state == ClaimState.RELEASED


@pytest.mark.rkv_obligation("expiry")
@pytest.mark.rkv_litmus("expiry")
def test_expired_claim_stops_protecting(rkv):
    ttl = 1.0
    claim = rkv.accepted("expiring", RESIDENT_BLOCKS, ttl_s=ttl)
    _, before = rkv.run("active", ACTIVE_BLOCKS, label="before-expiry", held=claim)
    assert not before.ok, "before its TTL the hard claim must still protect its blocks"
    rkv.driver.wait(ttl * 1.5)
    state = rkv.driver.get_claim(claim.claim_id).unwrap().state
    rid, after = rkv.run("active", ACTIVE_BLOCKS, label="after-expiry")
    expired = [e for e in rkv.events_since(0) if e.type == EventType.CLAIM_EXPIRED]
    rkv.record("state_after_ttl", state.value)
    rkv.record("active_admitted_after_ttl", after.ok)
    assert state == ClaimState.EXPIRED, f"{ttl * 1.5}s after a {ttl}s TTL the claim is {state.value}"
    assert [e.claim_id for e in expired] == [claim.claim_id], "no expiry event names the claim"
    assert after.ok, f"an expired claim still blocks the active request: {after.error}"
