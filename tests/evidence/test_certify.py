"""Certify mode: what a certified run refuses, and what its bundle records (redacted).

Verifying bundles (tampering, replay, hostile input) is in test_verify_replay.py and
test_verify_hostile.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SUITES


@pytest.fixture(scope="module")
def certified(tmp_path_factory):
    """One certified reference run, shared: each test copies the bundle before touching it."""
    report = tmp_path_factory.mktemp("certified")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(SUITES), "--rkv-backend=reference", "--rkv-certify",
         "--rkv-report-dir", str(report), "-p", "no:cacheprovider", "-q",
         "--rkv-model=https://alice:hunter2secret@example.invalid/model"],
        capture_output=True, text=True, env={**_env(), "RKV_SELFTEST_API_TOKEN": "tok-hunter2"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return report / "reference"


def _env():
    import os
    return dict(os.environ)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(bundle, dest)
    return dest


def test_bundle_holds_the_evidence_files(certified):
    names = {p.name for p in certified.iterdir()}
    assert {"row.json", "events.jsonl", "transcript.jsonl", "junit.xml", "manifest.json", ".rkv-bundle"} <= names
    row = json.loads((certified / "row.json").read_text())
    assert row["certified"] is True and row["label"] == "native conformance"
    assert row["environment"]["python"] and row["environment"]["cpus"]
    assert row["suite_version"] and len(row["suite_hash"]) == 64


def test_secrets_never_enter_the_bundle(certified):
    for path in certified.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            for secret in ("hunter2secret", "tok-hunter2"):
                assert secret not in text, f"{secret} leaked into {path.name}"
    command = json.loads((certified / "row.json").read_text())["command_line"]
    assert any("alice:[redacted]@" in arg for arg in command)


def test_redaction_keeps_counts_and_flags_and_leaves_xml_well_formed():
    import xml.etree.ElementTree as ET

    from pytest_rkv.certify import redact

    vllm = "--max-num-batched-tokens 4096 --enable-prompt-tokens-details --scheduling-policy priority"
    assert redact(vllm) == vllm
    assert redact("--hf-token hf_abcdef --api-key=sk-12345 --rkv-tenant-tokens=aaaa,bbbb") == (
        "--hf-token [redacted] --api-key=[redacted] --rkv-tenant-tokens=[redacted]")
    junit = '<testsuites><testcase><error message="--hf-token hf_x1">--api-key sk-123456</error></testcase></testsuites>'
    ET.fromstring(redact(junit))  # still XML


@pytest.mark.parametrize("args, why", [
    (["-k", "anything"], "-k selects a subset of the suite"),
    (["-m", "rkv_expiry"], "-m selects a subset of the suite"),
    (["--deselect", "suites/test_claims.py"], "--deselect drops tests"),
    (["-x"], "-x/--maxfail stops before every obligation has run"),
    (["--runxfail"], "--runxfail overrides xfail outcomes"),
])
def test_certify_refuses_selection(run_suites, args, why):
    run = run_suites("--rkv-certify", *args)
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(["*--rkv-certify refuses this run*", f"*{why}*"])


def test_certify_refuses_a_plugin_that_deselects(run_suites, pytester):
    pytester.makepyfile(dropper='''
def pytest_collection_modifyitems(config, items):
    dropped = [i for i in items if "expired" in i.name]
    items[:] = [i for i in items if i not in dropped]
    config.hook.pytest_deselected(items=dropped)
''')
    pytester.syspathinsert()
    run = run_suites("--rkv-certify", "-p", "dropper")
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    assert "1 tests were deselected" in run.result.stdout.str() + run.result.stderr.str()
    assert not (run.report_dir / "reference" / "row.json").exists()


def test_certify_refuses_last_failed(pytester):
    result = pytester.runpytest(str(SUITES), "--rkv-certify", "--lf")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lf runs only the last failures*"])


def test_certify_refuses_a_single_test(pytester):
    result = pytester.runpytest(f"{SUITES}/test_claims.py::test_release_ends_protection_at_once", "--rkv-certify")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*must name exactly one directory, the suite*"])


def test_certify_refuses_a_modified_suite(pytester, tmp_path):
    suite = tmp_path / "suites"
    shutil.copytree(SUITES, suite, ignore=shutil.ignore_patterns("__pycache__"))
    path = suite / "test_pressure.py"
    path.write_text(path.read_text().replace("assert not active.ok", "assert True or not active.ok"))
    result = pytester.runpytest(str(suite), "--rkv-certify", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the suite differs from the released suite*test_pressure.py*"])


def test_suite_manifest_is_current():
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "suite-manifest", str(SUITES), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
