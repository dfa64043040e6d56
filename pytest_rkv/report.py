"""Rows: what one backend earned in one run, as a JSON document built from test records.

Each obligation, substrate or lowering test leaves one JSON record on its report (under
the user property `RESULT_KEY`); records ride on reports, so under xdist they reach the
controller like any report. `build_row` turns one backend's records into the row; it is
pure, so `relabel` can re-derive a row's outcomes and labels from its tests alone (which is
how `rkv verify` checks a bundle).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field

from pytest_rkv.contract import (
    API_VERSION,
    ROW_SCHEMA,
    OBLIGATIONS,
    SUBSTRATES,
    SUITE_VERSION,
    TestOutcome,
)
from pytest_rkv.label import combine, obligation_label, row_label

RESULT_KEY = "rkv_result"


@dataclass
class BackendRecords:
    name: str
    depth: str = "native"
    routed: bool = False
    runtime: dict = field(default_factory=dict)
    tests: dict[str, dict] = field(default_factory=dict)  # nodeid -> record


def events_digest(events: list[dict]) -> str:
    """Fingerprint of one test's events in their served order. Timestamps are left out:
    they differ from run to run (real clocks) while the order, carried by seq, does not."""
    stable = [{k: v for k, v in e.items() if k != "ts"} for e in events]
    return hashlib.sha256("\n".join(json.dumps(e, sort_keys=True) for e in stable).encode()).hexdigest()


def build_row(backend: BackendRecords, run: dict | None = None) -> dict:
    """The row for one backend. `run` adds run-level facts (certified, suite hash,
    environment, command line) that do not change any label."""
    """The row document for one backend (pure: same records in, same row out)."""
    by_kind: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for nodeid in sorted(backend.tests):
        rec = backend.tests[nodeid]
        entry = {k: rec[k] for k in ("nodeid", "outcome", "detail", "evidence") if k in rec}
        events = rec.get("events", [])
        entry["events"] = len(events)
        if events:
            entry["events_sha256"] = events_digest(events)
        by_kind[rec["kind"]][rec["id"]].append(entry)

    substrates = {}
    for sub in SUBSTRATES:
        tests = by_kind["substrate"].get(sub.id, [])
        substrates[sub.id] = {"outcome": combine(TestOutcome(t["outcome"]) for t in tests).value, "tests": tests}
    passed_substrates = {k for k, v in substrates.items() if v["outcome"] == "passed"}

    outcomes, verdicts, obligations = {}, {}, {}
    for ob in OBLIGATIONS:
        tests = by_kind["obligation"].get(ob.id, [])
        outcome = combine(TestOutcome(t["outcome"]) for t in tests)
        if ob.routed_only and not backend.routed and outcome in (TestOutcome.NOT_RUN, TestOutcome.PASSED):
            outcome = TestOutcome.NOT_APPLICABLE
        verdict = obligation_label(ob.id, outcome, backend.depth, passed_substrates)
        outcomes[ob.id], verdicts[ob.id] = outcome, verdict
        obligations[ob.id] = {
            "outcome": outcome.value,
            "label": verdict.label.value if verdict.label else None,
            "reason": verdict.reason,
            "tests": tests,
        }
    row = row_label(outcomes, verdicts, passed_substrates, backend.depth)
    lowerings = {
        lid: {"outcome": combine(TestOutcome(t["outcome"]) for t in tests).value, "tests": tests}
        for lid, tests in sorted(by_kind["lowering"].items())
    }
    return {
        **(run or {}),
        "schema": ROW_SCHEMA,
        "suite_version": SUITE_VERSION,
        "api_version": API_VERSION,
        "backend": backend.name,
        "depth": backend.depth,
        "routed": backend.routed,
        "runtime": backend.runtime.get("runtime", backend.name),
        "runtime_version": backend.runtime.get("runtime_version"),
        "runtime_details": backend.runtime,
        "label": row.label.value,
        "reason": row.reason,
        "obligations": obligations,
        "substrates": substrates,
        "lowerings": lowerings,
    }


def relabel(row: dict) -> dict:
    """The row re-derived from its tests' recorded outcomes alone."""
    backend = BackendRecords(row["backend"], depth=row["depth"], routed=row.get("routed", False))
    for kind, section in (("obligation", "obligations"), ("substrate", "substrates"), ("lowering", "lowerings")):
        for id_, entry in row.get(section, {}).items():
            for test in entry.get("tests", []):
                recorded = {k: v for k, v in test.items() if k not in ("events", "events_sha256")}
                backend.tests[test["nodeid"]] = {**recorded, "kind": kind, "id": id_}
    return build_row(backend)


def trace_lines(backend: BackendRecords) -> str:
    """events.jsonl: every captured event, test by test (nodeid order), each tagged with
    the test it came from. Within a test the runtime's own order is kept."""
    lines = []
    for nodeid in sorted(backend.tests):
        for event in backend.tests[nodeid].get("events", []):
            lines.append(json.dumps({**event, "test": nodeid}, sort_keys=True))
    return "\n".join(lines) + ("\n" if lines else "")


