"""Outcomes -> labels: the one place evidence labels are computed.

Pure functions, no pytest: the plugin (`report.build_row`), `rkv verify` (by replay) and
the lowering checker (`pytest_rkv.checker`, which can only lower what these give) share
them. This module holds the rules once; it imports nothing but the contract.

Per obligation, from outcomes (fail-closed):

    outcome            depth native      depth adapter/patch    depth none
    passed             native            adapter-scoped         approximation (see below)
    failed/unsupported approximation if a related substrate passed, else unknown
    untestable/error/not_run -> unknown
    not_applicable     -> not counted

A pass at depth "none" is impossible in principle (a runtime with no claims cannot pass a
claim test); should it happen, it is not allowed to upgrade anything: approximation.

Per row, from outcomes:

    1. any harness error or obligation not run        -> unknown (the evidence is void)
    2. every applicable obligation native             -> native conformance
    3. every applicable obligation native or adapter  -> adapter-scoped evidence
       (at depth adapter/patch the scope may be bounded: obligations the backend
       declared unsupported are left out and named, but never a core obligation)
    4. some positive evidence (a substrate or an obligation passed), obligations
       missing                                        -> approximation substrate
    5. otherwise                                      -> unknown evidence
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pytest_rkv.contract import CORE_OBLIGATIONS, OBLIGATIONS_BY_ID, Depth, Label, TestOutcome

# When several tests bear on one obligation, the worst outcome speaks for it.
_SEVERITY = [
    TestOutcome.ERROR,
    TestOutcome.NOT_RUN,
    TestOutcome.FAILED,
    TestOutcome.UNSUPPORTED,
    TestOutcome.UNTESTABLE,
    TestOutcome.PASSED,
    TestOutcome.NOT_APPLICABLE,
]


def combine(outcomes: Iterable[TestOutcome]) -> TestOutcome:
    """The worst of several test outcomes; NOT_RUN when there are none."""
    found = list(outcomes)
    if not found:
        return TestOutcome.NOT_RUN
    applicable = [o for o in found if o != TestOutcome.NOT_APPLICABLE]
    if not applicable:
        return TestOutcome.NOT_APPLICABLE
    return min(applicable, key=_SEVERITY.index)


@dataclass(frozen=True)
class Verdict:
    label: Label | None  # None: not applicable, does not count
    reason: str


def obligation_label(
    obligation_id: str, outcome: TestOutcome, depth: Depth, substrates_passed: set[str]
) -> Verdict:
    ob = OBLIGATIONS_BY_ID[obligation_id]
    if outcome == TestOutcome.NOT_APPLICABLE:
        return Verdict(None, "does not apply to this backend")
    if outcome == TestOutcome.PASSED:
        if depth == "native":
            return Verdict(Label.NATIVE, "passed; the runtime itself supplies it")
        if depth in ("adapter", "patch"):
            through = "an adapter" if depth == "adapter" else "a patch"
            return Verdict(Label.ADAPTER, f"passed through {through}, not the runtime itself")
        return Verdict(Label.APPROXIMATION, "passed, but the backend declares no claim support")
    if outcome in (TestOutcome.FAILED, TestOutcome.UNSUPPORTED):
        related = sorted(set(ob.substrates) & substrates_passed)
        what = "failed" if outcome == TestOutcome.FAILED else "not offered"
        if related:
            return Verdict(Label.APPROXIMATION, f"{what}; substrates present: {', '.join(related)}")
        return Verdict(Label.UNKNOWN, f"{what}; no related substrate evidence")
    reasons = {
        TestOutcome.UNTESTABLE: "the backend cannot be probed for it",
        TestOutcome.ERROR: "harness error: no valid evidence",
        TestOutcome.NOT_RUN: "not executed in this run",
    }
    return Verdict(Label.UNKNOWN, reasons[outcome])


def row_label(
    obligation_outcomes: Mapping[str, TestOutcome],
    verdicts: Mapping[str, Verdict],
    substrates_passed: set[str] = frozenset(),
    depth: Depth = "native",
) -> Verdict:
    counted = {k: v for k, v in verdicts.items() if v.label is not None}
    void = sorted(
        k for k, o in obligation_outcomes.items() if o in (TestOutcome.ERROR, TestOutcome.NOT_RUN)
    )
    if void:
        return Verdict(Label.UNKNOWN, f"no valid evidence for: {', '.join(void)}")
    if not counted:
        return Verdict(Label.UNKNOWN, "no applicable obligation")
    labels = {v.label for v in counted.values()}
    if labels == {Label.NATIVE}:
        return Verdict(Label.NATIVE, "every applicable obligation passed natively")
    if labels <= {Label.NATIVE, Label.ADAPTER}:
        adapted = sorted(k for k, v in counted.items() if v.label == Label.ADAPTER)
        return Verdict(Label.ADAPTER, f"every obligation passed; through an adapter: {', '.join(adapted)}")
    if depth in ("adapter", "patch"):
        outside = sorted(k for k, o in obligation_outcomes.items() if o == TestOutcome.UNSUPPORTED)
        inside = {k: v for k, v in counted.items() if k not in outside}
        core_in = all(k in inside for k in CORE_OBLIGATIONS if k in counted)
        if outside and core_in and {v.label for v in inside.values()} <= {Label.NATIVE, Label.ADAPTER}:
            return Verdict(Label.ADAPTER, f"every obligation in the {depth}'s scope passed; "
                                          f"declared unsupported, outside it: {', '.join(outside)}")
    missing = sorted(k for k, v in counted.items() if v.label not in (Label.NATIVE, Label.ADAPTER))
    positive = Label.APPROXIMATION in labels or substrates_passed or (labels & {Label.NATIVE, Label.ADAPTER})
    if positive:
        return Verdict(Label.APPROXIMATION, f"substrates present, obligations missing: {', '.join(missing)}")
    return Verdict(Label.UNKNOWN, f"inconclusive: {', '.join(missing)}")
