"""Rows and bundles: what one backend earned in one run, written where a sceptic can check it.

Each obligation, substrate or lowering test leaves one JSON record on its report (under
the user property `RESULT_KEY`): outcome, evidence, the events it left and the transcript
of its Driver calls. Records ride on reports, so under xdist they reach the controller like
any report. `build_row` turns one backend's records into the row (pure: same records in,
same row out); `RowCollector` writes the bundle (formats in `pytest_rkv.evidence`) and
seals it.

The report dir is handled with care: a bundle folder is created with a marker file, and
only a folder holding that marker is ever emptied (`claim_bundle_dir`, `prepare`).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pytest_rkv.certify import redact
from pytest_rkv.contract import API_VERSION, OBLIGATIONS, SUBSTRATES, SUITE_VERSION, TestOutcome
from pytest_rkv.evidence import (
    DESCRIPTORS,
    EVENTS,
    JUNIT,
    MANIFEST,
    ROW_SCHEMA,
    TRANSCRIPT,
    EvidenceError,
    Row,
    bundle_dir,
    events_digest,
    has_marker,
    junit_xml,
    list_files,
    sha256,
    trace_text,
    transcript_text,
    write_manifest,
    write_marker,
    write_row,
)
from pytest_rkv.label import combine, obligation_label, row_label
from pytest_rkv.provenance import row_provenance
from pytest_rkv.provenance import summary as provenance_summary

RESULT_KEY = "rkv_result"


@dataclass
class BackendRecords:
    name: str
    depth: str = "native"
    routed: bool = False
    runtime: dict = field(default_factory=dict)
    tests: dict[str, dict] = field(default_factory=dict)  # nodeid -> record


def build_row(backend: BackendRecords, run: dict | None = None) -> dict:
    """The row document for one backend (pure). `run` adds run-level facts (certified,
    suite hash, environment, command line) that do not change any label."""
    by_kind: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for nodeid in sorted(backend.tests):
        rec = backend.tests[nodeid]
        entry = {k: rec[k] for k in ("nodeid", "outcome", "detail", "evidence") if k in rec}
        events = rec.get("events", [])
        entry["events"] = len(events)
        if events:
            entry["events_sha256"] = events_digest(events)
        entry["calls"] = len(rec.get("calls", []))
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


def records_of(row: Row) -> BackendRecords:
    """A row's tests back as records (outcomes only: no events, no calls)."""
    backend = BackendRecords(row.backend, depth=row.depth, routed=row.routed)
    for kind, section in (("obligation", row.obligations), ("substrate", row.substrates),
                          ("lowering", row.lowerings)):
        for id_, entry in section.items():
            for test in entry.tests:
                backend.tests[test.nodeid] = {"nodeid": test.nodeid, "outcome": test.outcome.value,
                                              "detail": test.detail, "evidence": test.evidence,
                                              "kind": kind, "id": id_}
    return backend


# -- the report dir ---------------------------------------------------------------------


class ReportDirError(ValueError):
    """The report dir cannot take a bundle without risking what the suite did not write."""


def check_report_dir(report_dir: Path) -> None:
    """A directory (or a path to one) this process may write into."""
    if report_dir.exists() and not report_dir.is_dir():
        raise ReportDirError(f"--rkv-report-dir {report_dir} is a file, not a directory")
    existing = report_dir
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ReportDirError(f"--rkv-report-dir {report_dir} is not writable ({existing} is read-only)")


def claim_bundle_dir(report_dir: Path, backend: str) -> Path:
    """The backend's bundle folder: created with the marker, or one that holds the marker."""
    try:
        out = bundle_dir(report_dir, backend)
    except EvidenceError as exc:
        raise ReportDirError(str(exc)) from None
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise ReportDirError(f"{out} exists and is not a bundle folder; move it or choose another --rkv-report-dir")
    if out.is_dir():
        if not has_marker(out):
            raise ReportDirError(f"{out} holds a folder this suite did not create (no marker); "
                                 "move it or choose another --rkv-report-dir")
        return out
    out.mkdir(parents=True)
    write_marker(out, backend)
    return out


def prepare(report_dir: Path, backends: tuple[str, ...]) -> None:
    """Before an explicit run: refuse a report dir that is unusable, or that holds a folder
    for a backend the suite did not create; empty the ones it did create (a fresh bundle
    never mixes files from two runs)."""
    check_report_dir(report_dir)
    for name in backends:
        claim_bundle_dir(report_dir, name)  # refuses foreign folders before anything is removed
    for name in backends:
        shutil.rmtree(bundle_dir(report_dir, name))
        claim_bundle_dir(report_dir, name)


# -- writing and sealing --------------------------------------------------------------------


