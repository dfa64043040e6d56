"""Every evidence format, in one place: what a bundle holds and how it is read and written.

    <report-dir>/<backend id>/
        .rkv-bundle       marker: the suite created this folder (only such a folder is ever emptied)
        row.json          `Row`: outcomes, labels, reasons, per-test records, run facts
        events.jsonl      `TraceLine` per event: every captured event, tagged with its test
        transcript.jsonl  `Call` per Driver call: per test, in order, method, arguments, answer
        junit.xml         one testcase per test, outcome as JUnit understands it
        *.log, ...        server logs and generated inputs the backend left in its workdir
        descriptors/      the lowering descriptors of this backend, checked against this run
        manifest.json     `Manifest`: sha256 of every other file

The backend id is the `--rkv-backend` spelling (`vllm+rkv`), used verbatim for the folder,
the descriptor's `backend` field and the matrix row.

Reading is hostile-input safe: `read_bytes` opens without following links or blocking,
refuses non-regular files and anything above `MAX_FILE_BYTES`; `loads` refuses JSON nested
deeper than `MAX_JSON_DEPTH`. Every problem is an `EvidenceError` with a one-line message.

Nothing here imports the rest of pytest_rkv except the contract; labels, the checker, the
verifier, the matrix and the plugin import from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pytest_rkv.contract import Depth, Label, TestOutcome

ROW_SCHEMA = "pytest-rkv/row/2"
MANIFEST_SCHEMA = "pytest-rkv/manifest/1"
MARKER_SCHEMA = "pytest-rkv/bundle/1"

ROW = "row.json"
EVENTS = "events.jsonl"
TRANSCRIPT = "transcript.jsonl"
JUNIT = "junit.xml"
MANIFEST = "manifest.json"
MARKER = ".rkv-bundle"
DESCRIPTORS = "descriptors"

MAX_FILE_BYTES = 64 * 1024 * 1024  # a vLLM bundle's transcript is ~2 MB
MAX_BUNDLE_FILES = 2000
MAX_BUNDLE_DEPTH = 8  # folders inside a bundle
MAX_JSON_DEPTH = 64

BACKEND_ID = re.compile(r"^[a-z0-9][a-z0-9+._-]{0,63}$")


class EvidenceError(ValueError):
    """Evidence that cannot be used. `str()` is one line saying which file and why."""


def check_backend_id(name: str) -> str:
    """The canonical backend id, or EvidenceError: it names a folder, so no path tricks."""
    if not isinstance(name, str) or not BACKEND_ID.match(name) or ".." in name:
        raise EvidenceError(f"backend id {str(name)[:70]!r} is not a lowercase name "
                            "(letters, digits, '+', '.', '_', '-')")
    return name


def bundle_dir(report_dir: Path, backend: str) -> Path:
    """Where a backend's logs go during the run and its bundle after it: the id, verbatim."""
    return Path(report_dir) / check_backend_id(backend)


def test_key(nodeid: str) -> str:
    """suites/test_x.py::test_y[backend] -> test_x.py::test_y: how a test is named across
    runs, rootdirs and backends (the suite parametrizes its tests by backend only)."""
    path, _, name = nodeid.partition("::")
    return f"{path.rsplit('/', 1)[-1]}::{name.split('[', 1)[0]}"


