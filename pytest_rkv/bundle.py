"""Evidence bundles: one directory per row that a third party can check without the run.

    <report-dir>/<backend>/
        row.json        the row (outcomes, labels, reasons, evidence, environment)
        events.jsonl    every captured event, tagged with its test
        junit.xml       one testcase per test, outcome as JUnit understands it
        *.log, ...      server logs and generated inputs the backend left in its workdir
        descriptors/    the lowering descriptors of this backend, checked against this run
        manifest.json   sha256 of every other file

`verify()` re-derives everything it can from the bundle itself and the suite version it
names: file hashes, row schema, suite identity, completeness, JUnit and trace agreement,
and every label (recomputed with the same label module the run used). Each check yields
one line; any failure makes the bundle unverifiable.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from pytest_rkv.certify import redact, released_manifest
from pytest_rkv.contract import OBLIGATIONS, SUITE_VERSION
from pytest_rkv.report import RESULT_KEY, BackendRecords, build_row, events_digest, relabel, trace_lines
from pytest_rkv.label import combine
from pytest_rkv.contract import TestOutcome

MANIFEST = "manifest.json"


# -- writing --------------------------------------------------------------------------


def junit_xml(row: dict) -> str:
    tests = [t for section in ("obligations", "substrates", "lowerings")
             for entry in row[section].values() for t in entry["tests"]]
    suite = ET.Element("testsuite", name=f"pytest-rkv:{row['backend']}", tests=str(len(tests)))
    props = ET.SubElement(suite, "properties")
    for key in ("backend", "suite_version", "suite_hash", "label"):
        ET.SubElement(props, "property", name=key, value=str(row.get(key)))
    counts = {"failures": 0, "errors": 0, "skipped": 0}
    for t in sorted(tests, key=lambda t: t["nodeid"]):
        path, _, name = t["nodeid"].partition("::")
        case = ET.SubElement(suite, "testcase", classname=path, name=name)
        outcome, detail = t["outcome"], t.get("detail", "")
        if outcome == "failed":
            ET.SubElement(case, "failure", message=detail[:500]).text = detail
            counts["failures"] += 1
        elif outcome in ("error", "not_run"):
            ET.SubElement(case, "error", message=detail[:500]).text = detail
            counts["errors"] += 1
        elif outcome != "passed":
            ET.SubElement(case, "skipped", message=f"{outcome}: {detail}"[:500])
            counts["skipped"] += 1
    for key, value in counts.items():
        suite.set(key, str(value))
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _bundle_files(bundle: Path) -> list[Path]:
    """Regular files only (a vLLM event socket may live in the workdir), manifest excluded."""
    files = []
    for path in sorted(bundle.rglob("*")):
        if path.name == MANIFEST or "__pycache__" in path.parts:
            continue
        if stat.S_ISREG(path.lstat().st_mode):
            files.append(path)
    return files


def seal(bundle: Path) -> None:
    """Redact every text file in place, then write the manifest of hashes."""
    hashes = {}
    for path in _bundle_files(bundle):
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
        hashes[str(path.relative_to(bundle))] = hashlib.sha256(data).hexdigest()
    (bundle / MANIFEST).write_text(json.dumps({"files": hashes}, indent=2, sort_keys=True) + "\n")


def _write_row(out: Path, row: dict) -> None:
    (out / "row.json").write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")


def _check_descriptors_of(backend: str, directory: Path, out: Path) -> dict:
    """Copy the backend's descriptors into the bundle and label each against this run."""
    from pytest_rkv.descriptor import DescriptorError, descriptor_files, load_descriptor, load_evidence
    from pytest_rkv.label import check_file

    results = {}
    for path in descriptor_files(directory):
        try:
            if load_descriptor(path).backend != backend:
                continue
        except DescriptorError:
            continue  # `rkv check` reports malformed descriptors; a bundle only holds usable ones
        copy = out / "descriptors" / path.name
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, copy)
        check = check_file(copy, load_evidence(out / "row.json"))
        results[path.name] = {"label": check.label.value, "reason": check.reason}
    return results


def bundle_dir(report_dir: Path, backend: str) -> Path:
    """Where a backend's logs go during the run and its bundle after it."""
    return report_dir / "".join(c if c.isalnum() or c in "-_." else "_" for c in backend)


