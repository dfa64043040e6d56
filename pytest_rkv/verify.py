"""`rkv verify`: re-judge an evidence bundle, independently of the run that made it.

Consistency is not enough (a forger can reseal anything), so the verifier re-runs the
released suite against the bundle's own transcript (`--rkv-backend=replay`, in a
subprocess, into a temporary report dir) and recomputes every outcome, obligation label and
the row label from that replay. A bundle whose `row.json` or `junit.xml` disagrees with the
replay is refused, naming the test and the first assertion that decides it. To forge a row
now, one would have to fabricate, call by call, the answers of a runtime on which the
released tests pass.

Before replaying, the bundle itself must be sound: only regular files (no links, FIFOs,
devices), each below a size bound and listed in the manifest with its hash; a valid row;
the released suite; `certified` only with `--rkv-certify` in the recorded command line.
Every check yields one line; any failure makes the bundle unverifiable. Malformed input is
a failed check, never a traceback or a hang.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pytest_rkv.certify import released_manifest, released_suite_dir
from pytest_rkv.contract import OBLIGATIONS, SUITE_VERSION
from pytest_rkv.evidence import (
    DESCRIPTORS,
    EVENTS,
    JUNIT,
    MANIFEST,
    TRANSCRIPT,
    EvidenceError,
    Row,
    events_digest,
    junit_kind,
    list_files,
    read_bytes,
    read_junit,
    read_manifest,
    read_row,
    read_trace,
    read_transcript,
    sha256,
    test_key,
)

REPLAY_TIMEOUT_S = 600  # the replay never touches a runtime; this only bounds a wedged interpreter


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {' '.join(self.message.split())}"


def verify(bundle: Path, replay: bool = True) -> list[Check]:
    """Every check of a bundle, in order; stops at the first one later checks rely on."""
    bundle = Path(bundle)
    checks = [_check_files(bundle)]
    if not checks[-1].ok:
        return checks
    try:
        row = read_row(bundle)
    except EvidenceError as exc:
        return checks + [Check("row", False, str(exc))]
    checks.append(Check("row", True, f"row.json is a {row.schema_} document for backend {row.backend}"))
    for name, check in [
        ("backend", lambda: _check_backend(row)),
        ("suite", lambda: _check_suite(row)),
        ("certified", lambda: _check_certified(row)),
        ("complete", lambda: _check_complete(row)),
        ("junit", lambda: _check_junit(bundle, row)),
        ("events", lambda: _check_events(bundle, row)),
        ("transcript", lambda: _check_transcript(bundle, row)),
        ("replay", lambda: _check_replay(bundle, row) if replay else Check("replay", False, "not replayed (--no-replay)")),
        ("descriptors", lambda: _check_descriptors(bundle, row)),
    ]:
        if name == "replay" and not all(c.ok for c in checks):
            continue  # already refused: no need to spend a replay on it
        try:
            checks.append(check())
        except EvidenceError as exc:
            checks.append(Check(name, False, str(exc)))
    return checks


# -- the files ---------------------------------------------------------------------------


def _check_files(bundle: Path) -> Check:
    if bundle.is_symlink() or not bundle.is_dir():
        return Check("files", False, f"{bundle} is not a bundle directory")
    present, problems = list_files(bundle)
    if problems:
        return Check("files", False, "; ".join(problems[:5]))
    try:
        listed = read_manifest(bundle).files
    except EvidenceError as exc:
        return Check("files", False, str(exc))
    present.pop(MANIFEST, None)
    problems = [f"{name} is listed in the manifest but missing" for name in sorted(set(listed) - set(present))]
    problems += [f"{name} is not in the manifest" for name in sorted(set(present) - set(listed))]
    for name in sorted(set(listed) & set(present)):
        try:
            actual = sha256(read_bytes(present[name]))
        except EvidenceError as exc:
            problems.append(str(exc))
            continue
        if actual != listed[name]:
            problems.append(f"{name} has sha256 {actual[:12]}…, the manifest says {str(listed[name])[:12]}…")
    if problems:
        return Check("files", False, "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return Check("files", True, f"{len(listed)} regular files, every one listed and its hash matching")


# -- the row on its own ----------------------------------------------------------------------


def _check_backend(row: Row) -> Check:
    from pytest_rkv.drivers.recording import recorded_class

    if row.backend == "replay":
        return Check("backend", False, "the replay backend is a verifier's tool, not a runtime row")
    cls = recorded_class(row.backend)
    if cls is not None:
        if (row.depth, row.routed) != (cls.depth, cls.routed):
            return Check("backend", False, f"row says depth {row.depth}, routed {row.routed}; backend "
                                           f"{row.backend} is depth {cls.depth}, routed {cls.routed}")
    return Check("backend", True, f"{row.backend}, depth {row.depth}")


def _check_suite(row: Row) -> Check:
    released = released_manifest()
    if row.suite_version != SUITE_VERSION:
        return Check("suite", False, f"bundle made with suite {row.suite_version}; this verifier is for {SUITE_VERSION}")
    if row.suite_hash != released["suite_hash"]:
        return Check("suite", False, f"suite hash {row.suite_hash[:12]}… is not released suite {SUITE_VERSION} "
                                     f"({released['suite_hash'][:12]}…): the suite was modified")
    return Check("suite", True, f"released suite {SUITE_VERSION}, hash {released['suite_hash'][:12]}…")


def _check_certified(row: Row) -> Check:
    if not row.certified:
        return Check("certified", False, "the run was not made with --rkv-certify")
    if "--rkv-certify" not in row.command_line:
        return Check("certified", False, "the row says certified, but its recorded command line has no --rkv-certify")
    return Check("certified", True, "made with --rkv-certify")


def _check_complete(row: Row) -> Check:
    problems = []
    for ob in OBLIGATIONS:
        entry = row.obligations.get(ob.id)
        if entry is None:
            problems.append(f"obligation {ob.id} is missing")
        elif entry.outcome.value == "not_run" or (not entry.tests and entry.outcome.value != "not_applicable"):
            problems.append(f"obligation {ob.id} was not executed")
    expected = set(released_manifest()["tests"])
    ran = [test_key(t.nodeid) for t in row.tests()]
    problems += [f"test {name} appears twice" for name in sorted({k for k in ran if ran.count(k) > 1})]
    problems += [f"test {name} is missing" for name in sorted(expected - set(ran))]
    problems += [f"test {name} is not in released suite {SUITE_VERSION}" for name in sorted(set(ran) - expected)]
    if problems:
        return Check("complete", False, "; ".join(problems))
    return Check("complete", True, f"all {len(OBLIGATIONS)} obligations and {len(expected)} tests executed")


def _check_junit(bundle: Path, row: Row) -> Check:
    cases = read_junit(bundle / JUNIT)
    expected = {t.nodeid: junit_kind(t.outcome) for t in row.tests()}
    problems = [f"{n} is in the row but not in junit.xml" for n in sorted(set(expected) - set(cases))]
    problems += [f"{n} is in junit.xml but not in the row" for n in sorted(set(cases) - set(expected))]
    problems += [f"{n}: junit says {cases[n]}, the row says {expected[n]}"
                 for n in sorted(set(cases) & set(expected)) if cases[n] != expected[n]]
    if problems:
        return Check("junit", False, "; ".join(problems))
    return Check("junit", True, f"{len(cases)} testcases agree with the row")


def _check_events(bundle: Path, row: Row) -> Check:
    by_test = read_trace(bundle / EVENTS)
    problems = []
    for t in row.tests():
        events = by_test.pop(t.nodeid, [])
        if len(events) != t.events:
            problems.append(f"{t.nodeid}: {len(events)} events in the trace, the row says {t.events}")
        elif events and events_digest(events) != t.events_sha256:
            problems.append(f"{t.nodeid}: the trace's events differ from the ones recorded (reordered or edited)")
    problems += [f"events for unknown test {name}" for name in sorted(by_test)]
    if problems:
        return Check("events", False, "; ".join(problems))
    return Check("events", True, "the trace matches the events recorded per test, in order")


def _check_transcript(bundle: Path, row: Row) -> Check:
    by_test = read_transcript(bundle / TRANSCRIPT)
    problems = []
    for t in row.tests():
        calls = by_test.pop(t.nodeid, [])
        if len(calls) != t.calls:
            problems.append(f"{t.nodeid}: {len(calls)} calls in the transcript, the row says {t.calls}")
    problems += [f"calls for unknown test {name}" for name in sorted(by_test)]
    if problems:
        return Check("transcript", False, "; ".join(problems))
    return Check("transcript", True, f"{sum(t.calls for t in row.tests())} Driver calls, per test as the row counts them")


# -- replay ----------------------------------------------------------------------------------


def replay_row(bundle: Path) -> tuple[Row | None, str]:
    """Run the released suite against the bundle's transcript; (the replayed row, log tail)."""
    suite = released_suite_dir()
    if suite is None:
        return None, f"the released suite {SUITE_VERSION} is not installed here, unmodified"
    with tempfile.TemporaryDirectory(prefix="rkv-verify-") as tmp:
        cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               "--rkv-backend=replay", f"--rkv-replay={Path(bundle).resolve()}", f"--rkv-report-dir={tmp}",
               f"--rkv-descriptors={tmp}", "--rootdir", str(suite.parent)]
        try:
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=REPLAY_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return None, f"the replay did not finish in {REPLAY_TIMEOUT_S} s"
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        try:
            return read_row(Path(tmp) / "replay"), tail
        except EvidenceError as exc:
            return None, f"{exc}; {tail}"


