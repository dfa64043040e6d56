"""The bad-lowering suite: counterexamples the checker must label exactly, for the stated reason.

Each folder under tests/checker/bad_lowerings/ is one counterexample:

    descriptor.toml   the proposed lowering
    row.json          the run's row, if there was a run (absent: a static row)
    events.jsonl      the run's trace, if it left one
    expect.toml       about = "...", row = "<row label>", and per obligation
                      label = "<label>", reason = "<finding code>", says = "<text in the reason>"

The exact label of every expected obligation and of the row is asserted, so a checker that
upgrades any counterexample fails here; the mutation tests below show it for each rule.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import json

import pytest

import pytest_rkv.checker as label_module
from pytest_rkv.contract import Label, TestOutcome
from pytest_rkv.descriptor import Evidence, SuiteCatalogue, load_evidence
from tests.conftest import recorded_catalogue
from pytest_rkv.checker import FINDING_CODES, check_file
from pytest_rkv.matrix import render_check

ROOT = Path(__file__).resolve().parents[2]
BAD = Path(__file__).resolve().parent / "bad_lowerings"
CASES = sorted(p for p in BAD.iterdir() if (p / "expect.toml").is_file())
CATALOGUE = SuiteCatalogue.scan(ROOT / "suites")

# The counterexamples the issue names, each by the folder that holds it.
REQUIRED = {
    "request priority as a hard claim": "priority-as-hard-claim",
    "TTL-like duration as claim expiry": "ttl-as-expiry",
    "host offload as restore-before-reuse": "host-offload-as-restore",
    "BlockStored/BlockRemoved events as claim lifecycle": "block-events-as-lifecycle",
    "BlockRemoved as claim harm": "block-removed-as-harm",
    "an active no-evict mode (a request that just waits) as active refusal": "no-evict-wait-as-refusal",
    "a session lock as a hard claim": "session-lock-as-hard-claim",
    "a KV-aware routing score as placement attribution": "routing-score-as-placement",
    "a prefix-cache hit counter as reuse attribution": "prefix-hit-counter-as-reuse",
    "recompute fallback as materialization": "recompute-as-materialization",
    "an HTTP 500 with no claim id as claim-scoped failure": "http500-as-claim-failure",
    "events without sequence numbers as ordered lifecycle": "events-without-seq",
    "a descriptor whose anchors point nowhere": "anchors-point-nowhere",
    "an adapter row claiming native": "adapter-claims-native",
}


def expectation(case: Path) -> dict:
    return tomllib.loads((case / "expect.toml").read_text())


def check(case: Path):
    evidence = load_evidence(case / "row.json") if (case / "row.json").is_file() else Evidence()
    return check_file(case / "descriptor.toml", evidence, catalogue=catalogue_of(case))


def catalogue_of(case: Path) -> SuiteCatalogue:
    """The suite as it was when the case's evidence was recorded (see recorded_catalogue)."""
    row_path = case / "row.json"
    return recorded_catalogue(json.loads(row_path.read_text())) if row_path.is_file() else CATALOGUE


def mismatches(case: Path) -> list[str]:
    """Every way the checker's answer differs from the case's expectation."""
    expect, result = expectation(case), check(case)
    found = []
    if result.label.value != expect["row"]:
        found.append(f"row: expected {expect['row']!r}, got {result.label.value!r} ({result.reason})")
    for ob_id, want in expect["obligations"].items():
        got = result.obligations[ob_id]
        if got.label is None or got.label.value != want["label"]:
            found.append(f"{ob_id}: expected {want['label']!r}, got {got.label} ({got.reason})")
        if want["reason"] not in got.codes:
            found.append(f"{ob_id}: expected reason {want['reason']!r}, got {got.codes} ({got.reason})")
        if want.get("says", "") not in got.reason:
            found.append(f"{ob_id}: expected the reason to say {want['says']!r}, got {got.reason!r}")
    return found


def test_there_are_at_least_fifteen_counterexamples_covering_the_required_ones():
    names = {c.name for c in CASES}
    assert len(CASES) >= 15
    missing = {what: name for what, name in REQUIRED.items() if name not in names}
    assert not missing, f"counterexamples missing: {missing}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_counterexample_is_well_formed(case):
    expect = expectation(case)
    assert expect["about"] and expect["obligations"]
    for want in expect["obligations"].values():
        assert Label(want["label"])
        assert want["reason"] in FINDING_CODES


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_counterexample_gets_its_expected_label_for_the_stated_reason(case):
    assert mismatches(case) == [], expectation(case)["about"]


