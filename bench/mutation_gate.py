"""pytest plugin for `bench/mutation.py`: a run "passes" only if every rkv test ends
with the outcome the unmutated reference gave it.

mutmut decides killed/survived from pytest's exit status, but a mutant can turn a pass
into *untestable* or *inapplicable* (a capability flag flipped), which exits 0 while the
reference row stops being all-passed native conformance. This plugin closes that gap.

* `RKV_MUTATION_RECORD=<file>`: write {nodeid: outcome} of this run (the unmutated baseline).
* `RKV_MUTATION_BASELINE=<file>`: set exit status 1 when any test's outcome differs from it.
* `RKV_MUTATION_REPORTS=<dir>`: write this process's bundle under `<dir>/run-<pid>`, so
  mutmut's concurrent children never share (and empty) one bundle folder.
"""

from __future__ import annotations

import json
import os

import pytest

RESULT_KEY = "rkv_result"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    reports = os.environ.get("RKV_MUTATION_REPORTS")
    if reports:  # before pytest-rkv reads its options
        config.option.rkv_report_dir = os.path.join(reports, f"run-{os.getpid()}")
_outcomes: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, value in getattr(report, "user_properties", ()):
        if key == RESULT_KEY:
            record = json.loads(value)
            # setup errors and call results both land here; the last word wins
            _outcomes[record["nodeid"]] = record["outcome"]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    record, baseline = os.environ.get("RKV_MUTATION_RECORD"), os.environ.get("RKV_MUTATION_BASELINE")
    if record:
        with open(record, "w") as f:
            json.dump(_outcomes, f, indent=1, sort_keys=True)
    if baseline and exitstatus == 0:
        with open(baseline) as f:
            expected = json.load(f)
        differ = {n: o for n, o in _outcomes.items() if expected.get(n) != o}
        if differ:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _outcomes.clear()
