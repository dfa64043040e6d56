"""Self-test helpers: run the real suites in a child pytest and read the rows it wrote."""

import json
import subprocess
from pathlib import Path

import pytest

SUITES = Path(__file__).resolve().parent.parent / "suites"


class SuiteRun:
    def __init__(self, result, report_dir: Path) -> None:
        self.result = result
        self.report_dir = report_dir

    def row(self, backend: str) -> dict:
        path = self.report_dir / backend / "row.json"
        assert path.exists(), f"no row for {backend}; output:\n{self.result.stdout.str()[-3000:]}"
        return json.loads(path.read_text())


@pytest.fixture
def run_suites(pytester, tmp_path):
    """run_suites(*args, subprocess=False) -> SuiteRun over the real suites/ directory."""

    def run(*args: str, subprocess: bool = False, **kw) -> SuiteRun:
        report_dir = tmp_path / f"report-{len(list(tmp_path.iterdir()))}"
        argv = [str(SUITES), "-p", "no:cacheprovider", "--rkv-report-dir", str(report_dir), *args]
        runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest
        return SuiteRun(runner(*argv, **kw), report_dir)

    return run


def rkv_serve_pids() -> set[int]:
    """Pids of every `rkv serve` process on the machine (for leftover checks: compare the
    set before and after a run, so other sessions' servers never count)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if "pytest_rkv.cli serve" in line}


def recorded_catalogue(row: dict):
    """The released suite as a recorded row knew it: only the suite tests the row holds.

    Checker fixtures (counterexamples, hand-built rows) were recorded with the suite of
    their day; judged against tests added since, they would read as "not run". They are
    about a lowering, not about completeness (`rkv verify`'s concern)."""
    from pytest_rkv.descriptor import SuiteCatalogue, suite_key
    from pytest_rkv.locations import suite_dir

    full = SuiteCatalogue.scan(suite_dir())
    held = {suite_key(t["nodeid"]) for section in ("obligations", "substrates", "lowerings")
            for entry in row.get(section, {}).values() for t in entry.get("tests", [])}
    return SuiteCatalogue({k: v for k, v in full.tests.items() if k in held})