def _check_replay(bundle: Path, row: Row) -> Check:
    replayed, tail = replay_row(bundle)
    if replayed is None:
        return Check("replay", False, f"the released suite could not replay this bundle: {tail[:400]}")
    again = {test_key(t.nodeid): t for t in replayed.tests()}
    problems = []
    for t in sorted(row.tests(), key=lambda t: t.nodeid):
        r = again.get(test_key(t.nodeid))
        if r is None:
            problems.append(f"{t.nodeid}: the released suite has no such test")
        elif r.outcome != t.outcome:
            why = f": {r.detail.splitlines()[0][:300]}" if r.detail else ""
            problems.append(f"{t.nodeid}: the bundle says {t.outcome.value}, the replay gives {r.outcome.value}{why}")
        elif r.events_sha256 != t.events_sha256 or r.events != t.events:
            problems.append(f"{t.nodeid}: the row's events fingerprint is not the one the transcript gives")
    if not problems:  # outcomes agree; the labels follow from them unless edited
        for ob_id, entry in row.obligations.items():
            r = replayed.obligations.get(ob_id)
            if r is None or (r.outcome, r.label) != (entry.outcome, entry.label):
                problems.append(f"{ob_id}: the bundle says {entry.outcome.value}/{_v(entry.label)}, the replay gives "
                                f"{_v(r.outcome) if r else 'nothing'}/{_v(r.label) if r else ''}")
        if replayed.label != row.label:
            problems.append(f"row labelled {row.label.value!r}, the replay gives {replayed.label.value!r}")
    if problems:
        return Check("replay", False, "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    return Check("replay", True, f"the released suite, replayed on the transcript, gives every outcome and label; "
                                 f"row is {row.label.value}")