class RowCollector:
    """Controller-side plugin object: gathers records, writes bundles, prints the table.

    `run_facts()` gives run-level facts copied into every row (certified, suite hash,
    environment, command line). With `clean`, a backend's bundle directory is emptied when
    the run starts, so a bundle never mixes files from two runs."""

    def __init__(self, report_dir: Path, backends: tuple[str, ...], run_facts, clean: bool,
                 descriptors: Path | None = None) -> None:
        self.report_dir = report_dir
        self.descriptors = descriptors
        self.backends = {name: BackendRecords(name) for name in backends}
        self.run_facts = run_facts
        self.rows: dict[str, dict] = {}
        if clean:
            for name in backends:
                shutil.rmtree(bundle_dir(report_dir, name), ignore_errors=True)

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
            row = build_row(backend, run)
            self.rows[name] = row
            out = bundle_dir(self.report_dir, name)
            out.mkdir(parents=True, exist_ok=True)
            (out / "events.jsonl").write_text(trace_lines(backend))
            _write_row(out, row)
            if self.descriptors is not None:
                row["descriptors"] = _check_descriptors_of(name, self.descriptors, out)
                _write_row(out, row)
            (out / "junit.xml").write_text(junit_xml(row))
            seal(out)

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
        tr.write_line(f"bundles written to {self.report_dir}/<backend>/ (row.json, events.jsonl, junit.xml, manifest.json)")


# -- verifying ------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.message}"


def verify(bundle: Path) -> list[Check]:
    checks = [_check_manifest(bundle)]
    try:
        row = json.loads((bundle / "row.json").read_text())
    except (OSError, ValueError) as exc:
        return checks + [Check("row", False, f"row.json unreadable: {exc}")]
    checks.append(_check_schema(row))
    if not checks[-1].ok:
        return checks
    for name, check in [
        ("suite", lambda: _check_suite(row)),
        ("certified", lambda: _check_certified(row)),
        ("complete", lambda: _check_complete(row)),
        ("junit", lambda: _check_junit(bundle, row)),
        ("events", lambda: _check_events(bundle, row)),
        ("labels", lambda: _check_labels(row)),
        ("descriptors", lambda: _check_descriptors(bundle, row)),
    ]:
        try:
            checks.append(check())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            checks.append(Check(name, False, f"malformed bundle: {exc.__class__.__name__}: {exc}"))
    return checks


