"""The plugin's own behaviour: options from CLI and ini, markers, and no side effects."""



def test_backend_comes_from_ini_when_not_on_the_command_line(run_suites, pytester):
    pytester.makefile(".ini", pytest="[pytest]\nrkv_backend = reference-http\n")
    run = run_suites("-c", str(pytester.path / "pytest.ini"), "--rootdir", str(pytester.path))
    assert (run.report_dir / "reference-http" / "row.json").exists()
    assert not (run.report_dir / "reference").exists()


def test_command_line_beats_ini(run_suites, pytester):
    pytester.makefile(".ini", pytest="[pytest]\nrkv_backend = reference-http\n")
    run = run_suites("-c", str(pytester.path / "pytest.ini"), "--rootdir", str(pytester.path),
                     "--rkv-backend=reference")
    assert (run.report_dir / "reference" / "row.json").exists()
    assert not (run.report_dir / "reference-http").exists()


def test_an_unrelated_suite_starts_nothing_and_writes_nothing(pytester):
    pytester.makepyfile("def test_plain():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "rkv-report").exists()
    assert "resident KV claims" not in result.stdout.str()


def test_markers_are_registered_and_selectable(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["*rkv_obligation(id)*", "*rkv_substrate(id)*", "*rkv_active_refusal*"])


def test_select_one_obligation_by_marker_and_the_row_says_unknown(run_suites):
    run = run_suites("--rkv-backend=reference", "-m", "rkv_active_refusal")
    assert run.result.parseoutcomes() == {"passed": 3, "deselected": 39}
    row = run.row("reference")
    assert row["obligations"]["active-refusal"]["outcome"] == "passed"
    assert row["label"] == "unknown evidence", "a partial run must never certify a row"


def test_a_plain_skip_is_not_evidence(run_suites, pytester):
    pytester.makepyfile(skipper='''
import pytest

def pytest_runtest_call(item):
    if "release" in item.name:
        pytest.skip("flaky today")
''')
    pytester.syspathinsert()
    run = run_suites("--rkv-backend=reference", "-p", "skipper")
    row = run.row("reference")
    assert row["obligations"]["release"]["outcome"] == "error"
    assert row["label"] == "unknown evidence"
