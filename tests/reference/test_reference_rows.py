"""The reference runtime earns a native row over both transports, serial and under xdist."""

import json

from pytest_rkv.contract import OBLIGATIONS


def _comparable(row: dict) -> str:
    """Everything but the command line, which says -n 2 in one run and not the other."""
    return json.dumps({k: v for k, v in row.items() if k != "command_line"}, sort_keys=True)


def test_reference_and_reference_http_are_native(run_suites):
    run = run_suites("--rkv-backend=reference,reference-http", subprocess=True)
    assert run.result.parseoutcomes() == {"passed": 68, "unsupported": 6, "inapplicable": 10}
    for backend in ("reference", "reference-http"):
        row = run.row(backend)
        assert row["label"] == "native conformance", row["reason"]
        assert row["runtime"] == "pytest-rkv-reference"
        outcomes = {k: v["outcome"] for k, v in row["obligations"].items()}
        assert set(outcomes) == {o.id for o in OBLIGATIONS}
        assert outcomes.pop("placement") == "not_applicable"
        assert set(outcomes.values()) == {"passed"}
        # The reference demotes only demotable claims; displaced unclaimed cache is lost,
        # not kept in a host tier, so that substrate is absent (its label does not need it).
        substrates = {k: v["outcome"] for k, v in row["substrates"].items()}
        assert substrates.pop("host_tier") == "unsupported"
        assert set(substrates.values()) == {"passed"}


def test_the_two_transports_give_the_same_evidence(run_suites):
    run = run_suites("--rkv-backend=reference,reference-http")
    local, http = run.row("reference"), run.row("reference-http")
    for row in (local, http):
        for ob in row["obligations"].values():
            for t in ob["tests"]:
                t["nodeid"] = t["nodeid"].rsplit("[", 1)[0]
    assert local["obligations"] == http["obligations"]


def test_xdist_rows_equal_serial_rows(run_suites):
    serial = run_suites("--rkv-backend=reference,reference-http", subprocess=True)
    parallel = run_suites("--rkv-backend=reference,reference-http", "-n", "2", subprocess=True)
    assert parallel.result.parseoutcomes() == {"passed": 68, "unsupported": 6, "inapplicable": 10}
    for backend in ("reference", "reference-http"):
        assert _comparable(parallel.row(backend)) == _comparable(serial.row(backend))


def test_junit_records_the_obligation_of_each_test(run_suites, tmp_path):
    junit = tmp_path / "junit.xml"
    run = run_suites("--rkv-backend=reference", f"--junitxml={junit}", "-o", "junit_family=xunit1")
    assert run.result.parseoutcomes() == {"passed": 34, "unsupported": 3, "inapplicable": 5}
    text = junit.read_text()
    assert 'name="rkv_obligation" value="active-refusal"' in text
    assert 'name="rkv_outcome" value="unsupported"' in text
