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
