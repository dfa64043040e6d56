"""`rkv verify` re-judges a bundle by replaying its transcript through the released suite.

Forgeries are built with the project's own writers (`build_row`, `write_row`, `junit_xml`,
`seal`), as a careful forger would: every hash and every count is consistent, only the
evidence lies. Each must be refused with a message naming what is wrong; the untouched
bundle verifies."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_rkv.checker import check_file
from pytest_rkv.descriptor import load_evidence
from pytest_rkv.evidence import (
    EVENTS,
    JUNIT,
    TRANSCRIPT,
    events_digest,
    junit_xml,
    read_row,
    read_trace,
    trace_text,
    write_row,
)
from pytest_rkv.report import build_row, records_of, seal
from pytest_rkv.verify import verify
from tests.conftest import SUITES


def _certified_run(report: Path, *extra: str) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(SUITES), "--rkv-backend=reference", "--rkv-certify",
         "--rkv-report-dir", str(report), "-p", "no:cacheprovider", "-q", *extra],
        capture_output=True, text=True, timeout=600)
    assert (report / "reference" / "row.json").exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
    return report / "reference"


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    return _certified_run(tmp_path_factory.mktemp("genuine"))


@pytest.fixture(scope="module")
def evicting(tmp_path_factory):
    """The reference runtime silently evicting hard claims: some tests fail, honestly."""
    return _certified_run(tmp_path_factory.mktemp("evicting"), "--rkv-reference-fault=silent_evict_hard")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(bundle, dest)
    return dest


def _reseal(bundle: Path, row: dict) -> None:
    """Relabel the row from its (edited) tests, rewrite junit and descriptor labels, reseal."""
    model = read_row_from(row)
    relabelled = build_row(records_of(model), {k: row[k] for k in ("certified", "suite_hash", "environment",
                                                                     "command_line")})
    for entry_path in ("obligations", "substrates", "lowerings"):  # keep event and call counts
        for id_, entry in relabelled[entry_path].items():
            for test, old in zip(entry["tests"], row[entry_path][id_]["tests"]):
                test.update({k: old[k] for k in ("events", "events_sha256", "calls") if k in old})
    write_row(bundle, relabelled)
    relabelled["descriptors"] = {
        p.name: {"label": (c := check_file(p, load_evidence(bundle / "row.json"))).label.value, "reason": c.reason}
        for p in sorted((bundle / "descriptors").iterdir())}
    model = write_row(bundle, relabelled)
    (bundle / JUNIT).write_text(junit_xml(model))
    seal(bundle)


def read_row_from(row: dict):
    from pytest_rkv.evidence import Row, parse

    return parse(Row, row, "row.json")


def _failed(bundle: Path) -> dict[str, str]:
    return {c.name: c.message for c in verify(bundle) if not c.ok}


def test_the_genuine_bundle_verifies_by_replay(genuine):
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "verify", str(genuine)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    names = [line.split(":")[0] for line in proc.stdout.splitlines()[:-1]]
    assert names == ["PASS files", "PASS row", "PASS backend", "PASS suite", "PASS certified", "PASS complete",
                     "PASS junit", "PASS events", "PASS transcript", "PASS replay", "PASS descriptors"]
    assert proc.stdout.splitlines()[-1].endswith("verified (11/11 checks passed)")


def test_an_honest_failing_bundle_verifies_too(evicting):
    row = read_row(evicting)
    assert row.label.value != "native conformance"
    assert _failed(evicting) == {}


def test_flipped_outcomes_resealed_are_refused_by_replay(evicting, tmp_path):
    """The forgery of the issue: every failed test flipped to passed, labels recomputed to
    native, <failure> elements dropped, descriptors rechecked, manifest resealed."""
    bundle = _copy(evicting, tmp_path)
    row = json.loads((bundle / "row.json").read_text())
    flipped = []
    for section in ("obligations", "substrates", "lowerings"):
        for entry in row[section].values():
            for test in entry["tests"]:
                if test["outcome"] in ("failed", "untestable", "error"):  # whatever kept it below native
                    test["outcome"], test["detail"] = "passed", ""
                    flipped.append(test["nodeid"])
    assert flipped
    _reseal(bundle, row)
    assert read_row(bundle).label.value == "native conformance"  # the forgery is consistent
    failed = _failed(bundle)
    assert list(failed) == ["replay"], failed
    first = sorted(flipped)[0]
    assert f"{first}: the bundle says passed, the replay gives failed: AssertionError" in failed["replay"]


def test_an_edited_label_is_refused(genuine, tmp_path):
    bundle = _copy(genuine, tmp_path)
    row = json.loads((bundle / "row.json").read_text())
    row["obligations"]["active-refusal"]["label"] = "adapter-scoped evidence"
    write_row(bundle, row)
    seal(bundle)
    assert "active-refusal: the bundle says passed/adapter-scoped evidence, the replay gives " \
           "passed/native conformance" in _failed(bundle)["replay"]


def _rewrite_trace(bundle: Path, edit) -> str:
    """Edit one test's events in events.jsonl and its fingerprint in the row; reseal."""
    trace = read_trace(bundle / EVENTS)
    row = json.loads((bundle / "row.json").read_text())
    nodeid = edit(trace)
    (bundle / EVENTS).write_text(trace_text(trace))
    for section in ("obligations", "substrates", "lowerings"):
        for entry in row[section].values():
            for test in entry["tests"]:
                if test["nodeid"] == nodeid:
                    test["events"] = len(trace[nodeid])
                    test["events_sha256"] = events_digest(trace[nodeid]) if trace[nodeid] else None
    _reseal(bundle, row)
    return nodeid


