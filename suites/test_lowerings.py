"""Lowering probes: does a runtime's nearby feature deliver an obligation?

These run the canonical probe through a feature someone might propose as a lowering
(request priority as a hard claim; KV-aware routing as placement; a streaming session as a
hard claim; a host tier as demotion, or as a hard claim). A pass supports the lowering; a failure is the evidence the lowering
checker turns into *rejected mapping*.
"""

import pytest

from pytest_rkv.contract import CompletionRequest, EventType
from pytest_rkv.errors import NoAnswer, NotApplicable
from pytest_rkv.workload import ACTIVE_BLOCKS, RESIDENT_BLOCKS

FAVOURED, DISFAVOURED = -100, 100  # lower value runs first (vLLM's convention)
PLACEMENT_TRIALS = 3  # routed reuses of a placed prefix checked before pressure


@pytest.mark.rkv_lowering("priority-as-hard-claim", "active-refusal")
@pytest.mark.rkv_litmus("active_refusal")
def test_priority_as_hard_claim(rkv):
    def at(priority, tag, blocks, extra=0):
        return rkv.driver.complete_at_priority(
            CompletionRequest(prompt=rkv.tokens(tag, blocks, extra), max_tokens=1), priority)

    resident = at(FAVOURED, "resident", RESIDENT_BLOCKS)
    assert resident.ok, f"the resident request failed: {resident.error}"
    mark = rkv.block_mark()
    active = at(DISFAVOURED, "active", ACTIVE_BLOCKS)
    evicted = rkv.evicted_since(mark)
    again = at(FAVOURED, "resident", RESIDENT_BLOCKS, extra=1)
    surviving = rkv.cached_tokens(again) // rkv.block_size
    rkv.record("active_admitted", active.ok)
    rkv.record("active_error", active.error.model_dump(mode="json") if active.error else None)
    rkv.record("blocks_evicted_by_active", evicted)
    rkv.record("resident_blocks_surviving", surviving)
    assert surviving == RESIDENT_BLOCKS and not active.ok and active.error.blocking_claims, (
        f"lowering contradicted: the favoured resident kept {surviving} of {RESIDENT_BLOCKS} blocks; "
        f"the disfavoured {ACTIVE_BLOCKS}-block request was "
        + ("admitted" if active.ok else f"refused without attribution ({active.error.type})")
        + f"; {evicted} blocks evicted"
    )


@pytest.mark.rkv_lowering("kv-routing-as-placement", "placement")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_kv_routing_as_placement(rkv):
    """The proposal: a prefix a KV-aware router has placed on a worker is a placed claim.
    Requests reusing it must keep landing on that worker and be served from its cache,
    also after pressure on that worker. Pressure is sent to the prefix's worker with the
    runtime's own placement hint, so the probe does not depend on where the router puts it."""
    driver = rkv.driver
    if not driver.routed:
        raise NotApplicable("a single-engine backend routes nothing")
    prefix = rkv.tokens("placed", RESIDENT_BLOCKS)
    full = RESIDENT_BLOCKS * rkv.block_size
    mark = rkv.block_mark()
    first, where = driver.route(CompletionRequest(prompt=prefix, max_tokens=1))
    first.unwrap()
    home = where.worker
    stored = {w: sum(e.blocks for e in driver.worker_block_events(w, after=mark) if e.type == EventType.BLOCKS_STORED)
              for w in driver.workers()}
    rkv.record("placed_on", home)
    rkv.record("blocks_stored_per_worker", stored)
    assert home in driver.workers(), f"the answer names worker {home!r}, not one of {driver.workers()}"
    assert stored == {w: RESIDENT_BLOCKS if w == home else 0 for w in driver.workers()}, (
        f"the {RESIDENT_BLOCKS}-block prefix was stored {stored}, not only on the worker that served it ({home})")

    before = []
    for trial in range(PLACEMENT_TRIALS):
        again, where = driver.route(CompletionRequest(prompt=prefix + [trial + 1], max_tokens=1))
        before.append({"worker": where.worker, "cached_tokens": rkv.cached_tokens(again), "kv_hit_rate": where.kv_hit_rate})
    rkv.record("routed_reuse_before_pressure", before)
    assert all(b["worker"] == home and b["cached_tokens"] == full for b in before), (
        f"the router did not send every reuse of the placed prefix to {home} from cache: {before}")

    mark = rkv.block_mark()
    active, _ = driver.route(CompletionRequest(prompt=rkv.tokens("active", ACTIVE_BLOCKS), max_tokens=1), worker=home)
    evicted = sum(e.blocks for e in driver.worker_block_events(home, after=mark) if e.type == EventType.BLOCKS_EVICTED)
    after, where = driver.route(CompletionRequest(prompt=prefix + [PLACEMENT_TRIALS + 1], max_tokens=1))
    outcome = {"active_admitted": active.ok, "blocks_evicted_on_home": evicted, "worker": where.worker,
               "cached_tokens": rkv.cached_tokens(after)}
    rkv.record("routed_reuse_after_pressure", outcome)
    assert where.worker == home and outcome["cached_tokens"] == full, (
        f"lowering contradicted: after a {ACTIVE_BLOCKS}-block request on {home}, the placed prefix was served "
        f"from {where.worker} with {outcome['cached_tokens']} of {full} tokens cached ({evicted} blocks evicted "
        "on its worker); the router placed requests, nothing held the prefix in place")


