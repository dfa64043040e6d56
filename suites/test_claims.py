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

    rid, reply = rkv.reuse_query("identity-a", 10, claim_id=a.claim_id)  # naming the claim it reuses
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

    unknown = f"{a.claim_id}-never-issued"
    _, naming = rkv.run("identity-b", 10, extra_tokens=1, claim_id=unknown, label="naming-unknown")
    for what, reply in (("GET", rkv.driver.get_claim(unknown)), ("DELETE", rkv.driver.release(unknown)),
                        ("a completion naming", naming)):
        assert (reply.status, reply.error and reply.error.type) == (404, "not_found"), (
            f"{what} of the never-issued claim id {unknown!r} answered {reply.status} {reply.error or reply.value}"
        )


@pytest.mark.rkv_obligation("materialization-predicate")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_claim_covers_exactly_its_full_blocks(rkv):
    block_mark = rkv.block_mark()
    request = ClaimRequest(prompt_token_ids=rkv.tokens("predicate", 20, extra_tokens=7), ttl_s=600.0,
                           client_id="suite-client")
    claim = rkv.driver.claim(request).unwrap()
    # device stores only: a host tier's copies (vLLM + LMCache) are not the claim's blocks
    stored = [h for e in rkv.driver.block_events(after=block_mark) if e.type == EventType.BLOCKS_STORED
              and e.tier != "host" for h in e.block_hashes]
    pool = rkv.pool_adds_up("claim resident")
    _, again = rkv.reuse_query("predicate", 20)
    rkv.record("claim", {"blocks": claim.blocks, "tokens": claim.tokens, "resident_blocks": claim.resident_blocks})
    rkv.record("pool_claimed_blocks", pool.claimed_blocks.get(claim.claim_id))
    rkv.record("cached_tokens_on_reuse", rkv.cached_tokens(again))
    assert (claim.blocks, claim.tokens) == (20, 20 * rkv.block_size), (
        "a 20-block prompt plus 7 tokens must claim exactly its 20 full blocks"
    )
    assert claim.state == ClaimState.RESIDENT and claim.resident_blocks == 20
    echoed = (claim.strength, claim.demotable, claim.tier, claim.ttl_s, claim.client_id)
    assert echoed == ("hard", False, "device", 600.0, "suite-client"), (
        f"the claim does not echo its request: strength/demotable/tier/ttl_s/client_id = {echoed}"
    )
    assert claim.expires_at is not None, "a claim with a TTL must say when it expires"
    if stored:  # the runtime publishes its block hashes: the claim's must be one of them
        assert len(stored) == 20 and claim.prefix_hash == stored[-1], (
            f"prefix_hash {claim.prefix_hash!r} is not the hash the runtime published for the claim's "
            f"last block ({stored[-1]!r}, of {len(stored)} stored)"
        )
    assert pool.claimed_blocks.get(claim.claim_id) == 20, (
        f"claim reports resident but the pool holds {pool.claimed_blocks.get(claim.claim_id)} of its 20 blocks"
    )
    servable = servable_blocks(20 * rkv.block_size + 1, rkv.block_size)  # the last-block rule: 20
    assert rkv.cached_tokens(again) == min(20, servable) * rkv.block_size, "a resident claim's prefix must hit in full"

    again_view = rkv.driver.get_claim(claim.claim_id).unwrap()
    assert again_view == claim.model_copy(update={"state": again_view.state}), (
        f"GET returns a different claim than POST did:\n  {again_view}\n  {claim}"
    )
    too_short = rkv.driver.claim(ClaimRequest(prompt_token_ids=rkv.tokens("short", 0, extra_tokens=rkv.block_size - 1)))
    assert (too_short.status, too_short.error and too_short.error.type) == (422, "invalid_request"), (
        f"a claim shorter than one block is malformed (422 invalid_request), yet got {too_short.status} "
        f"{too_short.error or too_short.value}"
    )
    named = [f.get("loc") for f in too_short.error.fields if isinstance(f, dict)]
    assert any(isinstance(loc, list) and "prompt_token_ids" in loc for loc in named), (
        f"a 422 must say which field is wrong (fields[].loc naming prompt_token_ids); fields = {too_short.error.fields}"
    )


@pytest.mark.rkv_obligation("materialization-predicate")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_claim_on_a_cached_prefix_needs_no_more_room_than_the_pool_has(rkv):
    """60 blocks computed by a plain request, then a claim on exactly them: the pool holds
    them already (and 20 free blocks beside), so the claim is admitted whole."""
    rkv.run("cached-first", RESIDENT_BLOCKS)
    reply = rkv.claim("cached-first", RESIDENT_BLOCKS)
    rkv.record("claim_on_cached_prefix", {"admitted": reply.ok, "state": reply.value and reply.value.state.value})
    assert reply.ok, f"a claim on a prefix the pool already holds was refused: {reply.status} {reply.error}"
    claim = reply.value
    assert (claim.state, claim.resident_blocks) == (ClaimState.RESIDENT, RESIDENT_BLOCKS), (
        f"the claim on the cached prefix reports {claim.state.value} with {claim.resident_blocks} blocks"
    )
    rkv.pool_adds_up("a claim over a cached prefix")


