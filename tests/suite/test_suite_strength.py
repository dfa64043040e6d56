"""The suite's own strength, beyond one fault mode per obligation (tests/reference/test_fault_modes.py
runs every fault mode, including the ones added for each check here)."""

from pytest_rkv.trace import reconstruct
from pytest_rkv.contract import ClaimState, Event, EventType

DEAF_FAULT_ROUTE_PLUGIN = '''
from pytest_rkv.drivers.reference import ReferenceDriver

def _accept_and_ignore(self, req):
    """A runtime whose fault route answers 200 but never fires the fault."""

ReferenceDriver.inject_fault = _accept_and_ignore
'''


def test_a_fault_that_does_not_fire_is_untestable_not_failed(run_suites, pytester, monkeypatch):
    pytester.makepyfile(deafroute=DEAF_FAULT_ROUTE_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    run = run_suites("-p", "deafroute", "-k", "materialization or restore", subprocess=True)
    tests = run.row("reference")["obligations"]["materialization-failure"]["tests"]
    outcomes = {t["nodeid"].split("::")[1].split("[")[0]: (t["outcome"], t["detail"]) for t in tests}
    for name in ("test_failed_materialization_is_scoped_to_the_claim", "test_failed_restore_is_not_reported_as_reuse"):
        outcome, detail = outcomes[name]
        assert outcome == "untestable" and "did not fire" in detail, (name, outcome, detail)


def _event(seq, type_, claim, frm, to, **kw):
    return Event(seq=seq, ts=0.0, type=type_, claim_id=claim, from_state=frm, to_state=to, **kw)


def test_reconstruction_names_events_whose_states_contradict_their_type():
    A, R, H = ClaimState.ACCEPTED, ClaimState.RESIDENT, ClaimState.HARMED
    events = [
        _event(1, EventType.CLAIM_ACCEPTED, "c", None, A),
        _event(2, EventType.CLAIM_MATERIALIZED, "c", A, R),
        _event(3, EventType.CLAIM_RELEASED, "c", R, H),  # a "release" that says harmed
    ]
    seen = reconstruct(events)
    assert seen.claims["c"].states == ["accepted", "resident", "released"]
    assert seen.problems == [
        "seq 3: claim.released of c says resident -> harmed, the claim was resident and the event means -> released"
    ]
    assert not reconstruct(events[:2]).problems


def test_event_contents_are_held_to_the_trace_and_to_what_the_test_did():
    from pytest_rkv.contract import ErrorBody
    from pytest_rkv.trace import Ledger, content_problems

    A, R = ClaimState.ACCEPTED, ClaimState.RESIDENT
    good = [
        _event(1, EventType.CLAIM_ACCEPTED, "c", None, A, request_id="cr", blocks=3),
        Event(seq=2, ts=0.0, type=EventType.BLOCKS_STORED, request_id="cr", blocks=2, block_hashes=["h1", "h2"]),
        _event(3, EventType.CLAIM_MATERIALIZED, "c", A, R, request_id="cr", tier="device", blocks=3),
        _event(4, EventType.CLAIM_REUSED, "c", R, R, request_id="r1", blocks=2),
        Event(seq=5, ts=0.0, type=EventType.REQUEST_REFUSED, request_id="r2", blocks=70, blocking_claims=["c"]),
        Event(seq=6, ts=0.0, type=EventType.CLAIM_REFUSED, request_id="cr2", blocks=90),
    ]
    refusal = ErrorBody(type="active_refusal", message="", request_id="r2", blocking_claims=["c"], needed_blocks=70)
    ledger = Ledger(claims={"c": 3}, refusals={"r2": refusal})
    assert content_problems(good, ledger) == []

    def problems(seq: int, **change) -> list[str]:
        events = [e.model_copy(update=change) if e.seq == seq else e for e in good]
        return content_problems(events, ledger)

    assert problems(2, blocks=3) == ["seq 2: blocks.stored says 3 blocks but lists 2 block hashes"]
    assert problems(3, tier="host") == ["seq 3: claim.materialized of c reports tier 'host'; expected 'device'"]
    assert problems(4, request_id=None) == ["seq 4: claim.reused of c names no request"]
    assert problems(3, request_id="other") == [
        "seq 3: claim.materialized of c names request 'other', the claim's own request was 'cr'"]
    assert problems(1, blocks=2) == ["seq 1: claim.accepted of c says 2 blocks; the claim covers 3"]
    assert problems(4, blocks=4) == ["seq 4: claim.reused of c credits 4 blocks; the claim covers 3"]
    assert problems(4, blocks=0) == ["seq 4: claim.reused of c credits 0 blocks; the claim covers 3"]
    assert problems(5, blocks=71) == [
        "seq 5: request.refused says 71 blocks needed, blocked by ['c']; the refusal said 70, blocked by ['c']"]
    assert problems(5, blocking_claims=[]) == [
        "seq 5: request.refused says 70 blocks needed, blocked by []; the refusal said 70, blocked by ['c']"]
    assert problems(6, claim_id="x") == ["seq 6: claim.refused of x: a refused claim was never issued an id"]
    # what the test did not do is held only to the trace
    assert content_problems(good, Ledger()) == []


def test_restore_events_carry_the_claim_s_blocks_and_the_tier_they_leave_or_fail_from():
    from pytest_rkv.trace import Ledger, content_problems

    R, D, F = ClaimState.RESIDENT, ClaimState.DEMOTED, ClaimState.FAILED
    ledger = Ledger(claims={"c": 3})
    restored = _event(5, EventType.CLAIM_RESTORED, "c", D, R, request_id="r", tier="device", blocks=3)
    failed = _event(5, EventType.CLAIM_RESTORE_FAILED, "c", D, F, request_id="r", tier="host")
    assert content_problems([restored, failed], ledger) == []
    assert content_problems([restored.model_copy(update={"blocks": 2})], ledger) == [
        "seq 5: claim.restored of c says 2 blocks; the claim covers 3"]
    assert content_problems([failed.model_copy(update={"tier": None})], ledger) == [
        "seq 5: claim.restore_failed of c reports tier None; expected 'host'"]