def seal(bundle: Path) -> None:
    """Redact every text file in place, drop the sockets a runtime left in the folder the
    suite created, then write the manifest of hashes of every file."""
    for path in sorted(bundle.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISSOCK(mode):
            path.unlink()
    files, problems = list_files(bundle)
    if problems:
        raise EvidenceError(f"cannot seal {bundle}: {'; '.join(problems)}")
    hashes = {}
    for rel, path in files.items():
        if rel == MANIFEST:
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            cleaned = redact(text)
            if cleaned != text:
                path.write_text(cleaned)
                data = cleaned.encode()
        hashes[rel] = sha256(data)
    write_manifest(bundle, hashes)


def _check_descriptors_of(backend: str, directory: Path, out: Path) -> dict:
    """Copy the backend's descriptors into the bundle and label each against this run."""
    from pytest_rkv.checker import check_file
    from pytest_rkv.descriptor import DescriptorError, descriptor_files, load_descriptor, load_evidence

    results = {}
    for path in descriptor_files(directory):
        try:
            if load_descriptor(path).backend != backend:
                continue
        except DescriptorError:
            continue  # `rkv check` reports malformed descriptors; a bundle only holds usable ones
        copy = out / DESCRIPTORS / path.name
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, copy)
        check = check_file(copy, load_evidence(out / "row.json"))
        results[path.name] = {"label": check.label.value, "reason": check.reason}
    return results


def write_bundle(out: Path, backend: BackendRecords, run: dict | None, descriptors: Path | None) -> Row:
    """row.json, events.jsonl, transcript.jsonl, junit.xml, descriptors/, manifest.json."""
    row = build_row(backend, run)
    (out / EVENTS).write_text(trace_text({n: r.get("events", []) for n, r in backend.tests.items()}))
    (out / TRANSCRIPT).write_text(transcript_text({n: r.get("calls", []) for n, r in backend.tests.items()}))
    model = write_row(out, row)
    if descriptors is not None:
        row["descriptors"] = _check_descriptors_of(backend.name, descriptors, out)
        model = write_row(out, row)
    (out / JUNIT).write_text(junit_xml(model))
    seal(out)
    return model


class RowCollector:
    """Controller-side plugin object: gathers records, writes bundles, prints the table.

    `run_facts()` gives run-level facts copied into every row (certified, suite hash,
    environment, command line)."""

    def __init__(self, report_dir: Path, backends: tuple[str, ...], run_facts,
                 descriptors: Path | None = None) -> None:
        self.report_dir = report_dir
        self.descriptors = descriptors
        self.backends = {name: BackendRecords(name) for name in backends}
        self.run_facts = run_facts
        self.rows: dict[str, Row] = {}

    def pytest_runtest_logreport(self, report) -> None:
        for key, value in getattr(report, "user_properties", ()):
            if key != RESULT_KEY:
                continue
            rec = json.loads(value)
            backend = self.backends.setdefault(rec["backend"], BackendRecords(rec["backend"]))
            backend.depth, backend.routed = rec["depth"], rec["routed"]
            if rec.get("runtime"):
                backend.runtime = rec["runtime"]
            previous = backend.tests.get(rec["nodeid"])
            # A later phase (teardown error) may only make the record worse, never better.
            if previous is None or combine([TestOutcome(previous["outcome"]), TestOutcome(rec["outcome"])]).value == rec["outcome"]:
                backend.tests[rec["nodeid"]] = rec

    def pytest_sessionfinish(self, session) -> None:
        run = None
        for name, backend in self.backends.items():
            if not backend.tests:
                continue
            run = run or self.run_facts()
            out = claim_bundle_dir(self.report_dir, name)
            facts = {**run, "provenance": row_provenance(backend.runtime, run.get("environment", {}),
                                                         SUITE_VERSION, run.get("suite_hash", "unidentified"))}
            self.rows[name] = write_bundle(out, backend, facts, self.descriptors)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        tr = terminalreporter
        tr.section("resident KV claims: rows")
        for name, row in self.rows.items():
            tr.write_line(f"{name} ({row.runtime} {row.runtime_version or '?'}, depth {row.depth}): "
                          f"{row.label.value.upper()}")
            tr.write_line(f"  {row.reason}")
            if row.provenance:
                tr.write_line(f"  provenance: {provenance_summary(row.provenance)}")
            for ob_id, ob in row.obligations.items():
                label = ob.label.value if ob.label else "n/a"
                tr.write_line(f"  {ob_id:<26} {ob.outcome.value:<14} {label:<24} {ob.reason}")
            for sub_id, sub in row.substrates.items():
                tr.write_line(f"  substrate {sub_id:<16} {sub.outcome.value}")
            for low_id, low in row.lowerings.items():
                tr.write_line(f"  lowering {low_id:<17} {low.outcome.value}")
        tr.write_line(f"bundles written to {self.report_dir}/<backend>/ "
                      "(row.json, events.jsonl, transcript.jsonl, junit.xml, manifest.json)")