def _check_manifest(bundle: Path) -> Check:
    try:
        listed = json.loads((bundle / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return Check("manifest", False, f"{MANIFEST} missing or malformed: {exc}")
    present = {str(p.relative_to(bundle)): p for p in _bundle_files(bundle)}
    problems = [f"{name} is missing" for name in sorted(set(listed) - set(present))]
    problems += [f"{name} is not in the manifest" for name in sorted(set(present) - set(listed))]
    for name in sorted(set(listed) & set(present)):
        actual = hashlib.sha256(present[name].read_bytes()).hexdigest()
        if actual != listed[name]:
            problems.append(f"{name} has sha256 {actual[:12]}…, the manifest says {listed[name][:12]}…")
    if problems:
        return Check("manifest", False, "; ".join(problems))
    return Check("manifest", True, f"{len(listed)} files, every hash matches")


_REQUIRED = {
    "schema": str, "suite_version": str, "suite_hash": str, "certified": bool, "backend": str,
    "depth": str, "label": str, "obligations": dict, "substrates": dict, "lowerings": dict,
}


def _check_schema(row: dict) -> Check:
    wrong = [k for k, t in _REQUIRED.items() if not isinstance(row.get(k), t)]
    if row.get("schema") != "pytest-rkv/row/1":
        wrong.append(f"schema is {row.get('schema')!r}, expected 'pytest-rkv/row/1'")
    if wrong:
        return Check("schema", False, "row.json fields missing or mistyped: " + ", ".join(wrong))
    return Check("schema", True, "row.json is a pytest-rkv/row/1 document")


def _check_suite(row: dict) -> Check:
    released = released_manifest()
    if row["suite_version"] != SUITE_VERSION:
        return Check("suite", False, f"bundle made with suite {row['suite_version']}; this verifier is for {SUITE_VERSION}")
    if row["suite_hash"] != released["suite_hash"]:
        return Check("suite", False, f"suite hash {row['suite_hash'][:12]}… is not released suite {SUITE_VERSION} "
                                     f"({released['suite_hash'][:12]}…): the suite was modified")
    return Check("suite", True, f"released suite {SUITE_VERSION}, hash {released['suite_hash'][:12]}…")


def _check_certified(row: dict) -> Check:
    if not row["certified"]:
        return Check("certified", False, "the run was not made with --rkv-certify")
    return Check("certified", True, "made with --rkv-certify")


def _test_key(nodeid: str) -> str:
    """suites/test_x.py::test_y[backend] -> test_x.py::test_y"""
    path, _, name = nodeid.partition("::")
    return f"{Path(path).name}::{name.split('[', 1)[0]}"


def _all_tests(row: dict) -> list[dict]:
    return [t for section in ("obligations", "substrates", "lowerings")
            for entry in row[section].values() for t in entry["tests"]]


def _check_complete(row: dict) -> Check:
    problems = []
    for ob in OBLIGATIONS:
        entry = row["obligations"].get(ob.id)
        if entry is None:
            problems.append(f"obligation {ob.id} is missing")
        elif entry["outcome"] == "not_run" or (not entry["tests"] and entry["outcome"] != "not_applicable"):
            problems.append(f"obligation {ob.id} was not executed")
    expected = set(released_manifest()["tests"])
    ran = {_test_key(t["nodeid"]) for t in _all_tests(row)}
    problems += [f"test {name} is missing" for name in sorted(expected - ran)]
    problems += [f"test {name} is not in released suite {SUITE_VERSION}" for name in sorted(ran - expected)]
    if problems:
        return Check("complete", False, "; ".join(problems))
    return Check("complete", True, f"all {len(OBLIGATIONS)} obligations and {len(expected)} tests executed")


_JUNIT_OUTCOME = {"failure": "failed", "error": "error", "skipped": "skipped"}


def _check_junit(bundle: Path, row: dict) -> Check:
    try:
        root = ET.parse(bundle / "junit.xml").getroot()
    except (OSError, ET.ParseError) as exc:
        return Check("junit", False, f"junit.xml unreadable: {exc}")
    cases = {}
    for case in root.iter("testcase"):
        kinds = [_JUNIT_OUTCOME[c.tag] for c in case if c.tag in _JUNIT_OUTCOME]
        cases[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    expected = {}
    for t in _all_tests(row):
        o = t["outcome"]
        expected[t["nodeid"]] = "passed" if o == "passed" else "failed" if o == "failed" \
            else "error" if o in ("error", "not_run") else "skipped"
    problems = [f"{n} is in the row but not in junit.xml" for n in sorted(set(expected) - set(cases))]
    problems += [f"{n} is in junit.xml but not in the row" for n in sorted(set(cases) - set(expected))]
    problems += [f"{n}: junit says {cases[n]}, the row says {expected[n]}"
                 for n in sorted(set(cases) & set(expected)) if cases[n] != expected[n]]
    if problems:
        return Check("junit", False, "; ".join(problems))
    return Check("junit", True, f"{len(cases)} testcases agree with the row")


def _check_events(bundle: Path, row: dict) -> Check:
    by_test: dict[str, list[dict]] = {}
    try:
        for line in (bundle / "events.jsonl").read_text().splitlines():
            event = json.loads(line)
            by_test.setdefault(event.pop("test"), []).append(event)
    except (OSError, ValueError, KeyError) as exc:
        return Check("events", False, f"events.jsonl unreadable: {exc}")
    problems = []
    for t in _all_tests(row):
        events = by_test.pop(t["nodeid"], [])
        if len(events) != t.get("events", 0):
            problems.append(f"{t['nodeid']}: {len(events)} events in the trace, the row says {t.get('events', 0)}")
        elif events and events_digest(events) != t.get("events_sha256"):
            problems.append(f"{t['nodeid']}: the trace's events differ from the ones recorded (reordered or edited)")
    problems += [f"events for unknown test {name}" for name in sorted(by_test)]
    if problems:
        return Check("events", False, "; ".join(problems))
    return Check("events", True, "the trace matches the events recorded per test, in order")


def _check_descriptors(bundle: Path, row: dict) -> Check:
    """Each descriptor in the bundle, checked again against the bundle's own evidence."""
    from pytest_rkv.descriptor import load_evidence
    from pytest_rkv.label import check_file

    recorded = row.get("descriptors") or {}
    present = {p.name: p for p in sorted((bundle / "descriptors").glob("*"))} if (bundle / "descriptors").is_dir() else {}
    problems = [f"{n} is recorded in the row but missing" for n in sorted(set(recorded) - set(present))]
    problems += [f"{n} is in the bundle but not recorded in the row" for n in sorted(set(present) - set(recorded))]
    for name in sorted(set(recorded) & set(present)):
        evidence = load_evidence(bundle / "row.json")
        again = check_file(present[name], evidence).label.value
        if again != recorded[name]["label"]:
            problems.append(f"{name}: labelled {recorded[name]['label']!r}, the checker gives {again!r}")
    if problems:
        return Check("descriptors", False, "; ".join(problems))
    if not recorded:
        return Check("descriptors", True, "no descriptor in the bundle")
    summary = ", ".join(f"{n}: {v['label']}" for n, v in sorted(recorded.items()))
    return Check("descriptors", True, f"rechecked against this evidence: {summary}")


def _check_labels(row: dict) -> Check:
    fresh = relabel(row)
    problems = []
    for ob_id, entry in row["obligations"].items():
        again = fresh["obligations"].get(ob_id, {})
        if again.get("outcome") != entry.get("outcome"):
            problems.append(f"{ob_id}: outcome {entry.get('outcome')!r}, its tests give {again.get('outcome')!r}")
        if again.get("label") != entry.get("label"):
            problems.append(f"{ob_id}: labelled {entry.get('label')!r}, the evidence gives {again.get('label')!r}")
    if fresh["label"] != row["label"]:
        problems.append(f"row labelled {row['label']!r}, the evidence gives {fresh['label']!r}")
    if problems:
        return Check("labels", False, "; ".join(problems))
    return Check("labels", True, f"every label recomputed from the tests' outcomes; row is {row['label']}")