@pytest.mark.rkv_obligation("ordered-lifecycle")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_lifecycle_events_are_numbered_and_follow_the_state_machine(rkv):
    claim = rkv.accepted("lifecycle", 10)
    rid, _ = rkv.reuse_query("lifecycle", 10)
    rkv.driver.release(claim.claim_id).unwrap()
    twice = rkv.driver.release(claim.claim_id)
    events = rkv.events_since(0)
    mine = [(e.type.value, e.from_state, e.to_state) for e in events if e.claim_id == claim.claim_id]
    rkv.record("claim_event_types", [m[0] for m in mine])
    problems = order_problems(events)
    assert not problems, "the event trace is not well ordered:\n" + "\n".join(problems)
    R, A, X = ClaimState.RESIDENT, ClaimState.ACCEPTED, ClaimState.RELEASED
    assert mine == [("claim.accepted", None, A), ("claim.materialized", A, R), ("claim.reused", R, R),
                    ("claim.released", R, X)], f"the claim's events (type, from, to): {mine}"
    reused = [(e.request_id, e.blocks) for e in events if e.type == EventType.CLAIM_REUSED]
    materialized = [e.blocks for e in events if e.type == EventType.CLAIM_MATERIALIZED]
    assert reused == [(rid, 10)] and materialized == [10], (
        f"reuse events (request, blocks) {reused} and materialization blocks {materialized}: expected "
        f"[({rid!r}, 10)] and [10]"
    )
    assert twice.status == 404 or (twice.ok and twice.value.state == ClaimState.RELEASED), (
        f"releasing a released claim answered {twice.status} {twice.error or twice.value.state.value}"
    )


