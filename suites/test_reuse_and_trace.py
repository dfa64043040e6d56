"""Reuse attribution, trace-level outcome reconstruction, and placement."""

import pytest

from pytest_rkv.contract import EventType, servable_blocks
from pytest_rkv.errors import NotApplicable
from pytest_rkv.trace import reconstruct


@pytest.mark.rkv_obligation("reuse-attribution")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_reuse_names_the_claim_and_its_tokens(rkv):
    claim = rkv.accepted("attributed", 30)
    mark = rkv.mark()
    rid, again = rkv.reuse_query("attributed", 30)
    full_rid, full = rkv.run("attributed", 30, label="attributed-full")  # ends on the claim's last block
    _, unrelated = rkv.run("unrelated", 10, extra_tokens=1)
    events = rkv.events_since(mark)
    done = again.unwrap()
    reuse = [(r.claim_id, r.tokens) for r in (done.rkv.reuse if done.rkv else [])]
    rkv.record("reuse", reuse)
    rkv.record("cached_tokens", done.usage.prompt_tokens_details.cached_tokens)
    assert reuse == [(claim.claim_id, 30 * rkv.block_size)], f"reuse records: {reuse}"
    assert [r.recomputed_tokens for r in done.rkv.reuse] == [0]

    # The last-block rule (contract.servable_blocks): a prompt of exactly the claimed 30
    # blocks is served 29 of them; the record says the 30th was recomputed, not lost.
    served = servable_blocks(30 * rkv.block_size, rkv.block_size)
    whole = full.unwrap()
    full_reuse = [(r.claim_id, r.tokens, r.recomputed_tokens) for r in (whole.rkv.reuse if whole.rkv else [])]
    rkv.record("full_prompt_reuse", full_reuse)
    assert full_reuse == [(claim.claim_id, served * rkv.block_size, (30 - served) * rkv.block_size)], (
        f"a full-prompt hit on a 30-block claim must read {served} blocks reused and 1 recomputed: {full_reuse}"
    )
    assert whole.usage.prompt_tokens_details.cached_tokens == served * rkv.block_size
    assert [(e.claim_id, e.request_id, e.blocks) for e in events if e.type == EventType.CLAIM_REUSED] == [
        (claim.claim_id, rid, 30), (claim.claim_id, full_rid, served)]
    assert done.usage.prompt_tokens_details.cached_tokens == 30 * rkv.block_size
    usage = (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens)
    assert usage == (30 * rkv.block_size + 1, 1, 30 * rkv.block_size + 2), (
        f"usage (prompt, completion, total) {usage} for a {30 * rkv.block_size + 1}-token prompt and one token out"
    )
    assert done.rkv.request_id == rid, f"the completion's record names request {done.rkv.request_id!r}, not {rid!r}"
    other = unrelated.unwrap().rkv
    assert other is not None and other.reuse == [], "a request that shares nothing was attributed reuse"

    # a prompt sharing only the claim's first 20 blocks, then one that extends all 30
    mark = rkv.mark()
    part_rid, part = rkv.run("attributed", 20, extra_tokens=1, label="partial")
    long_rid, longer = rkv.run("attributed", 40, extra_tokens=1, label="longer")
    partial = [(r.claim_id, r.tokens) for r in (part.unwrap().rkv.reuse if part.unwrap().rkv else [])]
    extended = [(r.claim_id, r.tokens) for r in (longer.unwrap().rkv.reuse if longer.unwrap().rkv else [])]
    reused = [(e.request_id, e.blocks) for e in rkv.events_since(mark) if e.type == EventType.CLAIM_REUSED]
    rkv.record("partial_reuse", partial)
    assert partial == [(claim.claim_id, 20 * rkv.block_size)], (
        f"a request sharing 20 of the claim's 30 blocks must be credited 20 blocks' tokens: {partial}"
    )
    assert extended == [(claim.claim_id, 30 * rkv.block_size)], f"a longer prompt reuses all 30 blocks: {extended}"
    assert reused == [(part_rid, 20), (long_rid, 30)], f"reuse events (request, blocks): {reused}"