def test_a_reordered_lifecycle_trace_is_refused(genuine, tmp_path):
    bundle = _copy(genuine, tmp_path)

    def swap(trace):
        nodeid = next(n for n in trace if "ordered" in n or "lifecycle" in n)
        trace[nodeid][0], trace[nodeid][1] = trace[nodeid][1], trace[nodeid][0]
        return nodeid

    nodeid = _rewrite_trace(bundle, swap)
    failed = _failed(bundle)
    assert "events" not in failed  # consistent with the row...
    assert f"{nodeid}: the row's events fingerprint is not the one the transcript gives" in failed["replay"]


def test_a_deleted_refusal_event_is_refused(genuine, tmp_path):
    bundle = _copy(genuine, tmp_path)

    def drop(trace):
        for nodeid, events in trace.items():
            for i, e in enumerate(events):
                if e["type"] == "request.refused":
                    del events[i]
                    return nodeid
        raise AssertionError("no request.refused event")

    nodeid = _rewrite_trace(bundle, drop)
    assert f"{nodeid}: the row's events fingerprint" in _failed(bundle)["replay"]


def test_certified_without_certify_in_the_command_line_is_refused(tmp_path):
    report = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "pytest", str(SUITES), "--rkv-backend=reference", "--rkv-report-dir",
                    str(report), "-p", "no:cacheprovider", "-q"], capture_output=True, text=True, timeout=600)
    bundle = report / "reference"
    row = json.loads((bundle / "row.json").read_text())
    assert row["certified"] is False and "--rkv-certify" not in row["command_line"]
    assert list(_failed(bundle)) == ["certified"]
    row["certified"] = True
    write_row(bundle, row)
    seal(bundle)
    failed = _failed(bundle)
    assert list(failed) == ["certified"]
    assert "its recorded command line has no --rkv-certify" in failed["certified"]


def _edit_transcript(bundle: Path, edit) -> None:
    lines = [json.loads(line) for line in (bundle / TRANSCRIPT).read_text().splitlines()]
    lines = edit(lines)
    (bundle / TRANSCRIPT).write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    seal(bundle)


def test_an_edited_transcript_reply_is_refused(genuine, tmp_path):
    """The refusal of the canonical probe's active request turned into an admission: the
    released test then fails on the replay, and the row says it passed."""
    bundle = _copy(genuine, tmp_path)
    edited = []

    def admit(lines):
        probe = [line for line in lines if "canonical_probe_refuses" in line["test"] and line["method"] == "complete"]
        refused = next(line for line in probe if line["returned"]["$reply"]["status"] == 409)
        served = next(line for line in probe if line["returned"]["$reply"]["status"] == 200)
        refused["returned"] = served["returned"]  # the 70-block request admitted instead
        edited.append(refused["test"])
        return lines

    _edit_transcript(bundle, admit)
    assert edited, "no refused completion in the transcript"
    failed = _failed(bundle)
    assert list(failed) == ["replay"], failed
    assert f"{edited[0]}: the bundle says passed, the replay gives failed" in failed["replay"]


