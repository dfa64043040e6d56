"""Rows: what one backend earned in one run, assembled from test reports.

Each obligation, substrate or lowering test leaves one JSON record on its report (under
the user property `RESULT_KEY`). Records ride on reports, so under xdist they reach the
controller like any report; the `RowCollector` lives only there, builds one row per
backend at session end, writes `row.json`, and prints the summary table.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pytest_rkv.contract import (
    API_VERSION,
    OBLIGATIONS,
    SUBSTRATES,
    SUITE_VERSION,
    TestOutcome,
)
from pytest_rkv.label import combine, obligation_label, row_label

RESULT_KEY = "rkv_result"
ROW_SCHEMA = "pytest-rkv/row/1"


@dataclass
class _Backend:
    name: str
    depth: str = "native"
    routed: bool = False
    runtime: dict = field(default_factory=dict)
    tests: dict[str, dict] = field(default_factory=dict)  # nodeid -> record


def build_row(backend: _Backend) -> dict:
    """The row document for one backend (pure: same records in, same row out)."""
    by_kind: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for nodeid in sorted(backend.tests):
        rec = backend.tests[nodeid]
        entry = {k: rec[k] for k in ("nodeid", "outcome", "detail", "evidence") if k in rec}
        entry["events"] = len(rec.get("events", []))
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
    row = row_label(outcomes, verdicts, passed_substrates)
    lowerings = {
        lid: {"outcome": combine(TestOutcome(t["outcome"]) for t in tests).value, "tests": tests}
        for lid, tests in sorted(by_kind["lowering"].items())
    }
    return {
        "schema": ROW_SCHEMA,
        "suite_version": SUITE_VERSION,
        "api_version": API_VERSION,
        "backend": backend.name,
        "depth": backend.depth,
        "runtime": backend.runtime.get("runtime", backend.name),
        "runtime_version": backend.runtime.get("runtime_version"),
        "runtime_details": backend.runtime,
        "label": row.label.value,
        "reason": row.reason,
        "obligations": obligations,
        "substrates": substrates,
        "lowerings": lowerings,
    }


def trace_lines(backend: _Backend) -> str:
    """events.jsonl: every captured event, test by test (nodeid order), each tagged with
    the test it came from. Within a test the runtime's own order is kept."""
    lines = []
    for nodeid in sorted(backend.tests):
        for event in backend.tests[nodeid].get("events", []):
            lines.append(json.dumps({**event, "test": nodeid}, sort_keys=True))
    return "\n".join(lines) + ("\n" if lines else "")


class RowCollector:
    """Controller-side plugin object: gathers records, writes rows, prints the table."""

    def __init__(self, report_dir: Path, backends: tuple[str, ...]) -> None:
        self.report_dir = report_dir
        self.backends = {name: _Backend(name) for name in backends}
        self.rows: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:
        for key, value in getattr(report, "user_properties", ()):
            if key != RESULT_KEY:
                continue
            rec = json.loads(value)
            backend = self.backends.setdefault(rec["backend"], _Backend(rec["backend"]))
            backend.depth, backend.routed = rec["depth"], rec["routed"]
            if rec.get("runtime"):
                backend.runtime = rec["runtime"]
            previous = backend.tests.get(rec["nodeid"])
            # A later phase (teardown error) may only make the record worse, never better.
            if previous is None or combine([TestOutcome(previous["outcome"]), TestOutcome(rec["outcome"])]).value == rec["outcome"]:
                backend.tests[rec["nodeid"]] = rec

    def pytest_sessionfinish(self, session) -> None:
        for name, backend in self.backends.items():
            if not backend.tests:
                continue
            row = build_row(backend)
            self.rows[name] = row
            out = self.report_dir / _safe(name)
            out.mkdir(parents=True, exist_ok=True)
            (out / "row.json").write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
            (out / "events.jsonl").write_text(trace_lines(backend))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        tr = terminalreporter
        tr.section("resident KV claims: rows")
        for name, row in self.rows.items():
            tr.write_line(f"{name} ({row['runtime']} {row['runtime_version'] or '?'}, depth {row['depth']}): "
                          f"{row['label'].upper()}")
            tr.write_line(f"  {row['reason']}")
            for ob_id, ob in row["obligations"].items():
                label = ob["label"] or "n/a"
                tr.write_line(f"  {ob_id:<26} {ob['outcome']:<14} {label:<24} {ob['reason']}")
            for sub_id, sub in row["substrates"].items():
                tr.write_line(f"  substrate {sub_id:<16} {sub['outcome']}")
            for low_id, low in row["lowerings"].items():
                tr.write_line(f"  lowering {low_id:<17} {low['outcome']}")
        tr.write_line(f"rows written to {self.report_dir}/<backend>/row.json")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