@pytest.mark.rkv_obligation("ordered-lifecycle")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_event_pages_hold_exactly_the_events_after_the_cursor(rkv):
    cursor, paged = 0, []
    steps = [
        lambda: rkv.accepted("paging-a", 10),
        lambda: rkv.run("paging-plain", 5),
        lambda: rkv.reuse_query("paging-a", 10),
        lambda: rkv.accepted("paging-b", 10, strength="soft"),
        lambda: rkv.run("paging-refused", ACTIVE_BLOCKS),
    ]
    for step in steps:
        step()
        page = rkv.driver.events(after=cursor)
        paged += page
        cursor = page[-1].seq if page else cursor
    trace = rkv.driver.events()
    seqs = [e.seq for e in trace]
    rkv.record("seqs", seqs)
    assert [e.seq for e in paged] == seqs, (
        f"reading page by page (after = last seq seen) gave seqs {[e.seq for e in paged]}, the whole "
        f"trace has {seqs}: an event was served twice or skipped"
    )
    for after in sorted({0, seqs[0], seqs[len(seqs) // 2], seqs[-1], seqs[-1] + 1000}):
        got = [e.seq for e in rkv.driver.events(after=after)]
        assert got == [s for s in seqs if s > after], f"?after={after} served {got}"


@pytest.mark.rkv_obligation("ordered-lifecycle")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_event_pages_keep_to_their_limit(rkv):
    """Paging with a small `limit`: full pages say `more`, the last one does not, each
    page's `last_seq` is the cursor for the next, and together they are the whole trace."""
    rkv.accepted("limit-a", 10)
    rkv.reuse_query("limit-a", 10)
    rkv.run("limit-plain", 5)
    trace = [e.seq for e in rkv.driver.events()]
    limit = 3
    pages, after = [], 0
    while len(pages) <= len(trace):
        page = rkv.driver.event_page(after, limit)
        pages.append((after, page))
        if not page.more or page.last_seq <= after:
            break
        after = page.last_seq
    served = [e.seq for _, p in pages for e in p.events]
    shape = [(a, [e.seq for e in p.events], p.last_seq, p.more) for a, p in pages]
    rkv.record("pages", shape)
    assert len(trace) > limit, f"the steps left {len(trace)} events, too few to page"
    assert served == trace, f"pages of {limit} (after, seqs, last_seq, more) {shape} do not add up to the trace {trace}"
    for a, p in pages:
        full = p is not pages[-1][1]
        seqs = [e.seq for e in p.events]
        assert len(seqs) == limit if full else len(seqs) <= limit, f"?after={a}&limit={limit} served {seqs}"
        assert p.more == full, f"?after={a}&limit={limit} served {seqs} with more={p.more}"
        assert p.last_seq == (seqs[-1] if seqs else a), f"?after={a}&limit={limit} served {seqs}, last_seq {p.last_seq}"
        assert 1 <= p.oldest_seq <= trace[0], (
            f"?after={a} says the oldest event held is {p.oldest_seq}, but it served seq {trace[0]}"
        )
    tail = rkv.driver.event_page(trace[-1], limit)
    assert (tail.events, tail.more, tail.last_seq) == ([], False, trace[-1]), (
        f"past the last event (?after={trace[-1]}) the page is {[e.seq for e in tail.events]}, "
        f"more={tail.more}, last_seq={tail.last_seq}"
    )


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
    rkv.stays_ended(claim, "released", RESIDENT_BLOCKS, "released")


@pytest.mark.rkv_obligation("release")
@pytest.mark.rkv_litmus("accepted_hard_claims")
def test_released_soft_claim_is_never_harmed(rkv):
    """A released soft claim stays released: the pressure that takes its former blocks
    harms nothing, and gives it no event."""
    soft = rkv.accepted("released-soft", RESIDENT_BLOCKS, strength="soft")
    rkv.driver.release(soft.claim_id).unwrap()
    mark = rkv.mark()
    rid, active = rkv.run("active", ACTIVE_BLOCKS)
    later = [e.type.value for e in rkv.events_since(mark) if e.claim_id == soft.claim_id]
    assert active.ok, f"a released soft claim blocked a {ACTIVE_BLOCKS}-block request: {active.error}"
    assert later == [], f"the released soft claim got events when {rid} took its blocks: {later}"
    assert rkv.driver.get_claim(soft.claim_id).unwrap().state == ClaimState.RELEASED


@pytest.mark.rkv_obligation("expiry")
@pytest.mark.rkv_litmus("expiry")
def test_expired_claim_stops_protecting(rkv):
    """Both sides of the deadline, each probed by a request (never a read first, which
    could be what triggers expiry): protected at 60 % of the TTL, gone at 150 %."""
    ttl = 4.0
    claim = rkv.accepted("expiring", RESIDENT_BLOCKS, ttl_s=ttl)
    rkv.driver.wait(ttl * 0.6)
    _, before = rkv.run("active", ACTIVE_BLOCKS, label="before-expiry", held=claim)
    rkv.driver.wait(ttl * 0.9)
    rid, after = rkv.run("active", ACTIVE_BLOCKS, label="after-expiry")
    events = rkv.events_since(0)
    state = rkv.driver.get_claim(claim.claim_id).unwrap().state
    expired = [e for e in events if e.type == EventType.CLAIM_EXPIRED]
    accepted = [e for e in events if e.type == EventType.CLAIM_ACCEPTED]
    completed = [e.seq for e in events if e.type == EventType.REQUEST_COMPLETED and e.request_id == rid]
    rkv.record("state_after_ttl", state.value)
    rkv.record("active_admitted_after_ttl", after.ok)
    assert not before.ok and before.error.blocking_claims == [claim.claim_id], (
        f"at 60 % of its {ttl} s TTL the hard claim must still protect its blocks: "
        + ("the active request was admitted" if before.ok else f"refused naming {before.error.blocking_claims}")
    )
    assert after.ok, f"150 % into its TTL, the expired claim still blocks the active request: {after.error}"
    assert [e.claim_id for e in expired] == [claim.claim_id], "no single expiry event names the claim"
    assert expired[0].ts >= accepted[0].ts + ttl, (
        f"the claim expired {expired[0].ts - accepted[0].ts:.2f} s after it was accepted, before its {ttl} s TTL"
    )
    assert completed and expired[0].seq < completed[0], (
        "the expiry is not ordered before the request its end let in"
    )
    assert state == ClaimState.EXPIRED, f"{ttl * 1.5}s after a {ttl}s TTL the claim is {state.value}"
    rkv.stays_ended(claim, "expiring", RESIDENT_BLOCKS, "expired")


@pytest.mark.rkv_obligation("expiry")
@pytest.mark.rkv_litmus("expiry")
def test_release_after_expiry_changes_nothing(rkv):
    ttl = 1.0
    claim = rkv.accepted("expired-then-released", 10, ttl_s=ttl)
    rkv.driver.wait(ttl * 1.5)
    mark = rkv.mark()
    reply = rkv.driver.release(claim.claim_id)
    later = [e.type.value for e in rkv.events_since(mark) if e.claim_id == claim.claim_id]
    state = rkv.driver.get_claim(claim.claim_id).unwrap().state
    assert state == ClaimState.EXPIRED, f"an expired claim, released afterwards, reports {state.value}"
    assert later in ([], ["claim.expired"]), f"releasing an expired claim produced events {later}"
    assert reply.status == 404 or (reply.ok and reply.value.state == ClaimState.EXPIRED), (
        f"releasing an expired claim answered {reply.status} {reply.error or reply.value.state.value}"
    )
