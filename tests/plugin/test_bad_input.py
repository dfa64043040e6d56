"""Bad input gets a clear error and loses nothing."""

import threading

import pytest
import requests

from pytest_rkv.reference.runtime import MicroRuntime
from pytest_rkv.reference.server import serve
from tests.conftest import rkv_serve_pids

CRASH_PLUGIN = '''
seen = 0

def pytest_runtest_teardown(item, nextitem):
    """Kill the reference-http server after the third test, as a crash would."""
    global seen
    seen += 1
    if seen == 3:
        item.funcargs["rkv_backend"].server.proc.kill()
'''


def test_unknown_backend_is_a_usage_error_listing_the_installed_ones(run_suites):
    run = run_suites("--rkv-backend=reference,tensorrt-magic")
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(["*unknown backend 'tensorrt-magic'; installed: *reference, reference-http, rkv-http*"])


def test_unknown_fault_mode_is_a_usage_error(run_suites):
    run = run_suites("--rkv-reference-fault=gremlins")
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(["*unknown fault mode(s) gremlins; known: *"])


def test_rkv_http_without_url_is_a_usage_error(run_suites):
    run = run_suites("--rkv-backend=rkv-http")
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(["*needs --rkv-url*"])


def test_unreachable_url_makes_every_obligation_unknown(run_suites):
    run = run_suites("--rkv-backend=rkv-http", "--rkv-url=http://127.0.0.1:9")
    assert run.result.ret == pytest.ExitCode.TESTS_FAILED
    run.result.stdout.fnmatch_lines(["*cannot reach an RKV API v1 server at http://127.0.0.1:9*"])
    row = run.row("rkv-http")
    assert row["label"] == "unknown evidence"
    assert {v["outcome"] for v in row["obligations"].values()} == {"error"}


def test_server_dying_mid_run_leaves_the_rest_unknown_with_the_log_tail(run_suites, pytester):
    pytester.makepyfile(crashplugin=CRASH_PLUGIN)
    pytester.syspathinsert()
    before = rkv_serve_pids()
    run = run_suites("--rkv-backend=reference-http", "-p", "crashplugin", "-p", "no:randomly")
    row = run.row("reference-http")
    assert row["label"] == "unknown evidence"
    errors = [t for ob in row["obligations"].values() for t in ob["tests"] if t["outcome"] == "error"]
    assert errors, "tests after the crash must be errors"
    assert all("exited with code" in t["detail"] and "server log" in t["detail"] for t in errors)
    assert "passed" not in {t["outcome"] for t in errors}
    assert not rkv_serve_pids() - before, "the run left its server behind"


@pytest.fixture
def server():
    runtime = MicroRuntime(claim_budget_blocks=64)
    httpd = serve(runtime)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield f"http://{host}:{port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/kv/claims", {"strength": "hard"}, "prompt_token_ids"),
        ("/v1/kv/claims", {"prompt_token_ids": [1, 2], "strength": "firm"}, "strength"),
        ("/v1/kv/claims", {"prompt_token_ids": [1, -2]}, "prompt_token_ids.1"),
        ("/v1/kv/claims", {"prompt_token_ids": [1], "ttl_s": 0}, "ttl_s"),
        ("/v1/kv/claims", {"prompt_token_ids": [1], "colour": "red"}, "colour"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [1], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_malformed_requests_get_422_with_the_field(server, path, body, field):
    resp = requests.post(server + path, json=body, timeout=5)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["type"] == "invalid_request"
    assert field in [".".join(map(str, f["loc"])) for f in error["fields"]], error


def test_non_json_body_gets_422(server):
    resp = requests.post(server + "/v1/kv/claims", data=b"{not json", timeout=5)
    assert resp.status_code == 422 and resp.json()["error"]["type"] == "invalid_request"


def test_unknown_claim_is_404(server):
    for method in ("GET", "DELETE"):
        resp = requests.request(method, server + "/v1/kv/claims/claim-999", timeout=5)
        assert resp.status_code == 404
        assert resp.json()["error"] == {**resp.json()["error"], "type": "not_found"}
    resp = requests.post(server + "/v1/completions", json={"prompt": [1, 2], "claim_id": "claim-999"}, timeout=5)
    assert resp.status_code == 404


def test_claim_over_budget_is_no_admit_with_a_reason(server):
    resp = requests.post(server + "/v1/kv/claims", json={"prompt_token_ids": list(range(1, 65 * 16 + 1))}, timeout=5)
    assert resp.status_code == 409
    error = resp.json()["error"]
    assert error["type"] == "no_admit" and "budget" in error["reason"] and "64" in error["reason"]
    assert requests.get(server + "/v1/kv/pool", timeout=5).json()["claimed_blocks"] == {}


def test_unknown_route_and_bad_query_are_clear(server):
    assert requests.get(server + "/v1/kv/nothing", timeout=5).status_code == 404
    resp = requests.get(server + "/v1/kv/events?after=soon", timeout=5)
    assert resp.status_code == 422 and "after" in resp.json()["error"]["message"]


def test_prompt_larger_than_the_pool_is_a_capacity_error(server):
    resp = requests.post(server + "/v1/completions", json={"prompt": [1] * (81 * 16)}, timeout=5)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "capacity"