def _v(value) -> str:
    return value.value if value is not None else "n/a"


# -- descriptors -----------------------------------------------------------------------------


def _check_descriptors(bundle: Path, row: Row) -> Check:
    """Each descriptor in the bundle, checked again against the bundle's own evidence."""
    from pytest_rkv.checker import check_data
    from pytest_rkv.descriptor import load_evidence

    recorded = row.descriptors
    files, _ = list_files(bundle)
    present = {Path(rel).name: path for rel, path in files.items() if Path(rel).parent == Path(DESCRIPTORS)}
    problems = [f"{n} is recorded in the row but missing" for n in sorted(set(recorded) - set(present))]
    problems += [f"{n} is in the bundle but not recorded in the row" for n in sorted(set(present) - set(recorded))]
    evidence = load_evidence(bundle / "row.json")
    for name in sorted(set(recorded) & set(present)):
        again = check_data(_descriptor_data(present[name]), evidence, source=name).label.value
        if again != recorded[name].label:
            problems.append(f"{name}: labelled {recorded[name].label!r}, the checker gives {again!r}")
    if problems:
        return Check("descriptors", False, "; ".join(problems))
    if not recorded:
        return Check("descriptors", True, "no descriptor in the bundle")
    summary = ", ".join(f"{n}: {v.label}" for n, v in sorted(recorded.items()))
    return Check("descriptors", True, f"rechecked against this evidence: {summary}")


def _descriptor_data(path: Path) -> object:
    import json
    import tomllib

    from pytest_rkv.evidence import loads, read_text

    text = read_text(path)
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else loads(text, path.name)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EvidenceError(f"{path.name} is not a readable descriptor ({exc})") from None