@pytest.mark.rkv_obligation("trace-reconstruction")
@pytest.mark.rkv_litmus("trace_reconstruction")
def test_the_event_log_alone_tells_what_happened(rkv):
    """One run with five outcomes; reconstruct them from the events and compare with
    what the API answered at the time."""
    soft = rkv.accepted("trace-soft", 10, strength="soft")
    hard = rkv.accepted("trace-hard", 40)
    budget = rkv.driver.pool().claim_budget_blocks
    refused_claim = rkv.claim("trace-refused", budget - 50 + 1)  # over budget
    r1, first = rkv.run("trace-plain", 30)  # fits in the 30 free blocks
    r2, second = rkv.run("trace-pressure", 35)  # evicts the 30 cached, then the soft claim
    r3, third = rkv.run("trace-active", 70)  # blocked by the hard claim
    r4, reuse = rkv.reuse_query("trace-hard", 40)
    rkv.driver.release(hard.claim_id).unwrap()
    answers = {"over-budget claim refused": not refused_claim.ok, "30-block request admitted": first.ok,
               "35-block request admitted": second.ok, "70-block request refused": not third.ok,
               "hard claim's prefix reused": reuse.ok}
    unfolded = [step for step, happened in answers.items() if not happened]
    assert not unfolded, (
        f"the scenario did not unfold as the contract requires, so there is no trace to judge; these did "
        f"not happen: {unfolded} (the other obligation tests say why)"
    )

    seen = reconstruct(rkv.events_since(0))
    rkv.record("outcomes", sorted(seen.outcomes()))
    assert not seen.problems, "events whose type and states disagree:\n" + "\n".join(seen.problems)
    expected = {
        "write_no_admit", "ordinary_eviction", "soft_priority", "active_refusal",
        "accepted_hard_claims", "release",
    }
    assert expected <= seen.outcomes(), f"missing from the trace: {sorted(expected - seen.outcomes())}"
    assert seen.refused_claim_requests == {refused_claim.error.request_id}, (
        f"claim refusals in the trace name requests {seen.refused_claim_requests}, the answer "
        f"{refused_claim.error.request_id!r}"
    )
    assert seen.claims[soft.claim_id].states == ["accepted", "resident", "harmed"], (
        f"the soft claim's states in the trace: {seen.claims[soft.claim_id].states}"
    )
    assert seen.claims[hard.claim_id].states == ["accepted", "resident", "resident", "released"], (
        f"the hard claim's states in the trace: {seen.claims[hard.claim_id].states}"
    )
    facts = {
        f"soft claim harmed by {r2}": seen.claims[soft.claim_id].harmed_by == {r2},
        "hard claim accepted and released": {"accepted_hard_claims", "release"} <= seen.claims[hard.claim_id].outcomes,
        f"hard claim reused by {r4} only": seen.claims[hard.claim_id].reused_by == {r4},
        f"{r3} refused, blocked by the hard claim alone": (
            seen.requests.get(r3) is not None and seen.requests[r3].outcomes == {"active_refusal"}
            and seen.requests[r3].blocking_claims == {hard.claim_id}),
        f"{r2} evicted unclaimed cache": r2 in seen.requests and "ordinary_eviction" in seen.requests[r2].outcomes,
        f"{r1} just completed": r1 in seen.requests and seen.requests[r1].outcomes == {"completed"},
    }
    wrong = [fact for fact, holds in facts.items() if not holds]
    assert not wrong, (
        "the trace does not show: " + "; ".join(wrong) + "\n  the trace shows: "
        + "; ".join(f"{k}: {sorted(v.outcomes)}" for k, v in {**seen.claims, **seen.requests}.items())
    )


PLACEMENT_ROUNDS = 3  # routed reuses of each of the two placed claims


def _routed(rkv):
    if not rkv.driver.routed:
        raise NotApplicable("a single-engine backend has no placement to attribute")
    return rkv.driver


@pytest.mark.rkv_obligation("placement")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_routed_reuse_names_the_worker_holding_the_claim(rkv):
    """Placement is the runtime's decision, recorded at claim time (the claim and its events
    name the worker); it stays put while the claim lives, and every routed reuse is served
    by, and attributed to, the claim's worker. A claim that moved or was lost must say so
    (its state), never be re-materialized elsewhere and credited.

    Two hard claims of 60 and 30 blocks cannot share one 80-block pool, so one is on each
    worker. Each reuse asks for the first 10 blocks of one claim plus a fresh token: small
    enough to run on either worker, so only a router that knows where the prefix is sends
    it to the claim's worker (a fixed worker order would serve one of them cold)."""
    driver = _routed(rkv)
    mark = rkv.mark()
    claims = [rkv.place("placed-a", 60), rkv.place("placed-b", 30)]
    rkv.record("workers", {c.claim_id: c.worker for c in claims})
    rkv.record("placement_reasons", {c.claim_id: driver.placement_reason(c.claim_id) for c in claims})
    for claim in claims:
        assert claim.worker in driver.workers(), (
            f"{claim.claim_id} names worker {claim.worker!r}; the deployment's workers are {driver.workers()}")
        assert (claim.state.value, claim.resident_blocks) == ("resident", claim.blocks), (
            f"the placed claim {claim.claim_id} reads {claim.state.value} with {claim.resident_blocks} of "
            f"{claim.blocks} blocks")
    assert claims[0].worker != claims[1].worker, (
        f"60- and 30-block hard claims both placed on {claims[0].worker}: one 80-block pool cannot hold both")
    trials, reused_by = [], {c.claim_id: [] for c in claims}
    for trial in range(PLACEMENT_ROUNDS * len(claims)):
        claim, tag = claims[trial % 2], ("placed-a", "placed-b")[trial % 2]
        rid, reply, where = rkv.route(rkv.tokens(tag, 10) + [trial + 1], label=f"placed-again-{trial}")
        reused_by[claim.claim_id].append(rid)
        done = reply.unwrap()
        reuse = [(r.claim_id, r.worker, r.tokens) for r in (done.rkv.reuse if done.rkv else [])]
        now = driver.get_claim(claim.claim_id).unwrap()
        trials.append({"claim": claim.claim_id, "served_by": where.worker, "why": where.reason, "reuse": reuse,
                       "claim_worker": now.worker, "state": now.state.value,
                       "cached_tokens": rkv.cached_tokens(reply)})
        rkv.record("trials", trials)
        assert (now.worker, now.state.value, now.resident_blocks) == (claim.worker, "resident", claim.blocks), (
            f"trial {trial}: {claim.claim_id}, placed on {claim.worker}, now reads {now.state.value} on "
            f"{now.worker} with {now.resident_blocks} of {claim.blocks} blocks resident")
        assert where.worker == claim.worker, (
            f"trial {trial}: a reuse of {claim.claim_id}'s prefix was routed to {where.worker}, the claim is on "
            f"{claim.worker}")
        assert reuse == [(claim.claim_id, claim.worker, 10 * rkv.block_size)], (
            f"trial {trial}: reuse records {reuse}, {claim.claim_id} held on {claim.worker}")
        assert trials[-1]["cached_tokens"] == 10 * rkv.block_size, f"trial {trial}: {trials[-1]}"
    events = rkv.events_since(mark)
    for claim in claims:
        mine = [e for e in events if e.claim_id == claim.claim_id]
        assert {e.worker for e in mine} == {claim.worker}, (
            f"{claim.claim_id}'s events name workers {sorted(str(e.worker) for e in mine)}, it is on {claim.worker}")
        named = [e.request_id for e in mine if e.type == EventType.CLAIM_REUSED]
        assert named == reused_by[claim.claim_id], (
            f"claim.reused events of {claim.claim_id} name {named}, its routed reuses were {reused_by[claim.claim_id]}")


