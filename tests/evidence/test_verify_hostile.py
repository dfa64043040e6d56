"""Malformed and hostile bundles: each gets failed checks of one line each and a non-zero
exit, within 5 s; never a traceback, never a hang, never a read outside the bundle."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_rkv.evidence import MAX_FILE_BYTES, MAX_JSON_DEPTH
from pytest_rkv.report import seal
from pytest_rkv.verify import verify
from tests.conftest import SUITES


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    report = tmp_path_factory.mktemp("hostile")
    subprocess.run([sys.executable, "-m", "pytest", str(SUITES), "--rkv-backend=reference", "--rkv-certify",
                    "--rkv-report-dir", str(report), "-p", "no:cacheprovider", "-q"],
                   capture_output=True, text=True, timeout=600)
    assert (report / "reference" / "manifest.json").exists()
    return report / "reference"


def _write(name, text, reseal=True):
    def make(bundle: Path) -> None:
        (bundle / name).write_text(text)
        if reseal:
            seal(bundle)
    return make


def _fifo(name):
    def make(bundle: Path) -> None:
        (bundle / name).unlink(missing_ok=True)
        os.mkfifo(bundle / name)
    return make


def _symlink(name, target):
    def make(bundle: Path) -> None:
        (bundle / name).unlink(missing_ok=True)
        (bundle / name).symlink_to(target)
    return make


def _huge(bundle: Path) -> None:
    """A sparse file above the bound, listed in the manifest (so only its size refuses it)."""
    with open(bundle / "server.log", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["server.log"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _extra(rel):
    def make(bundle: Path) -> None:
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_text("{}")
    return make


DEEP = "[" * 100_000 + "]" * 100_000

CASES = {
    "row is an array": (_write("row.json", "[]"), "row.json is a JSON list, expected an object"),
    "row is null": (_write("row.json", "null"), "row.json is a JSON NoneType, expected an object"),
    "row is a number": (_write("row.json", "3"), "row.json is a JSON int, expected an object"),
    "row is not JSON": (_write("row.json", "{broken"), "row.json is not valid JSON"),
    "row nests 10^5 deep": (_write("row.json", DEEP), f"row.json nests deeper than {MAX_JSON_DEPTH} levels"),
    "row has mistyped fields": (_write("row.json", json.dumps({"schema": "pytest-rkv/row/2", "obligations": 3})),
                                "row.json: "),
    "manifest is an array": (_write("manifest.json", "[]", reseal=False), "manifest.json is a JSON list"),
    "manifest nests 10^5 deep": (_write("manifest.json", DEEP, reseal=False), "manifest.json nests deeper"),
    "manifest lists a non-string": (_write("manifest.json", '{"schema": "pytest-rkv/manifest/1", "files": [1]}',
                                           reseal=False), "manifest.json: files"),
    "row.json is a FIFO": (_fifo("row.json"), "row.json is not a regular file"),
    "junit.xml is a FIFO": (_fifo("junit.xml"), "junit.xml is not a regular file"),
    "a descriptor is a FIFO": (_fifo("descriptors/reference.toml"), "descriptors/reference.toml is not a regular file"),
    "a descriptor links to an endless device": (_symlink("descriptors/reference.toml", "/dev/zero"),
                                                "descriptors/reference.toml is a symlink"),
    "row.json links outside the bundle": (_symlink("row.json", "/etc/hostname"), "row.json is a symlink"),
    "an unlisted file in __pycache__": (_extra("__pycache__/x.cpython-311.pyc"),
                                        "__pycache__/x.cpython-311.pyc is not in the manifest"),
    "a second manifest in a subfolder": (_extra("sub/manifest.json"), "sub/manifest.json is not in the manifest"),
    "a huge file": (_huge, f"server.log is {MAX_FILE_BYTES + 1} bytes, above the bound"),
    "junit declares entities": (_write("junit.xml", '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'),
                                "junit.xml declares a DTD or entities"),
    "junit is not XML": (_write("junit.xml", "<testsuites"), "junit.xml is not well-formed XML"),
    "events are not JSON": (_write("events.jsonl", "{nope\n"), "events.jsonl line 1 is not valid JSON"),
    "a transcript line is malformed": (_write("transcript.jsonl", '{"test": "x", "i": -1}\n'), "transcript.jsonl line 1"),
    "a transcript names a class outside pytest_rkv": None,  # see below
}


def _foreign_class(bundle: Path) -> None:
    lines = (bundle / "transcript.jsonl").read_text().splitlines()
    call = json.loads(lines[0])
    call["returned"] = {"$model": "os:system", "data": "true"}
    lines[0] = json.dumps(call)
    (bundle / "transcript.jsonl").write_text("\n".join(lines) + "\n")
    seal(bundle)


CASES["a transcript names a class outside pytest_rkv"] = (_foreign_class, "replay")


def _verify_within(bundle: Path, seconds: float):
    result: list = []
    worker = threading.Thread(target=lambda: result.append(verify(bundle)), daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert result, f"rkv verify did not finish within {seconds} s (a hang)"
    return result[0], time.monotonic() - started


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_bundle_is_refused_in_one_line(genuine, tmp_path, case):
    import shutil

    make, expected = CASES[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(genuine, bundle, symlinks=True)
    make(bundle)
    # A foreign class is only met by the replay, a subprocess: give it the replay's time.
    checks, elapsed = _verify_within(bundle, 120 if expected == "replay" else 5)
    failed = [c for c in checks if not c.ok]
    assert failed, f"{case}: verified"
    for c in failed:
        assert "\n" not in c.line() and "Traceback" not in c.message
    assert any(expected in c.line() for c in failed), [c.line() for c in failed]


def test_the_command_line_exits_non_zero_without_a_traceback(genuine, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(genuine, bundle)
    (bundle / "row.json").write_text(DEEP)
    seal(bundle)
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "verify", str(bundle)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("FAIL")] == \
        [f"FAIL row: row.json nests deeper than {MAX_JSON_DEPTH} levels"]
    for target in (tmp_path / "nope", bundle / "row.json"):
        proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "verify", str(target)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "is not a bundle directory" in proc.stderr