@pytest.mark.rkv_lowering("streaming-session-as-hard-claim", "active-refusal")
@pytest.mark.rkv_litmus("active_refusal")
def test_streaming_session_as_hard_claim(rkv):
    """The resident is a turn in a session that holds its KV (SGLang's streaming sessions);
    the 70-block request must then be refused in the session's name, within the bounded
    wait. Also recorded: whether block events show the session's blocks at all."""
    mark = rkv.block_mark()
    resident = rkv.driver.complete_in_held_session(
        CompletionRequest(prompt=rkv.tokens("resident", RESIDENT_BLOCKS), max_tokens=1))
    assert resident.ok, f"the session's resident turn failed: {resident.error}"
    stored = sum(len(e.block_hashes) for e in rkv.driver.block_events(after=mark)
                 if e.type == EventType.BLOCKS_STORED)
    mark = rkv.block_mark()
    waited = None
    try:
        active = rkv.driver.complete(CompletionRequest(
            prompt=rkv.tokens("active", ACTIVE_BLOCKS), max_tokens=1, request_id=rkv.request_id("active")))
    except NoAnswer as exc:
        active, waited = None, exc.waited_s
    evicted = rkv.evicted_since(mark)
    rkv.driver.close_held_sessions()
    rkv.record("session_blocks_stored_in_events", stored)
    rkv.record("active_waited_s", waited)
    rkv.record("bounded_wait_s", rkv.driver.settings.refusal_timeout)
    rkv.record("active_admitted", active is not None and active.ok)
    rkv.record("active_error", active.error.model_dump(mode="json") if active is not None and active.error else None)
    rkv.record("blocks_evicted_by_active", evicted)
    if active is None:
        outcome = f"left waiting {waited:g} s with no answer: no refusal, no attribution"
    elif active.ok:
        outcome = "admitted"
    else:
        outcome = f"refused ({active.error.type})" + ("" if active.error.blocking_claims else " without attribution")
    assert active is not None and not active.ok and active.error.blocking_claims, (
        f"lowering contradicted: the {ACTIVE_BLOCKS}-block request was {outcome}; {evicted} blocks "
        f"evicted; block events showed {stored} of the session's {RESIDENT_BLOCKS} blocks stored"
    )


def _tiered_pressure(rkv):
    """The canonical probe with no claim on a runtime that has a host tier: the resident
    prompt, then the 70-block request, then the resident again (plus one token)."""
    mark = rkv.block_mark()
    _, resident = rkv.run("resident", RESIDENT_BLOCKS)
    assert resident.ok, f"the resident request failed: {resident.error}"
    evict_mark = rkv.block_mark()
    _, active = rkv.run("active", ACTIVE_BLOCKS)
    evicted = rkv.evicted_since(evict_mark)
    _, again = rkv.reuse_query("resident", RESIDENT_BLOCKS)
    # Checked last: a tier may report a store only after later engine steps. Without a
    # tier the probe does not apply (it must not count against a runtime's own demotion).
    if not any(e.type == EventType.BLOCKS_STORED and e.tier == "host" for e in rkv.driver.block_events(after=mark)):
        raise NotApplicable("no block events on a host tier: there is no tier to probe")
    surviving = rkv.cached_tokens(again) // rkv.block_size
    rkv.record("active_admitted", active.ok)
    rkv.record("active_error", active.error.model_dump(mode="json") if active.error else None)
    rkv.record("blocks_evicted_by_active", evicted)
    rkv.record("resident_blocks_served_again", surviving)
    return active, evicted, surviving


@pytest.mark.rkv_lowering("host-tier-as-demotion", "demotion-restore")
@pytest.mark.rkv_litmus("demotion")
def test_host_tier_as_demotion(rkv):
    """The proposal: a tier that takes displaced blocks is demotion with restore-before-reuse.
    Then every displaced block of the resident comes back before the re-query is served."""
    active, evicted, surviving = _tiered_pressure(rkv)
    assert active.ok, f"the intruder was refused ({active.error}); nothing was displaced to the tier"
    assert surviving == RESIDENT_BLOCKS, (
        f"lowering contradicted: {evicted} blocks were displaced and the re-query was served "
        f"{surviving} of the resident's {RESIDENT_BLOCKS} blocks; a restore before reuse gives all of them"
    )


@pytest.mark.rkv_lowering("host-tier-as-hard-claim", "active-refusal")
@pytest.mark.rkv_litmus("active_refusal")
def test_host_tier_as_hard_claim(rkv):
    """The proposal: a prefix kept in the tier is held like a hard claim. Then the 70-block
    request, which cannot fit beside it, is refused in its name, and the resident is whole."""
    active, evicted, surviving = _tiered_pressure(rkv)
    assert not active.ok and active.error.blocking_claims and surviving == RESIDENT_BLOCKS, (
        f"lowering contradicted: the {ACTIVE_BLOCKS}-block request was "
        + ("admitted" if active.ok else f"refused without attribution ({active.error.type})")
        + f", {evicted} blocks evicted, the resident served {surviving} of {RESIDENT_BLOCKS} blocks again"
    )
