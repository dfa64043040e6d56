"""The bounded wait: a runtime that never answers the canonical probe fails active
refusal (with the waiting evidence), while a backend that dies during the wait stays
unknown. `--rkv-refusal-timeout` is an option like the others (CLI, ini, validated)."""

import pytest

from tests.conftest import rkv_serve_pids

CANONICAL = "test_canonical_probe_refuses_the_active_request_and_names_the_claim"

KILL_DURING_WAIT_PLUGIN = '''
import threading

def pytest_runtest_call(item):
    """Kill the reference-http server half a second into the canonical probe's wait: the
    timer starts when the 70-block request is sent, so a slow machine cannot move the kill
    before it (into the claim's set-up, a different failure)."""
    if "canonical_probe" in item.name:
        driver = item.funcargs["rkv_backend"]
        proc, complete = driver.server.proc, driver.complete

        def complete_then_kill(req):
            if (req.request_id or "").startswith("rkv-active"):
                threading.Timer(0.5, proc.kill).start()
            return complete(req)

        driver.complete = complete_then_kill
'''


def _canonical(row: dict) -> dict:
    [test] = [t for t in row["obligations"]["active-refusal"]["tests"] if CANONICAL in t["nodeid"]]
    return test


def test_runtime_that_queues_the_probe_forever_fails_active_refusal_over_http(run_suites):
    before = rkv_serve_pids()
    run = run_suites("--rkv-backend=reference-http", "--rkv-reference-fault=queue_blocked_requests",
                     "--rkv-refusal-timeout=1", "-k", "canonical_probe")
    row = run.row("reference-http")
    test = _canonical(row)
    assert test["outcome"] == "failed"
    assert "no answer in 1 s; no refusal; claim claim-" in test["detail"]
    assert "still held (resident, 60 of 60 blocks resident)" in test["detail"]
    evidence = test["evidence"]["no_answer"]
    assert (evidence["waited_s"], evidence["refusal"]) == (1.0, None)
    assert evidence["claim"].endswith("still held (resident, 60 of 60 blocks resident)")
    assert row["obligations"]["active-refusal"]["label"] != "native conformance"
    assert not rkv_serve_pids() - before, "the parked request kept the server alive"


def test_in_process_reference_waits_on_its_fake_clock(run_suites):
    run = run_suites("--rkv-reference-fault=queue_blocked_requests", "--rkv-refusal-timeout=7",
                     "-k", "canonical_probe")
    test = _canonical(run.row("reference"))
    assert test["outcome"] == "failed"
    assert test["detail"].startswith("AssertionError: request rkv-active-1: no answer in 7 s; no refusal; claim ")


def test_backend_dying_during_the_wait_is_unknown_not_failed(run_suites, pytester):
    pytester.makepyfile(killplugin=KILL_DURING_WAIT_PLUGIN)
    pytester.syspathinsert()
    before = rkv_serve_pids()
    run = run_suites("--rkv-backend=reference-http", "--rkv-reference-fault=queue_blocked_requests",
                     "--rkv-refusal-timeout=20", "-p", "killplugin", "-k", "canonical_probe")
    test = _canonical(run.row("reference-http"))
    assert test["outcome"] == "error", test
    assert "exited with code" in test["detail"] and "no answer" not in test["detail"]
    assert not rkv_serve_pids() - before


def test_refusal_timeout_from_ini(run_suites, pytester):
    pytester.makefile(".ini", pytest="[pytest]\nrkv_refusal_timeout = 3\n")
    run = run_suites("-c", str(pytester.path / "pytest.ini"), "--rootdir", str(pytester.path),
                     "--rkv-reference-fault=queue_blocked_requests", "-k", "canonical_probe")
    assert "no answer in 3 s" in _canonical(run.row("reference"))["detail"]


def test_default_refusal_timeout_is_30_s(run_suites):
    run = run_suites("--rkv-reference-fault=queue_blocked_requests", "-k", "canonical_probe")
    assert "no answer in 30 s" in _canonical(run.row("reference"))["detail"]


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_bad_refusal_timeout_is_a_usage_error(run_suites, value):
    run = run_suites(f"--rkv-refusal-timeout={value}")
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(["*--rkv-refusal-timeout must be a positive number of seconds*"])
