"""The report dir: the suite empties only a bundle folder it created (its marker file), and
refuses to start, with a usage error, rather than risk anything it did not write."""

import os

import pytest

from pytest_rkv.evidence import MARKER


def test_a_folder_the_suite_did_not_create_is_refused_and_kept(run_suites, tmp_path):
    """The measured accident: --rkv-report-dir backends --rkv-backend=reference deleted the
    reference descriptor and an unrelated file."""
    foreign = tmp_path / "backends" / "reference"
    foreign.mkdir(parents=True)
    (foreign / "reference.toml").write_text("keep me")
    (foreign / "notes.txt").write_text("mine")
    run = run_suites("--rkv-backend=reference", "--rkv-report-dir", str(tmp_path / "backends"))
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(["*refuses to start*holds a folder this suite did not create (no marker)*"])
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "reference.toml"]
    assert (foreign / "reference.toml").read_text() == "keep me"


def test_a_report_dir_that_is_a_file_is_refused(run_suites, tmp_path):
    target = tmp_path / "report"
    target.write_text("a file")
    run = run_suites("--rkv-backend=reference", "--rkv-report-dir", str(target))
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(["*not a directory*"])
    assert target.read_text() == "a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_report_dir_that_is_not_writable_is_refused(run_suites, tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        run = run_suites("--rkv-backend=reference", "--rkv-report-dir", str(target / "report"))
    finally:
        target.chmod(0o700)
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(["*is not writable*"])


def test_the_suite_replaces_its_own_bundle(run_suites, tmp_path):
    report = tmp_path / "report"
    first = run_suites("--rkv-backend=reference", "--rkv-report-dir", str(report), "-k", "release")
    assert first.result.ret == 0
    bundle = report / "reference"
    assert (bundle / MARKER).is_file()
    (bundle / "stale.log").write_text("from the earlier run")
    again = run_suites("--rkv-backend=reference", "--rkv-report-dir", str(report), "-k", "release")
    assert again.result.ret == 0
    assert not (bundle / "stale.log").exists() and (bundle / "row.json").exists()
    assert (bundle / MARKER).is_file()


def test_a_backend_id_is_the_folder_name_verbatim(tmp_path):
    from pytest_rkv.evidence import EvidenceError, bundle_dir

    assert bundle_dir(tmp_path, "vllm+rkv") == tmp_path / "vllm+rkv"
    for bad in ("../x", "a/b", "", "UPPER", ".hidden"):
        with pytest.raises(EvidenceError, match="is not a lowercase name"):
            bundle_dir(tmp_path, bad)