# -- bounded, link-free reading -------------------------------------------------------------


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes; never follows a final symlink, never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise EvidenceError(f"{Path(path).name} is missing") from None
    except OSError as exc:
        raise EvidenceError(f"{Path(path).name} cannot be opened ({exc.strerror or exc}; symlinks are refused)") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise EvidenceError(f"{Path(path).name} is not a regular file")
        if info.st_size > limit:
            raise EvidenceError(f"{Path(path).name} is {info.st_size} bytes, above the bound of {limit}")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise EvidenceError(f"{Path(path).name} grew above the bound of {limit} bytes while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    try:
        return read_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvidenceError(f"{Path(path).name} is not UTF-8 text (byte {exc.start})") from None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def loads(text: str, what: str) -> Any:
    """json.loads with a nesting bound (deep nesting is a refusal, not a RecursionError)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            raise EvidenceError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EvidenceError(f"{what} is not valid JSON ({str(exc)[:120]})") from None


def read_json(path: Path, what: str | None = None) -> Any:
    return loads(read_text(path), what or Path(path).name)


def read_jsonl(path: Path) -> list[Any]:
    text = read_text(path)
    return [loads(line, f"{Path(path).name} line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _one_line(exc: ValidationError, what: str) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "top level"
    more = len(exc.errors()) - 1
    return f"{what}: {where}: {err.get('msg', 'invalid')}" + (f" (and {more} more)" if more else "")


def parse(model: type[BaseModel], data: Any, what: str) -> Any:
    """Validate `data` as `model`, or EvidenceError with the first problem on one line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise EvidenceError(_one_line(exc, what)) from None


# -- the row --------------------------------------------------------------------------------


class _Doc(BaseModel):
    # Evidence is read by sceptics: an unknown field is an error, not silently kept.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TestEntry(_Doc):
    """One test's record in the row."""

    __test__ = False
    nodeid: str
    outcome: TestOutcome
    detail: str = ""
    evidence: dict[str, Any] = Field(default_factory=dict)
    events: int = 0  # how many events the test left in events.jsonl
    events_sha256: str | None = None  # `events_digest` of them, in served order
    calls: int = 0  # how many Driver calls the test made (transcript.jsonl)


class ObligationEntry(_Doc):
    outcome: TestOutcome
    label: Label | None
    reason: str
    tests: list[TestEntry]


class SectionEntry(_Doc):
    outcome: TestOutcome
    tests: list[TestEntry]


class DescriptorResult(_Doc):
    label: str
    reason: str


class Row(_Doc):
    """What one backend earned in one run (`row.json`)."""

    schema_: Literal["pytest-rkv/row/2"] = Field(ROW_SCHEMA, alias="schema")
    suite_version: str
    api_version: str
    backend: str = Field(pattern=BACKEND_ID.pattern)
    depth: Depth
    routed: bool
    runtime: str
    runtime_version: str | None
    runtime_details: dict[str, Any]
    label: Label
    reason: str
    obligations: dict[str, ObligationEntry]
    substrates: dict[str, SectionEntry]
    lowerings: dict[str, SectionEntry]
    certified: bool = False
    suite_hash: str = "unidentified"
    environment: dict[str, Any] = Field(default_factory=dict)
    command_line: list[str] = Field(default_factory=list)
    descriptors: dict[str, DescriptorResult] = Field(default_factory=dict)
    # Filled by the packaging work (suite, runtime distribution, platform, stand-ins): data
    # the manifest covers; the verifier does not re-judge it.
    provenance: dict[str, Any] | None = None

    def tests(self) -> list[TestEntry]:
        return [t for section in (self.obligations, self.substrates, self.lowerings)
                for entry in section.values() for t in entry.tests]


def row_document(row: Row) -> dict:
    return row.model_dump(mode="json", by_alias=True)


def write_row(bundle: Path, row: Row | dict) -> Row:
    """Validate and write row.json (a dict is validated first, so the writer obeys the model)."""
    model = row if isinstance(row, Row) else parse(Row, row, ROW)
    (Path(bundle) / ROW).write_text(dumps(row_document(model)))
    return model


def read_row(path: Path) -> Row:
    """row.json of a bundle (or the file itself), validated."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        path = path / ROW
    data = read_json(path, ROW)
    if not isinstance(data, dict):
        raise EvidenceError(f"{ROW} is a JSON {type(data).__name__}, expected an object")
    if data.get("schema") != ROW_SCHEMA:
        raise EvidenceError(f"{ROW} has schema {str(data.get('schema'))[:40]!r}, expected {ROW_SCHEMA!r}")
    return parse(Row, data, ROW)


# -- the event trace ------------------------------------------------------------------------


def events_digest(events: list[dict]) -> str:
    """Fingerprint of one test's events in their served order. Timestamps are left out:
    they differ from run to run (real clocks) while the order, carried by seq, does not."""
    stable = [{k: v for k, v in e.items() if k not in ("ts", "test")} for e in events]
    return hashlib.sha256("\n".join(json.dumps(e, sort_keys=True) for e in stable).encode()).hexdigest()


def trace_text(events_by_test: dict[str, list[dict]]) -> str:
    """events.jsonl: test by test (nodeid order), each event tagged with its test; within a
    test the runtime's own order is kept."""
    lines = [json.dumps({**e, "test": nodeid}, sort_keys=True)
             for nodeid in sorted(events_by_test) for e in events_by_test[nodeid]]
    return "\n".join(lines) + ("\n" if lines else "")


def read_trace(path: Path) -> dict[str, list[dict]]:
    """events.jsonl as {test nodeid: [event, ...]} (the `test` key removed)."""
    by_test: dict[str, list[dict]] = {}
    for n, line in enumerate(read_jsonl(path), 1):
        if not isinstance(line, dict) or not isinstance(line.get("test"), str):
            raise EvidenceError(f"{EVENTS} line {n} is not an event tagged with its test")
        event = dict(line)
        by_test.setdefault(event.pop("test"), []).append(event)
    return by_test


# -- the transcript -------------------------------------------------------------------------
#
# Values are JSON with tagged objects, so replay can rebuild what the driver returned:
#   {"$model": "pytest_rkv.contract:Claim", "data": {...}}     a pydantic model
#   {"$reply": {"status": 200, "value": V, "error": V}}          a drivers.base.Reply
#   {"$enum": "pytest_rkv.contract:ClaimState", "value": "..."}  an enum member
#   {"$dataclass": "pytest_rkv.drivers.base:Routed", "data": {...}} a dataclass (fields encoded)
#   {"$dict": {...}}                                             a plain dict
#   [V, ...]                                                     a list or tuple
# `drivers/recording.py` turns live objects into these values and back.


class Raised(_Doc):
    """An exception a driver call raised: its class, its args and its attributes."""

    type: str  # "module:QualName"
    args: list[Any] = Field(default_factory=list)
    attrs: dict[str, Any] = Field(default_factory=dict)
    text: str = ""


class Call(_Doc):
    """One Driver call a test made (directly, or through its fixtures and the plugin)."""

    test: str  # nodeid of the test, as in row.json
    i: int = Field(ge=0)  # position in the test's transcript
    method: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")  # view.method for a driver view
    args: dict[str, Any]  # bound arguments, defaults applied, encoded
    returned: Any = None
    raised: Raised | None = None

    def same_request(self, other: Call) -> bool:
        return self.method == other.method and self.args == other.args


def transcript_text(calls_by_test: dict[str, list[dict]]) -> str:
    lines = [json.dumps(parse(Call, c, TRANSCRIPT).model_dump(mode="json", exclude_none=True), sort_keys=True)
             for nodeid in sorted(calls_by_test) for c in calls_by_test[nodeid]]
    return "\n".join(lines) + ("\n" if lines else "")


def read_transcript(path: Path) -> dict[str, list[Call]]:
    """transcript.jsonl as {test nodeid: [Call, ...]}, each test's calls numbered 0, 1, ..."""
    by_test: dict[str, list[Call]] = {}
    for n, data in enumerate(read_jsonl(path), 1):
        call = parse(Call, data, f"{TRANSCRIPT} line {n}")
        calls = by_test.setdefault(call.test, [])
        if call.i != len(calls):
            raise EvidenceError(f"{TRANSCRIPT} line {n}: call {call.i} of {call.test} is out of order "
                                f"(expected call {len(calls)})")
        calls.append(call)
    return by_test


# -- JUnit ----------------------------------------------------------------------------------


def junit_xml(row: Row) -> str:
    tests = row.tests()
    suite = ET.Element("testsuite", name=f"pytest-rkv:{row.backend}", tests=str(len(tests)))
    props = ET.SubElement(suite, "properties")
    for key, value in (("backend", row.backend), ("suite_version", row.suite_version),
                       ("suite_hash", row.suite_hash), ("label", row.label.value)):
        ET.SubElement(props, "property", name=key, value=str(value))
    counts = {"failures": 0, "errors": 0, "skipped": 0}
    for t in sorted(tests, key=lambda t: t.nodeid):
        path, _, name = t.nodeid.partition("::")
        case = ET.SubElement(suite, "testcase", classname=path, name=name)
        kind = junit_kind(t.outcome)
        if kind == "failed":
            ET.SubElement(case, "failure", message=t.detail[:500]).text = t.detail
            counts["failures"] += 1
        elif kind == "error":
            ET.SubElement(case, "error", message=t.detail[:500]).text = t.detail
            counts["errors"] += 1
        elif kind == "skipped":
            ET.SubElement(case, "skipped", message=f"{t.outcome.value}: {t.detail}"[:500])
            counts["skipped"] += 1
    for key, value in counts.items():
        suite.set(key, str(value))
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def junit_kind(outcome: TestOutcome) -> str:
    """passed | failed | error | skipped: what JUnit can say about an outcome."""
    if outcome in (TestOutcome.PASSED, TestOutcome.FAILED):
        return outcome.value
    if outcome in (TestOutcome.ERROR, TestOutcome.NOT_RUN):
        return "error"
    return "skipped"


_JUNIT_TAGS = {"failure": "failed", "error": "error", "skipped": "skipped"}


def read_junit(path: Path) -> dict[str, str]:
    """junit.xml as {nodeid: passed|failed|error|skipped}. Entities are refused (no expansion)."""
    text = read_text(path)
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise EvidenceError(f"{JUNIT} declares a DTD or entities; refused")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise EvidenceError(f"{JUNIT} is not well-formed XML ({exc})") from None
    cases = {}
    for case in root.iter("testcase"):
        kinds = [_JUNIT_TAGS[c.tag] for c in case if c.tag in _JUNIT_TAGS]
        cases[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    return cases


# -- the bundle: marker, listing, manifest --------------------------------------------------


def write_marker(bundle: Path, backend: str) -> None:
    (Path(bundle) / MARKER).write_text(dumps({"schema": MARKER_SCHEMA, "backend": backend}))


def has_marker(bundle: Path) -> bool:
    """The folder holds the marker this suite writes (a regular file, not a link)."""
    try:
        data = read_json(Path(bundle) / MARKER, MARKER)
    except EvidenceError:
        return False
    return isinstance(data, dict) and data.get("schema") == MARKER_SCHEMA


def list_files(bundle: Path) -> tuple[dict[str, Path], list[str]]:
    """Every file in the bundle ({relative path: path}) and the problems that refuse it:
    symlinks, FIFOs, sockets, devices, too many files, too deep. Links are never followed."""
    files: dict[str, Path] = {}
    problems: list[str] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            problems.append(f"{folder.relative_to(bundle) if folder != bundle else '.'} cannot be listed ({exc.strerror})")
            return
        for entry in entries:
            rel = str(Path(entry.path).relative_to(bundle))
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{rel} is a symlink")
            elif stat.S_ISDIR(mode):
                if depth >= MAX_BUNDLE_DEPTH:
                    problems.append(f"{rel} nests folders deeper than {MAX_BUNDLE_DEPTH}")
                else:
                    walk(Path(entry.path), depth + 1)
            elif stat.S_ISREG(mode):
                files[rel] = Path(entry.path)
            else:
                problems.append(f"{rel} is not a regular file (FIFO, socket or device)")
            if len(files) > MAX_BUNDLE_FILES:
                problems.append(f"more than {MAX_BUNDLE_FILES} files")
                return

    walk(Path(bundle), 0)
    return files, problems


class Manifest(_Doc):
    schema_: Literal["pytest-rkv/manifest/1"] = Field(MANIFEST_SCHEMA, alias="schema")
    files: dict[str, str]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(bundle: Path, hashes: dict[str, str]) -> None:
    doc = Manifest(files=hashes).model_dump(mode="json", by_alias=True)
    (Path(bundle) / MANIFEST).write_text(dumps(doc))


def read_manifest(bundle: Path) -> Manifest:
    data = read_json(Path(bundle) / MANIFEST, MANIFEST)
    if not isinstance(data, dict):
        raise EvidenceError(f"{MANIFEST} is a JSON {type(data).__name__}, expected an object")
    return parse(Manifest, data, MANIFEST)
