"""The label rules and trace reading: pure functions of outcomes and events."""

import pytest

from pytest_rkv.contract import (
    ALLOWED_TRANSITIONS,
    EVENT_TRANSITIONS,
    OBLIGATIONS,
    ClaimState,
    Event,
    EventType,
    Label,
    TestOutcome,
)
from pytest_rkv.label import combine, obligation_label, row_label
from pytest_rkv.trace import order_problems, reconstruct



# -- labels ---------------------------------------------------------------------------

def test_worst_outcome_speaks_for_an_obligation():
    assert combine([TestOutcome.PASSED, TestOutcome.FAILED]) == TestOutcome.FAILED
    assert combine([TestOutcome.PASSED, TestOutcome.UNSUPPORTED]) == TestOutcome.UNSUPPORTED
    assert combine([TestOutcome.FAILED, TestOutcome.ERROR]) == TestOutcome.ERROR
    assert combine([TestOutcome.NOT_APPLICABLE, TestOutcome.PASSED]) == TestOutcome.PASSED
    assert combine([]) == TestOutcome.NOT_RUN


@pytest.mark.parametrize("depth, label", [("native", Label.NATIVE), ("adapter", Label.ADAPTER),
                                          ("patch", Label.ADAPTER), ("none", Label.APPROXIMATION)])
def test_a_pass_is_labelled_by_depth(depth, label):
    assert obligation_label("active-refusal", TestOutcome.PASSED, depth, set()).label == label


def test_a_miss_is_approximation_only_with_a_related_substrate():
    assert obligation_label("active-refusal", TestOutcome.FAILED, "native", {"eviction_observable"}).label == Label.APPROXIMATION
    assert obligation_label("active-refusal", TestOutcome.FAILED, "native", {"block_events"}).label == Label.UNKNOWN
    for outcome in (TestOutcome.UNTESTABLE, TestOutcome.ERROR, TestOutcome.NOT_RUN):
        assert obligation_label("active-refusal", outcome, "native", {"eviction_observable"}).label == Label.UNKNOWN


def _row(outcomes, depth="native", substrates=frozenset()):
    verdicts = {k: obligation_label(k, v, depth, set(substrates)) for k, v in outcomes.items()}
    return row_label(outcomes, verdicts, set(substrates), depth).label


def test_row_is_fail_closed():
    every = {o.id: TestOutcome.PASSED for o in OBLIGATIONS if not o.routed_only}
    assert _row(every) == Label.NATIVE
    assert _row(every, depth="adapter") == Label.ADAPTER
    assert _row({**every, "expiry": TestOutcome.ERROR}) == Label.UNKNOWN
    assert _row({**every, "expiry": TestOutcome.NOT_RUN}) == Label.UNKNOWN
    assert _row({**every, "expiry": TestOutcome.FAILED}) == Label.APPROXIMATION
    assert _row({**every, "expiry": TestOutcome.UNTESTABLE}) == Label.APPROXIMATION
    nothing = {o.id: TestOutcome.UNSUPPORTED for o in OBLIGATIONS if not o.routed_only}
    assert _row(nothing) == Label.UNKNOWN
    assert _row(nothing, substrates={"prefix_reuse"}) == Label.APPROXIMATION


def test_an_adapter_may_bound_its_scope_but_never_around_a_core_obligation():
    every = {o.id: TestOutcome.PASSED for o in OBLIGATIONS if not o.routed_only}
    no_tier = {**every, "demotion-restore": TestOutcome.UNSUPPORTED}
    subs = {"prefix_reuse", "eviction_observable"}
    assert _row(no_tier, depth="adapter", substrates=subs) == Label.ADAPTER
    assert _row(no_tier, depth="native", substrates=subs) == Label.APPROXIMATION, "native means everything"
    assert _row({**no_tier, "active-refusal": TestOutcome.UNSUPPORTED}, depth="adapter", substrates=subs) == Label.APPROXIMATION
    assert _row({**no_tier, "expiry": TestOutcome.FAILED}, depth="adapter", substrates=subs) == Label.APPROXIMATION
    assert _row({**no_tier, "expiry": TestOutcome.UNTESTABLE}, depth="adapter", substrates=subs) == Label.APPROXIMATION


# -- traces ---------------------------------------------------------------------------

def _ev(seq, type_, claim=None, **kw):
    rule = EVENT_TRANSITIONS.get(type_)
    if rule and "from_state" not in kw:
        kw["from_state"] = next(iter(rule[0]))
        kw["to_state"] = rule[1]
    return Event(seq=seq, ts=0.0, type=type_, claim_id=claim, **kw)


def test_a_well_ordered_trace_has_no_problems():
    trace = [_ev(1, EventType.CLAIM_ACCEPTED, "c"), _ev(2, EventType.CLAIM_MATERIALIZED, "c"),
             _ev(3, EventType.CLAIM_RELEASED, "c", from_state=ClaimState.RESIDENT, to_state=ClaimState.RELEASED)]
    assert order_problems(trace) == []


def test_order_problems_name_what_is_wrong():
    swapped = [_ev(1, EventType.CLAIM_MATERIALIZED, "c"), _ev(2, EventType.CLAIM_ACCEPTED, "c")]
    assert any("not a lifecycle step" in p for p in order_problems(swapped))
    repeated = [_ev(1, EventType.CLAIM_ACCEPTED, "c"), _ev(1, EventType.CLAIM_MATERIALIZED, "c")]
    assert any("does not follow" in p for p in order_problems(repeated))
    anonymous = [_ev(1, EventType.CLAIM_ACCEPTED, None)]
    assert any("names no claim" in p for p in order_problems(anonymous))


def test_every_event_transition_is_allowed_by_the_state_machine():
    for allowed_from, to_state in EVENT_TRANSITIONS.values():
        for from_state in allowed_from:
            assert (from_state, to_state) in ALLOWED_TRANSITIONS


def test_reconstruct_names_refusals_and_their_blockers():
    trace = [_ev(1, EventType.CLAIM_ACCEPTED, "h"), _ev(2, EventType.CLAIM_MATERIALIZED, "h"),
             Event(seq=3, ts=0, type=EventType.REQUEST_REFUSED, request_id="r", blocking_claims=["h"])]
    seen = reconstruct(trace)
    assert seen.requests["r"].outcomes == {"active_refusal"}
    assert seen.claims["h"].blocked == {"r"}
    assert seen.outcomes() == {"accepted_hard_claims", "active_refusal"}