@pytest.mark.rkv_obligation("placement")
@pytest.mark.rkv_litmus("active_refusal")
def test_routed_request_goes_where_it_fits_and_is_refused_only_where_none_fits(rkv):
    """Cross-worker arbitration. Two 60-block hard claims cannot share one 80-block pool,
    so they are placed on different workers. A request reusing 10 blocks of the first and
    needing 60 more fits beside neither: it is refused, naming both claims, and neither
    loses a block. Once the second is released, the same request runs on that worker
    (beside the first claim it cannot), and the first claim is still whole."""
    driver = _routed(rkv)
    if len(driver.workers()) != 2 or rkv.info.total_blocks < 70:
        raise NotApplicable("written for two workers with the canonical 80-block pool")
    first, second = rkv.place("arb-a", 60), rkv.place("arb-b", 60)
    rkv.record("placed", {first.claim_id: first.worker, second.claim_id: second.worker})
    assert {first.worker, second.worker} == set(driver.workers()), (
        f"two 60-block hard claims placed on {first.worker} and {second.worker}: one 80-block pool cannot hold both")
    prompt = rkv.tokens("arb-a", 10) + rkv.tokens("arb-fresh", 60)
    mark = rkv.mark()
    rid, refused, where = rkv.route(prompt, label="arb-fits-nowhere")
    rkv.record("routing_refused", where.reason)
    rkv.record("refusal", refused.error.model_dump(mode="json") if refused.error else {"admitted_on": where.worker})
    assert refused.error is not None and refused.error.type == "active_refusal", (
        f"a 70-block request beside a 60-block hard claim on each 80-block worker was answered "
        f"{refused.status} on {where.worker}: {refused.error}")
    assert sorted(refused.error.blocking_claims) == sorted([first.claim_id, second.claim_id]), (
        f"the refusal names {refused.error.blocking_claims}; blocking are {first.claim_id} and {second.claim_id}")
    named = {c for e in rkv.events_since(mark) if e.type == EventType.REQUEST_REFUSED and e.request_id == rid
             for c in e.blocking_claims}
    assert named == {first.claim_id, second.claim_id}, f"request.refused events of {rid} name {sorted(named)}"
    for claim in (first, second):
        now = driver.get_claim(claim.claim_id).unwrap()
        assert (now.state.value, now.resident_blocks, now.worker) == ("resident", 60, claim.worker), (
            f"after the refusal {claim.claim_id} reads {now.state.value}, {now.resident_blocks} of 60 on {now.worker}")
    driver.release(second.claim_id).unwrap()
    _, admitted, where = rkv.route(prompt, label="arb-fits-there")
    rkv.record("admitted_on", where.worker)
    rkv.record("routing_admitted", where.reason)
    assert admitted.ok and where.worker == second.worker, (
        f"with {second.worker} free, the request was answered {admitted.status} on {where.worker}: {admitted.error}")
    now = driver.get_claim(first.claim_id).unwrap()
    assert (now.state.value, now.resident_blocks, now.worker) == ("resident", 60, first.worker), (
        f"after the request ran elsewhere, {first.claim_id} reads {now.state.value}, {now.resident_blocks} of 60")