def test_no_counterexample_is_credited():
    """The suite is about bad lowerings: none may come out native, whatever else happens."""
    for case in CASES:
        result = check(case)
        assert result.label != Label.NATIVE, case.name
        assert all(c.label != Label.NATIVE for c in result.obligations.values()), case.name


# -- mutations: weaken one rule, and some counterexample must notice --------------------------


def _no_trace_checks(*args, **kwargs):
    return []


def _never_contradicted(bearing):
    return []


def _static_takes_the_proposal(floor, cap):
    return cap


def _always_native_depth(ob_id, outcome, depth, substrates):
    return ORIGINAL_OBLIGATION_LABEL(ob_id, outcome, "native", substrates)


def _ignore_void(outcomes):
    return ORIGINAL_COMBINE([o for o in outcomes if o not in (TestOutcome.ERROR, TestOutcome.NOT_RUN)])


def _every_anchor_resolves(*args, **kwargs):
    return None


ORIGINAL_OBLIGATION_LABEL = label_module.obligation_label
ORIGINAL_COMBINE = label_module.combine

MUTATIONS = {
    # name: (attribute of pytest_rkv.checker, weakened replacement, cases that must then fail)
    "trust any pass without a trace": ("_trace_findings", _no_trace_checks, {
        "ttl-as-expiry", "host-offload-as-restore", "block-events-as-lifecycle", "block-removed-as-harm",
        "routing-score-as-placement", "prefix-hit-counter-as-reuse", "recompute-as-materialization",
        "http500-as-claim-failure", "events-without-seq", "reuse-before-restore", "trace-edited-after-run",
        "duplicate-seq", "refusal-without-claim", "passed-without-trace"}),
    "failed tests do not contradict": ("_contradicting", _never_contradicted, {
        "priority-as-hard-claim", "no-evict-wait-as-refusal", "session-lock-as-hard-claim"}),
    "static anchors are enough": ("_static_label", _static_takes_the_proposal, {"static-native-claim"}),
    "every run counts as native depth": ("obligation_label", _always_native_depth, {"adapter-claims-native"}),
    "harness errors are skipped": ("combine", _ignore_void, {"harness-error"}),
    "anchors are never checked": ("resolve_anchor", _every_anchor_resolves, {"anchors-point-nowhere"}),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_weakening_a_rule_changes_the_counterexamples_it_guards(monkeypatch, mutation):
    attribute, replacement, guarded = MUTATIONS[mutation]
    monkeypatch.setattr(label_module, attribute, replacement)
    caught = {case.name for case in CASES if mismatches(case)}
    assert guarded <= caught, f"{mutation}: not caught by {sorted(guarded - caught)}"


# -- the command line ---------------------------------------------------------------------


def _rkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "check", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_rkv_check_rejects_priority_as_hard_claim_and_exits_non_zero():
    case = BAD / "priority-as-hard-claim"
    proc = _rkv(str(case / "descriptor.toml"), "--evidence", str(case / "row.json"))
    assert proc.returncode == 1, proc.stderr
    assert "active-refusal             rejected mapping" in proc.stdout
    assert "contradicted: test_lowerings.py::test_priority_as_hard_claim failed" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("row: REJECTED MAPPING")


def test_rkv_check_takes_an_explicit_event_trace(tmp_path):
    case = BAD / "block-events-as-lifecycle"
    row = tmp_path / "row.json"
    row.write_text((case / "row.json").read_text())  # no events.jsonl beside it
    without = _rkv(str(case / "descriptor.toml"), "--evidence", str(row))
    with_events = _rkv(str(case / "descriptor.toml"), "--evidence", str(row), "--events", str(case / "events.jsonl"))
    assert without.returncode == with_events.returncode == 0
    # What the trace changes, judged on the suite the case was recorded with:
    catalogue = catalogue_of(case)
    bare = check_file(case / "descriptor.toml", load_evidence(row), catalogue=catalogue)
    traced = check_file(case / "descriptor.toml", load_evidence(row, case / "events.jsonl"), catalogue=catalogue)
    assert "there is no event trace" in render_check(bare)
    assert "missing identity: nothing in the trace" in render_check(traced)
