"""Every fault mode of the reference runtime is caught by at least one obligation test,
and drops the row below native: the suite's tests can fail."""

import pytest

from pytest_rkv.reference.runtime import FAULT_MODES


@pytest.mark.parametrize("fault", sorted(FAULT_MODES))
def test_fault_mode_fails_its_obligation_and_lowers_the_row(run_suites, fault):
    run = run_suites("--rkv-backend=reference", f"--rkv-reference-fault={fault}")
    row = run.row("reference")
    target = FAULT_MODES[fault].split(":")[0]
    failed = {k for k, v in row["obligations"].items() if v["outcome"] == "failed"}
    assert target in failed, f"{fault} should break {target}; failed obligations: {sorted(failed)}"
    assert row["label"] != "native conformance"
    assert row["obligations"][target]["label"] != "native conformance"
    assert run.result.ret == pytest.ExitCode.TESTS_FAILED