def test_a_dropped_test_transcript_is_refused(genuine, tmp_path):
    bundle = _copy(genuine, tmp_path)
    row = read_row(bundle)
    victim = next(t for t in row.tests() if t.outcome.value == "passed").nodeid

    _edit_transcript(bundle, lambda lines: [line for line in lines if line["test"] != victim])
    failed = _failed(bundle)
    assert list(failed) == ["transcript"]
    assert f"{victim}: 0 calls in the transcript, the row says" in failed["transcript"]
    # A careful forger also sets the row's count to 0: then the replay refuses it.
    row = json.loads((bundle / "row.json").read_text())
    for section in ("obligations", "substrates", "lowerings"):
        for entry in row[section].values():
            for test in entry["tests"]:
                if test["nodeid"] == victim:
                    test["calls"] = 0
    write_row(bundle, row)
    seal(bundle)
    failed = _failed(bundle)
    assert list(failed) == ["replay"], failed
    assert f"{victim}: the bundle says passed, the replay gives error" in failed["replay"]
    assert "its transcript has no further call" in failed["replay"]


def test_an_edited_descriptor_label_is_refused(genuine, tmp_path):
    bundle = _copy(genuine, tmp_path)
    row = json.loads((bundle / "row.json").read_text())
    row["descriptors"]["reference.toml"]["label"] = "adapter-scoped evidence"
    write_row(bundle, row)
    seal(bundle)
    failed = _failed(bundle)
    assert list(failed) == ["descriptors"]
    assert "reference.toml: labelled 'adapter-scoped evidence', the checker gives 'native conformance'" in failed["descriptors"]


def test_the_replay_backend_cannot_certify(run_suites, tmp_path):
    run = run_suites("--rkv-certify", "--rkv-backend=replay", f"--rkv-replay={tmp_path}")
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(["*--rkv-certify refuses the replay backend*"])


def test_a_dropped_test_is_refused(genuine, tmp_path):
    bundle = _copy(genuine, tmp_path)
    row = json.loads((bundle / "row.json").read_text())
    dropped = row["obligations"]["release"]["tests"].pop()
    row["obligations"]["release"]["outcome"] = "not_run"
    write_row(bundle, row)
    junit = (bundle / "junit.xml").read_text().splitlines()
    (bundle / "junit.xml").write_text("\n".join(l for l in junit if dropped["nodeid"].split("::")[1] not in l))
    seal(bundle)
    failed = _failed(bundle)
    assert "obligation release was not executed" in failed["complete"]
    assert "test test_claims.py::test_released_soft_claim_is_never_harmed is missing" in failed["complete"]


def test_a_changed_file_or_hash_or_an_extra_file_is_refused(genuine, tmp_path):
    bundle = _copy(genuine, tmp_path)
    with open(bundle / "junit.xml", "a") as f:
        f.write("<!-- edited -->\n")
    assert "junit.xml has sha256" in _failed(bundle)["files"]
    seal(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["row.json"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "row.json has sha256" in _failed(bundle)["files"]
    seal(bundle)
    (bundle / "extra.txt").write_text("slipped in")
    assert "extra.txt is not in the manifest" in _failed(bundle)["files"]


def test_a_modified_suite_hash_is_refused(genuine, tmp_path):
    bundle = _copy(genuine, tmp_path)
    row = json.loads((bundle / "row.json").read_text())
    row["suite_hash"] = "f" * 64
    write_row(bundle, row)
    seal(bundle)
    assert "the suite was modified" in _failed(bundle)["suite"]


def test_a_depth_that_is_not_the_backend_s_is_refused(genuine, tmp_path):
    bundle = _copy(genuine, tmp_path)
    row = json.loads((bundle / "row.json").read_text())
    row["depth"] = "adapter"
    write_row(bundle, row)
    seal(bundle)
    assert "backend reference is depth native" in _failed(bundle)["backend"]
