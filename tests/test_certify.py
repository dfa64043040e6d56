"""Certify mode, evidence bundles and `rkv verify`, including tampering and redaction."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_rkv.bundle import seal, verify
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


def _tampered_row(certified: Path, tmp_path: Path, edit) -> Path:
    """A copy of the bundle whose row.json `edit(row)` changed, resealed like a careful forger."""
    bundle = _copy(certified, tmp_path)
    row = json.loads((bundle / "row.json").read_text())
    edit(row)
    (bundle / "row.json").write_text(json.dumps(row))
    seal(bundle)
    return bundle


def _failed(bundle: Path) -> dict[str, str]:
    return {c.name: c.message for c in verify(bundle) if not c.ok}


def test_certified_bundle_verifies_from_the_command_line(certified):
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "verify", str(certified)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert [l.split(":")[0] for l in lines[:-1]] == [
        "PASS manifest", "PASS schema", "PASS suite", "PASS certified", "PASS complete",
        "PASS junit", "PASS events", "PASS labels", "PASS descriptors"]
    assert lines[-1].endswith("verified (9/9 checks passed)")


def test_bundle_holds_the_evidence_files(certified):
    names = {p.name for p in certified.iterdir()}
    assert {"row.json", "events.jsonl", "junit.xml", "manifest.json"} <= names
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
    assert any("alice:<redacted>@" in arg for arg in command)


def test_edited_label_is_caught(certified, tmp_path):
    def edit(row):
        row["obligations"]["active-refusal"]["label"] = "adapter-scoped evidence"

    failed = _failed(_tampered_row(certified, tmp_path, edit))
    assert list(failed) == ["labels"]
    assert "active-refusal: labelled 'adapter-scoped evidence', the evidence gives 'native conformance'" in failed["labels"]


def test_edited_outcome_is_caught(certified, tmp_path):
    def edit(row):
        row["obligations"]["expiry"]["tests"][0]["outcome"] = "failed"

    failed = _failed(_tampered_row(certified, tmp_path, edit))
    assert "junit says passed, the row says failed" in failed["junit"]
    assert "expiry: outcome 'passed', its tests give 'failed'" in failed["labels"]


def test_edited_descriptor_label_is_caught(certified, tmp_path):
    def edit(row):
        assert row["descriptors"]["reference.toml"]["label"] == "native conformance"
        row["descriptors"]["reference.toml"]["label"] = "adapter-scoped evidence"

    failed = _failed(_tampered_row(certified, tmp_path, edit))
    assert list(failed) == ["descriptors"]
    assert "reference.toml: labelled 'adapter-scoped evidence', the checker gives 'native conformance'" in failed["descriptors"]


def test_dropped_test_is_caught(certified, tmp_path):
    bundle = _copy(certified, tmp_path)
    row = json.loads((bundle / "row.json").read_text())
    dropped = row["obligations"]["release"]["tests"].pop()
    row["obligations"]["release"]["outcome"] = "not_run"
    (bundle / "row.json").write_text(json.dumps(row))
    junit = (bundle / "junit.xml").read_text().splitlines()
    (bundle / "junit.xml").write_text("\n".join(l for l in junit if dropped["nodeid"].split("::")[1] not in l))
    seal(bundle)
    failed = _failed(bundle)
    assert "obligation release was not executed" in failed["complete"]
    assert "test test_claims.py::test_release_ends_protection_at_once is missing" in failed["complete"]


def test_reordered_events_are_caught(certified, tmp_path):
    bundle = _copy(certified, tmp_path)
    lines = (bundle / "events.jsonl").read_text().splitlines()
    first_test = json.loads(lines[0])["test"]
    lines[0], lines[1] = lines[1], lines[0]
    assert json.loads(lines[0])["test"] == first_test
    (bundle / "events.jsonl").write_text("\n".join(lines) + "\n")
    seal(bundle)
    failed = _failed(bundle)
    assert "events" in failed and "labels" not in failed  # the checker may lower its label too
    assert f"{first_test}: the trace's events differ from the ones recorded (reordered or edited)" in failed["events"]


def test_changed_file_without_its_hash_is_caught(certified, tmp_path):
    bundle = _copy(certified, tmp_path)
    with open(bundle / "junit.xml", "a") as f:
        f.write("<!-- edited -->\n")
    failed = _failed(bundle)
    assert "junit.xml has sha256" in failed["manifest"]


def test_changed_hash_in_the_manifest_is_caught(certified, tmp_path):
    bundle = _copy(certified, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["row.json"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "row.json has sha256" in _failed(bundle)["manifest"]


def test_extra_file_is_caught(certified, tmp_path):
    bundle = _copy(certified, tmp_path)
    (bundle / "extra.txt").write_text("slipped in")
    assert "extra.txt is not in the manifest" in _failed(bundle)["manifest"]


def test_modified_suite_hash_is_caught(certified, tmp_path):
    bundle = _tampered_row(certified, tmp_path, lambda row: row.update(suite_hash="f" * 64))
    assert "the suite was modified" in _failed(bundle)["suite"]


def test_uncertified_run_does_not_verify(run_suites):
    run = run_suites("--rkv-backend=reference")
    failed = _failed(run.report_dir / "reference")
    assert list(failed) == ["certified"]


def test_verify_of_a_missing_or_broken_bundle_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "verify", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a bundle directory" in proc.stderr
    (tmp_path / "row.json").write_text("{broken")
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "verify", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "FAIL row: row.json unreadable" in proc.stdout


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
